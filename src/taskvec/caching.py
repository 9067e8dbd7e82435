"""Resumable steps: each finished step is one JSON file under DIR/cache named by a hash of its inputs.

The key of a step is built from what determines its result (model weights, task content, options,
the keys of the vectors it uses), never from the condition's name, so a changed option makes a new
file instead of reusing a stale one, and two conditions that compute the same thing share one file.

A cached file that cannot be used (not UTF-8, not JSON, not the shape its step writes, a truncated
safetensors file) is a miss: the step is computed again and overwrites it, with a
`CacheEntryWarning` naming the file. Every file is written whole or not at all (`atomic_files`).
"""

from __future__ import annotations

import hashlib
import json
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import torch
from safetensors import SafetensorError, safe_open

from taskvec.atomic_files import write_json_atomically
from taskvec.models import ModelHandle
from taskvec.tasks import Task
from taskvec.typed_json import from_json, to_json

T = TypeVar("T")

# Bump when a change in the code makes earlier cached results wrong.
CACHE_VERSION = 1


def digest(value: Any, length: int = 16) -> str:
    """A stable hash of a JSON-able value (dict keys sorted)."""
    text = json.dumps(value, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:length]


@torch.no_grad()
def model_fingerprint(handle: ModelHandle) -> str:
    """Name, shape, image settings and a sample of the weights: two models that differ in any trained
    part differ here.

    Hashing every weight of a 270M model costs seconds; the first and last few thousand values of
    every parameter tensor are enough to tell checkpoints apart.
    """
    hasher = hashlib.sha256(f"{handle.name}|{type(handle.model).__name__}|{handle.num_layers}".encode())
    # Settings that change results without changing a weight: how images are prepared, the kernel.
    settings = {
        "images": handle.image_settings.as_record(),
        "attention": handle.metadata.get("loading", {}).get("attn_implementation"),
    }
    if settings != {"images": {"width": None, "processor_kwargs": {}}, "attention": None}:
        hasher.update(digest(settings).encode())
    for name, parameter in handle.model.named_parameters():
        if parameter.is_meta:
            # Offloaded by a device map: its values live on disk or in CPU memory behind a hook.
            hasher.update(f"{name}{tuple(parameter.shape)}{parameter.dtype}".encode())
            continue
        flat = parameter.detach().reshape(-1)
        sample = torch.cat([flat[:2048], flat[-2048:]]).float().cpu().numpy().tobytes()
        hasher.update(name.encode())
        hasher.update(sample)
    return hasher.hexdigest()[:16]


def task_fingerprint(task: Task) -> str:
    """Items, answers, splits and instruction: an edited task file is a different task."""
    content = {
        "name": task.name,
        "instruction": task.instruction,
        "items": [[item.input, item.output, list(item.aliases), sorted(item.images)] for item in task.items],
        "splits": {name: list(indices) for name, indices in sorted(task.splits.items())},
    }
    return digest(content)


class CacheEntryWarning(UserWarning):
    """A cached file that cannot be used: its step is computed again."""


def warn_unusable(path: Path, reason: str) -> None:
    # Raised here for every caller: under the "default" filter a file met twice in a process (when
    # a step is planned, then run) is named once.
    warnings.warn(f"{path}: {reason}; computing it again", CacheEntryWarning, stacklevel=1)


class StepCache:
    """JSON results of finished steps: `DIR/cache/<kind>/<task>/<key>.json`."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.hits = 0
        self.misses = 0

    def key(self, identity: Mapping[str, Any]) -> str:
        return digest({"cache_version": CACHE_VERSION, **identity})

    def path(self, kind: str, task: str, key: str) -> Path:
        return self.root / kind / task / f"{key}.json"

    def tensor_path(self, kind: str, task: str, key: str) -> Path:
        """Where a step that produces tensors keeps them: beside the JSON entries, as safetensors."""
        return self.root / kind / task / f"{key}.safetensors"

    def load(
        self, kind: str, task: str, key: str, usable: Callable[[dict[str, Any]], bool] | None = None
    ) -> dict[str, Any] | None:
        """The stored entry, or None when there is none or it cannot be used: not a readable JSON
        object, or (given `usable`) not the shape its step writes."""
        return self._load(kind, task, key, lambda data: data, usable)

    def store(self, kind: str, task: str, key: str, data: Mapping[str, Any]) -> None:
        write_json_atomically(self.path(kind, task, key), data)

    def load_typed(
        self, kind: str, task: str, key: str, cls: type[T], usable: Callable[[T], bool] | None = None
    ) -> T | None:
        """The stored entry as a `cls` (a dataclass written by `store_typed`), or None when there is
        none or it cannot be used: unreadable, not a `cls`, or (given `usable`) not the whole step."""
        return self._load(kind, task, key, lambda data: from_json(cls, data), usable)

    def _load(
        self,
        kind: str,
        task: str,
        key: str,
        convert: Callable[[dict[str, Any]], T],
        usable: Callable[[T], bool] | None,
    ) -> T | None:
        path = self.path(kind, task, key)
        data = read_json_entry(path)
        result = None
        if data is not None:
            try:
                result = convert(data)
            except ValueError as error:
                warn_unusable(path, f"not a {kind} entry ({error})")
        if result is not None and usable is not None and not usable(result):
            warn_unusable(path, f"not a complete {kind} entry")
            result = None
        if result is None:
            self.misses += 1
            return None
        self.hits += 1
        return result

    def store_typed(self, kind: str, task: str, key: str, value: object) -> None:
        write_json_atomically(self.path(kind, task, key), to_json(value))


def read_json_entry(path: Path) -> dict[str, Any] | None:
    """A cached JSON object, or None (with a warning naming the file when it exists but is unusable)."""
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        warn_unusable(path, f"unreadable ({type(error).__name__}: {error})")
        return None
    if not isinstance(data, dict):
        warn_unusable(path, f"a JSON {type(data).__name__}, not an object")
        return None
    return data


def tensors_readable(path: Path) -> bool:
    """Whether a safetensors file exists and its header fits its size (a truncated file does not);
    warns when it exists but does not. Reads the header only."""
    if not path.is_file():
        return False
    try:
        with safe_open(str(path), framework="pt"):
            return True
    except (SafetensorError, OSError) as error:
        warn_unusable(path, f"not a readable safetensors file ({error})")
        return False


def read_tensors(path: Path) -> dict[str, torch.Tensor] | None:
    """A cached safetensors file's tensors, or None (with a warning when it exists but is unreadable)."""
    stored = read_tensor_file(path)
    return stored[0] if stored is not None else None


def read_tensor_file(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]] | None:
    """A cached safetensors file's tensors and header metadata, or None (with a warning when it
    exists but is unreadable)."""
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as handle:
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118
            return tensors, dict(handle.metadata() or {})
    except (SafetensorError, OSError) as error:
        warn_unusable(path, f"not a readable safetensors file ({error})")
        return None
