"""taskvec: task vectors in vision-language models and language models."""

from taskvec.version import __version__

__all__ = ["__version__"]
