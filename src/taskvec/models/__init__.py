"""Model adapters: one explicit table entry per architecture family, and loading."""

from taskvec.models.architectures import (
    ARCHITECTURES,
    ArchitectureSpec,
    UnsupportedArchitectureError,
    spec_for_class,
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
    "ArchitectureSpec",
    "MissingImageError",
    "ModelHandle",
    "PromptTooLongError",
    "UnsupportedArchitectureError",
    "load_model",
    "spec_for_class",
    "supported_classes",
]
