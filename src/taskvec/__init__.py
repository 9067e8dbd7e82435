"""taskvec: task vectors in vision-language models and language models."""

from taskvec.version import __version__

# The default VLM's package registers its name with `load_model`; importing it here makes the name
# known wherever taskvec is used, without `models` importing the package built on top of it.
from taskvec.vlm import recipe as _default_vlm  # noqa: F401

__all__ = ["__version__"]
