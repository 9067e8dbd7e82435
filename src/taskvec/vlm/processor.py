"""The embedded VLM's processor: a plain LlavaProcessor (tokenizer + PIL CLIP image processor).

Images are resized to 224 x 224 (PIL bicubic) without keeping the aspect ratio and without a centre
crop: a centre crop would cut the sides off flags (3:2, 2:1), and many flags differ only there. Then
(x - 0.5) / 0.5, what EfficientNet-Lite0's ImageNet weights were trained with; the result equals
`imagenet_encoder.preprocess`. No torchvision is needed (CLIPImageProcessorPil).
"""

from __future__ import annotations

from typing import Any

import transformers
from PIL import Image

from taskvec.vlm.architecture import IMAGE_TOKEN, add_image_token
from taskvec.vlm.vision_tower import ImagenetColourConfig


def image_processor_for(tower: ImagenetColourConfig) -> Any:
    side = tower.image_size
    return transformers.CLIPImageProcessorPil(
        size={"height": side, "width": side},
        resample=Image.Resampling.BICUBIC,
        do_center_crop=False,
        crop_size={"height": side, "width": side},
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
        do_convert_rgb=True,
    )


def build_processor(tokenizer: Any, tower: ImagenetColourConfig | None = None) -> transformers.LlavaProcessor:
    """A LlavaProcessor expanding each IMAGE_TOKEN into exactly `tower.tokens_per_image` tokens."""
    tower = tower or ImagenetColourConfig()
    add_image_token(tokenizer)
    # Left padding keeps every prompt's last token at position -1, where the engine patches and reads.
    tokenizer.padding_side = "left"
    return transformers.LlavaProcessor(
        image_processor=image_processor_for(tower),
        tokenizer=tokenizer,
        # One token per grid cell: the processor counts (side / patch_size)^2 tokens per image.
        patch_size=tower.image_size // tower.grid,
        num_additional_image_tokens=0,
        vision_feature_select_strategy="full",
        image_token=IMAGE_TOKEN,
    )
