"""How well the default VLM's frozen image features name pictures in an art style never trained on.

A logistic-regression probe per family (flags, animals, foods) on the entity's name, trained on the
four training styles and tested on the held-out Noto style (vlm.data's split), on EfficientNet-Lite0's
features pooled to one token and to a 2x2 grid, on the picture's 8x8 colours alone, and on the default
VLM's tower (lite0 2x2, each cell beside the picture's colours). Features come from caches (computed
once, then read back).

python scripts/probe_imagenet_features.py --cache-dir /tmp/lite0-features
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression

from taskvec.models.cache_dir import cache_root
from taskvec.tasks.images import read_rgb
from taskvec.vlm.cached_features import cached_tower_tokens
from taskvec.vlm.data import FAMILIES, KIND, EntityImage, entity_images, split_by_style
from taskvec.vlm.imagenet_encoder import FEATURE_CHANNELS, ImagenetEncoder, cached_feature_grid
from taskvec.vlm.training import TrainConfig
from taskvec.vlm.vision_tower import ImagenetColourTower

Features = Callable[[Sequence[EntityImage]], np.ndarray]


def lite0_features(encoder: ImagenetEncoder, cache_dir: Path, grid: int) -> Features:
    images = entity_images()
    cache = cache_dir / f"lite0-grid{grid}.safetensors"
    cached = cached_feature_grid([image.path for image in images], cache, grid=grid, encoder=encoder)
    rows = {image.path: index for index, image in enumerate(images)}
    flat = cached.features[:, 0].flatten(1).numpy()
    return lambda chosen: flat[[rows[image.path] for image in chosen]]


def tower_features(cache_dir: Path, part: slice) -> Features:
    """The default VLM's tower (`TrainConfig().tower`, ImageNet weights): `part` of each token's
    values (the first 1280 are lite0's, the rest the picture's colours), all tokens side by side."""
    tower = ImagenetColourTower(TrainConfig().tower.config())
    tower.load_imagenet_weights()
    images = entity_images()
    cached = cached_tower_tokens(tower.eval(), images, cache_dir / "tower.safetensors", copies=0, seed=0)
    flat = cached.tokens[:, 0, :, part].flatten(1).numpy()
    rows = {image.path: index for index, image in enumerate(images)}
    return lambda chosen: flat[[rows[image.path] for image in chosen]]


def probe_accuracy(
    sources: Sequence[Features], train: Sequence[EntityImage], test: Sequence[EntityImage]
) -> float:
    """One source: its raw features, scikit-learn's default probe (C=1; standardising every channel
    measured worse, flags 42% against 58% pooled). Several side by side: each divided by its mean
    training-row norm, so lite0's 5,120 values do not drown the tower's 256, and C=10 as the rows
    are then of unit scale."""
    train_blocks = [source(train) for source in sources]
    test_blocks = [source(test) for source in sources]
    inverse_regularisation = 1.0
    if len(sources) > 1:
        scales = [float(np.linalg.norm(block, axis=1).mean()) for block in train_blocks]
        train_blocks = [block / scale for block, scale in zip(train_blocks, scales, strict=True)]
        test_blocks = [block / scale for block, scale in zip(test_blocks, scales, strict=True)]
        inverse_regularisation = 10.0
    probe = LogisticRegression(C=inverse_regularisation, max_iter=2000)
    probe.fit(np.concatenate(train_blocks, axis=1), [image.name for image in train])
    predicted = probe.predict(np.concatenate(test_blocks, axis=1))
    return float(np.mean(predicted == np.array([image.name for image in test])))


def ms_per_image(encoder: ImagenetEncoder, images: Sequence[EntityImage], batch_size: int) -> float:
    """Preprocessing and the network, on one thread (the pictures are decoded beforehand)."""
    pictures = [read_rgb(image.path) for image in images]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        encoder.feature_grid(pictures[:batch_size], grid=2, batch_size=batch_size)  # warm-up
        started = time.perf_counter()
        encoder.feature_grid(pictures, grid=2, batch_size=batch_size)
        return 1000 * (time.perf_counter() - started) / len(pictures)
    finally:
        torch.set_num_threads(threads)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache-dir", type=Path, default=None, help="default: taskvec's cache directory")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--timing-images", type=int, default=64)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cache_dir = args.cache_dir or cache_root() / "imagenet-features"
    encoder = ImagenetEncoder.load()
    train, test = split_by_style(entity_images())

    started = time.monotonic()
    pooled, grid = lite0_features(encoder, cache_dir, grid=1), lite0_features(encoder, cache_dir, grid=2)
    sources: dict[str, tuple[Features, ...]] = {"lite0 pooled": (pooled,), "lite0 2x2 grid": (grid,)}
    print(f"features ready in {time.monotonic() - started:.0f} s ({cache_dir})")
    sources["picture colours 8x8"] = (tower_features(cache_dir, slice(FEATURE_CHANNELS, None)),)
    sources["the default VLM's tower"] = (tower_features(cache_dir, slice(None)),)

    header = f"{'features':<28}" + "".join(f"{KIND[family]:>8}" for family in FAMILIES)
    print(f"\nheld-out style (Noto) accuracy of a linear probe on the name\n{header}")
    for label, features in sources.items():
        row = [
            probe_accuracy(
                features,
                [image for image in train if image.family == family],
                [image for image in test if image.family == family],
            )
            for family in FAMILIES
        ]
        print(f"{label:<28}" + "".join(f"{100 * value:>7.0f}%" for value in row))
    timed = test[: args.timing_images]
    print(f"\nlite0 on one core: {ms_per_image(encoder, timed, batch_size=32):.0f} ms per image")


if __name__ == "__main__":
    main()
