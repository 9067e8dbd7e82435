"""The default VLM's vision tower: frozen ImageNet features on a grid beside the picture's colours.

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
        self.post_init()

    def _init_weights(self, module: torch.nn.Module) -> None:
        # The network initialises itself; its real weights are loaded from the weights package or
        # from a checkpoint, never trained here.
        return

    def load_imagenet_weights(self) -> None:
        """The ImageNet weights of the installed package (weights_only, strict), frozen."""
        load_imagenet_weights(self.encoder)
        self.requires_grad_(False)

    def forward(self, pixel_values: torch.Tensor, **kwargs: Any) -> BaseModelOutputWithPooling:
        """pixel_values: [batch, 3, side, side] in [-1, 1] -> tokens [batch, grid * grid, hidden]."""
        config = self.config
        encoder: Any = self.encoder
        drawn = pool_grid(encoder.extract_features(pixel_values), config.grid)
        tokens = torch.cat([drawn, picture_colours(pixel_values, config) * config.colour_scale], dim=-1)
        return BaseModelOutputWithPooling(
            last_hidden_state=tokens, pooler_output=tokens.mean(dim=1), hidden_states=(tokens,)
        )


def picture_colours(pixel_values: torch.Tensor, config: ImagenetColourConfig) -> torch.Tensor:
    """[batch, 3, h, w] -> [batch, grid * grid, 3 * side * side]: the whole picture's side x side
    average-pooled RGB values (channel-major), repeated for each grid cell."""
    side = config.colour_side
    pooled = F.adaptive_avg_pool2d(pixel_values, side).flatten(1)
    return pooled.unsqueeze(1).expand(-1, config.tokens_per_image, -1)


AutoConfig.register(MODEL_TYPE, ImagenetColourConfig, exist_ok=True)
AutoModel.register(ImagenetColourConfig, ImagenetColourTower, exist_ok=True)
