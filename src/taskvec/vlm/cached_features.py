"""The default VLM's image tokens for training, computed once by its frozen tower and cached.

The tower (`vision_tower.ImagenetColourTower`) has no trained weights, so every training step can
read its outputs from a safetensors file instead of running EfficientNet-Lite0 (about 57 ms per
picture on 2 cores). The cache holds each picture and `copies` seeded augmented copies of it; its
metadata names the tower's config, so a changed tower never reads stale tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from taskvec.vlm.data import EntityImage
from taskvec.vlm.imagenet_encoder import ENCODER_NAME, cached_image_features, preprocess
from taskvec.vlm.vision_tower import ImagenetColourTower


@dataclass(frozen=True)
class TowerTokens:
    """`tokens[i, v]` are picture i's tokens in view v (0: the picture, 1 + k: augmented copy k)."""

    tokens: torch.Tensor  # [pictures, 1 + copies, tokens_per_image, hidden], float32
    rows: dict[Path, int]

    @property
    def views(self) -> int:
        return int(self.tokens.shape[1])

    def of(self, image: EntityImage, view: int = 0) -> torch.Tensor:
        return self.tokens[self.rows[image.path], view]


def tower_tokens(tower: ImagenetColourTower, pictures: Sequence[Image.Image]) -> torch.Tensor:
    """What the tower gives the projector for `pictures`, preprocessed as the processor does."""
    with torch.inference_mode():
        pixels = preprocess(pictures, tower.config.image_size).to(tower.dtype)
        tokens: torch.Tensor = tower(pixels).last_hidden_state
    return tokens


def cached_tower_tokens(
    tower: ImagenetColourTower,
    images: Sequence[EntityImage],
    cache_path: Path,
    *,
    copies: int,
    seed: int,
    batch_size: int = 32,
) -> TowerTokens:
    config = tower.config
    cached = cached_image_features(
        [image.path for image in images],
        cache_path,
        encode=lambda pictures: tower_tokens(tower, pictures),
        encoder={
            "encoder": f"{ENCODER_NAME} grid + picture colours",
            "grid": config.grid,
            "colour_side": config.colour_side,
            "colour_scale": config.colour_scale,
            "image_size": config.image_size,
        },
        token_shape=(config.tokens_per_image, config.hidden_size),
        copies=copies,
        seed=seed,
        batch_size=batch_size,
    )
    return TowerTokens(cached.features, {image.path: row for row, image in enumerate(images)})
