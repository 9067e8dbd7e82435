"""The embedded default VLM: a real LlavaForConditionalGeneration on Gemma-3-270M, trained here on CPU.

vision_tower     the frozen tower (ImageNet EfficientNet-Lite0 features + the picture's colours), registered
                 with transformers' Auto classes
imagenet_encoder EfficientNet-Lite0's weights, preprocessing and a feature cache
architecture     assemble the Llava around a causal LM (image token, tower, projector)
processor        the LlavaProcessor (tokenizer + PIL CLIP image processor)
cached_features  the tower's tokens of every training picture, computed once
data             entity pictures, held-out styles, augmentation, captions, questions, ICL tasks
batches          tokenised batches with the loss only at answer positions
training         the two resumable stages (align, instruct)
artifacts        the shipped parts (projector, LoRA) and rebuilding from them
evaluation       recognition (naming) accuracy
recipe           train_default_vlm / load_vlm_from_parts
"""

from taskvec.vlm.architecture import IMAGE_TOKEN, assemble_llava
from taskvec.vlm.artifacts import build_vlm, export_checkpoint, save_parts
from taskvec.vlm.processor import build_processor
from taskvec.vlm.training import StageSettings, TrainConfig, train_vlm
from taskvec.vlm.vision_tower import ImagenetColourConfig

__all__ = [
    "IMAGE_TOKEN",
    "ImagenetColourConfig",
    "StageSettings",
    "TrainConfig",
    "assemble_llava",
    "build_processor",
    "build_vlm",
    "export_checkpoint",
    "save_parts",
    "train_vlm",
]
