"""taskvec: task vectors in vision-language models and language models."""

__version__ = "0.1.0"
