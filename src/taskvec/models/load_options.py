"""How a model is loaded: source revision, device, dtype, device map, quantization, image settings.

One dataclass serves `load_model`, every command's flags (through `taskvec.options`) and the record
of a run, so an option is named, typed and documented once.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Any, Literal

from taskvec.options import at_least, option

DType = Literal["auto", "fp32", "bf16", "fp16"]
Quantization = Literal["4bit", "8bit"]


def parse_processor_kwargs(text: str) -> str:
    """Validate a JSON object of processor keyword arguments; kept as text so options stay hashable."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(
            f"processor kwargs must be a JSON object, e.g. '{{\"max_pixels\": 50176}}': {error}"
        ) from None
    if not isinstance(value, dict):
        raise ValueError(f"processor kwargs must be a JSON object, got {type(value).__name__}")
    return text


@dataclass(frozen=True)
class LoadOptions:
    """Everything `load_model` needs besides the model's name; every field is a command-line flag."""

    revision: str | None = option(None, "hub revision of --model: a branch, tag or commit")
    device: str = option("auto", "torch device: 'auto' is cuda when available, else cpu")
    dtype: DType = option("auto", "weights dtype: 'auto' is bf16 on a GPU and fp32 on the CPU")
    device_map: str | None = option(
        None, "spread the model over devices through accelerate: 'auto' uses every visible GPU"
    )
    quantization: Quantization | None = option(
        None, "load the weights in 4-bit NF4 or 8-bit through bitsandbytes (pip install -e '.[gpu]')"
    )
    attn_implementation: str | None = option(None, "attention kernel: eager, sdpa, flash_attention_2, ...")
    trust_remote_code: bool = option(False, "run Python code shipped with a checkpoint (off unless asked)")
    processor_kwargs: str | None = option(
        None,
        "JSON object of processor arguments for images, over the family's defaults "
        "(`taskvec models` lists them), e.g. '{\"do_image_splitting\": true}'",
        parse=parse_processor_kwargs,
        metavar="JSON",
    )
    image_width: int | None = option(
        None,
        "resize every image to this width, keeping its aspect, before the processor; "
        "unset: 224 as in the paper (the default VLM keeps its training size); 0: never resize",
        parse=at_least(0),
    )

    def processor_overrides(self) -> dict[str, Any]:
        return json.loads(self.processor_kwargs) if self.processor_kwargs else {}

    def as_record(self) -> dict[str, Any]:
        return asdict(self)
