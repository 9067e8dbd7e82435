"""The default VLM's frozen vision tower: ImageNet features on a grid beside the picture's colours.

Each image becomes `grid * grid` tokens (4 by default). Token k is
  - its grid cell's EfficientNet-Lite0 features (ImageNet weights, frozen): the final feature map
    average-pooled to the cell, 1280 values: what is drawn there;
  - the whole picture's colours: its pixels average-pooled to `colour_side` x `colour_side` RGB
    values (8 x 8 = 192), multiplied by `colour_scale`, the same on every token: where which colour
    is. Every token carries the whole layout because LLaVA's projector reads each token alone: with
    only its own cell's colours, a token cannot tell a red-over-white flag from a white-over-red one
    (held-out flags 54-58% against 85-88% with the whole layout, in a projector-only probe;
    bench/NOTES.md). Scale 4 gives the colour values about the norm of the 1280 features.
ImageNet features lose what tells flags apart (colour and layout); the colour values keep it and
need no training, so the whole tower is frozen and its outputs can be cached for training. Only the
LLaVA projector after it is trained.

The tower is a transformers `PreTrainedModel` registered with the Auto classes under
`model_type = "taskvec_imagenet_colour"`, so a LlavaForConditionalGeneration builds it from its
config like any vision tower. Importing this module registers it; an exported checkpoint loads with
plain transformers after `import taskvec.vlm.vision_tower`.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from typing import Any

import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModel, PreTrainedConfig, PreTrainedModel
from transformers.modeling_outputs import BaseModelOutputWithPooling

from taskvec.vlm.imagenet_encoder import (
    FEATURE_CHANNELS,
    IMAGE_SIDE,
    empty_network,
    load_imagenet_weights,
    pool_grid,
)

MODEL_TYPE = "taskvec_imagenet_colour"
# Pictures whose tokens the tower remembers, by content. A run shows the same task pictures in many
# prompts (every demonstration set, seed, condition and patched row), and lite0 is most of what an
# image prompt costs on a CPU. 4,096 pictures of 4 tokens take 96 MB in fp32.
REMEMBERED_PICTURES = 4096


class ImagenetColourConfig(PreTrainedConfig):
    model_type = MODEL_TYPE

    def __init__(
        self,
        grid: int = 2,
        colour_side: int = 8,
        colour_scale: float = 4.0,
        image_size: int = IMAGE_SIDE,
        **kwargs: Any,
    ) -> None:
        self.grid = grid
        self.colour_side = colour_side
        self.colour_scale = colour_scale
        self.image_size = image_size
        # Read by LLaVA's projector: the width of one image token.
        self.hidden_size = FEATURE_CHANNELS + 3 * colour_side * colour_side
        super().__init__(**kwargs)

    @property
    def tokens_per_image(self) -> int:
        return self.grid * self.grid


class ImagenetColourTower(PreTrainedModel):
    config_class = ImagenetColourConfig
    config: ImagenetColourConfig
    main_input_name = "pixel_values"
    base_model_prefix = "encoder"

    def __init__(self, config: ImagenetColourConfig) -> None:
        super().__init__(config)
        # Kept whole on one device when a device map splits the VLM.
        self._no_split_modules = [type(self).__name__]
        self.encoder = empty_network()
        self._remembered: OrderedDict[bytes, torch.Tensor] = OrderedDict()
        self.post_init()

    def _init_weights(self, module: torch.nn.Module) -> None:
        # The network initialises itself; its real weights are loaded from the weights package or
        # from a checkpoint, never trained here.
        return

    def load_imagenet_weights(self) -> None:
        """The ImageNet weights of the installed package (weights_only, strict), frozen."""
        load_imagenet_weights(self.encoder)
        self.requires_grad_(False)
        self._remembered.clear()

    def forward(self, pixel_values: torch.Tensor, **kwargs: Any) -> BaseModelOutputWithPooling:
        """pixel_values: [batch, 3, side, side] in [-1, 1] -> tokens [batch, grid * grid, hidden].

        Without gradients and in eval mode, a picture seen before (same pixels, dtypes and device)
        takes its remembered tokens instead of a pass through lite0."""
        if self.training or torch.is_grad_enabled():
            tokens = self._tokens(pixel_values)
        else:
            tokens = self._remembered_tokens(pixel_values)
        return BaseModelOutputWithPooling(
            last_hidden_state=tokens, pooler_output=tokens.mean(dim=1), hidden_states=(tokens,)
        )

    def _tokens(self, pixel_values: torch.Tensor) -> torch.Tensor:
        config = self.config
        encoder: Any = self.encoder
        drawn = pool_grid(encoder.extract_features(pixel_values), config.grid)
        return torch.cat([drawn, picture_colours(pixel_values, config) * config.colour_scale], dim=-1)

    def _remembered_tokens(self, pixel_values: torch.Tensor) -> torch.Tensor:
        weights = next(self.encoder.parameters())
        context = f"{pixel_values.dtype} {tuple(pixel_values.shape[1:])} {weights.dtype} {weights.device}"
        keys = [_content_key(context, picture) for picture in pixel_values]
        first_of_missing = {key: row for row, key in enumerate(keys) if key not in self._remembered}
        if first_of_missing:
            rows = sorted(first_of_missing.values())
            for row, tokens in zip(rows, self._tokens(pixel_values[rows]), strict=True):
                self._remembered[keys[row]] = tokens
        for key in keys:
            self._remembered.move_to_end(key)
        stacked = torch.stack([self._remembered[key] for key in keys])
        while len(self._remembered) > REMEMBERED_PICTURES:
            self._remembered.popitem(last=False)
        return stacked


def _content_key(context: str, picture: torch.Tensor) -> bytes:
    raw = picture.detach().contiguous().view(torch.uint8).cpu().numpy().tobytes()
    return hashlib.blake2b(context.encode() + raw, digest_size=16).digest()


def picture_colours(pixel_values: torch.Tensor, config: ImagenetColourConfig) -> torch.Tensor:
    """[batch, 3, h, w] -> [batch, grid * grid, 3 * side * side]: the whole picture's side x side
    average-pooled RGB values (channel-major), repeated for each grid cell."""
    side = config.colour_side
    pooled = F.adaptive_avg_pool2d(pixel_values, side).flatten(1)
    return pooled.unsqueeze(1).expand(-1, config.tokens_per_image, -1)


AutoConfig.register(MODEL_TYPE, ImagenetColourConfig, exist_ok=True)
AutoModel.register(ImagenetColourConfig, ImagenetColourTower, exist_ok=True)
