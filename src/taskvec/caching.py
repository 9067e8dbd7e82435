"""Resumable steps: each finished step is one JSON file under DIR/cache named by a hash of its inputs.

The key of a step is built from what determines its result (model weights, task content, options,
the keys of the vectors it uses), never from the condition's name, so a changed option makes a new
file instead of reusing a stale one, and two conditions that compute the same thing share one file.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from taskvec.models import ModelHandle
from taskvec.tasks import Task

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

    def load(self, kind: str, task: str, key: str) -> dict[str, Any] | None:
        path = self.path(kind, task, key)
        if not path.is_file():
            self.misses += 1
            return None
        try:
            data: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError:  # a run killed mid-write on a file system without atomic rename
            self.misses += 1
            return None
        self.hits += 1
        return data

    def store(self, kind: str, task: str, key: str, data: Mapping[str, Any]) -> None:
        write_json_atomically(self.path(kind, task, key), data)


def write_json_atomically(path: Path, data: Any) -> None:
    """Write to a temporary file, then rename: a killed run never leaves half a JSON file behind."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(path.suffix + ".partial")
    temporary.write_text(json.dumps(data, indent=1, default=str), encoding="utf-8")
    os.replace(temporary, path)
