"""Model adapters: one explicit table entry per architecture family, and loading."""

from taskvec.models.architectures import (
    ARCHITECTURES,
    Architecture,
    UnsupportedArchitectureError,
    architecture_for_class,
    supported_classes,
)
from taskvec.models.handle import (
    IMAGE_PLACEHOLDER,
    MissingImageError,
    ModelHandle,
    PromptTooLongError,
)
from taskvec.models.loading import load_model

__all__ = [
    "ARCHITECTURES",
    "IMAGE_PLACEHOLDER",
    "Architecture",
    "MissingImageError",
    "ModelHandle",
    "PromptTooLongError",
    "UnsupportedArchitectureError",
    "architecture_for_class",
    "load_model",
    "supported_classes",
]
