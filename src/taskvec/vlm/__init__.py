"""The embedded default VLM: a real LlavaForConditionalGeneration on Gemma-3-270M, trained here on CPU.

architecture  assemble the Llava around a causal LM (image token, vision tower shape)
processor     the LlavaProcessor (tokenizer + PIL CLIP image processor)
data          entity pictures, held-out styles, augmentation, captions and questions
batches       tokenised batches with the loss only at answer positions
training      the three resumable stages (align, caption, instruct)
artifacts     the shipped parts (vision tower, projector, LoRA) and rebuilding from them
evaluation    recognition (naming) accuracy
recipe        train_default_vlm / load_vlm_from_parts
"""

from taskvec.vlm.architecture import IMAGE_TOKEN, VisionTowerShape, assemble_llava
from taskvec.vlm.artifacts import build_vlm, export_checkpoint, save_parts
from taskvec.vlm.processor import build_processor
from taskvec.vlm.training import StageSettings, TrainConfig, train_vlm

__all__ = [
    "IMAGE_TOKEN",
    "StageSettings",
    "TrainConfig",
    "VisionTowerShape",
    "assemble_llava",
    "build_processor",
    "build_vlm",
    "export_checkpoint",
    "save_parts",
    "train_vlm",
]
