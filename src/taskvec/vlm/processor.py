"""The embedded VLM's processor: a plain LlavaProcessor (tokenizer + PIL CLIP image processor).

Images are resized to the tower's square input without keeping the aspect ratio and without a centre
crop: a centre crop would cut the sides off flags (3:2, 2:1), and many flags differ only there. No
torchvision is needed (CLIPImageProcessorPil).
"""

from __future__ import annotations

from typing import Any

import transformers

from taskvec.vlm.architecture import IMAGE_TOKEN, VisionTowerShape, add_image_token

# Mean and standard deviation of CLIP's training images, as any CLIP image processor uses.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def image_processor_for(tower: VisionTowerShape) -> Any:
    side = tower.image_size
    return transformers.CLIPImageProcessorPil(
        size={"height": side, "width": side},
        do_center_crop=False,
        crop_size={"height": side, "width": side},
        image_mean=list(CLIP_MEAN),
        image_std=list(CLIP_STD),
        do_convert_rgb=True,
    )


def build_processor(tokenizer: Any, tower: VisionTowerShape | None = None) -> transformers.LlavaProcessor:
    """A LlavaProcessor expanding each IMAGE_TOKEN into exactly `tower.tokens_per_image` tokens."""
    tower = tower or VisionTowerShape()
    add_image_token(tokenizer)
    # Left padding keeps every prompt's last token at position -1, where the engine patches and reads.
    tokenizer.padding_side = "left"
    return transformers.LlavaProcessor(
        image_processor=image_processor_for(tower),
        tokenizer=tokenizer,
        patch_size=tower.patch_size,
        # The CLIP tower emits a CLS token too, which "default" selection drops again.
        num_additional_image_tokens=1,
        vision_feature_select_strategy="default",
        image_token=IMAGE_TOKEN,
    )
