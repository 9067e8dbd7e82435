"""A task vector (one residual per layer) with the metadata needed to reproduce it."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from taskvec.version import __version__


@dataclass
class TaskVector:
    vectors: torch.Tensor  # [num_layers, hidden]
    metadata: dict[str, Any] = field(default_factory=dict)

    def at(self, layer: int) -> torch.Tensor:
        return self.vectors[layer]


def save_task_vector(vector: TaskVector, path: str | Path) -> Path:
    """Safetensors with the metadata as JSON in the header (never pickle)."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    metadata = {"taskvec_version": __version__, **vector.metadata}
    save_file(
        {"vectors": vector.vectors.contiguous().float()},
        str(target),
        metadata={"taskvec": json.dumps(metadata)},
    )
    return target


def load_task_vector(path: str | Path) -> TaskVector:
    source = Path(path)
    if not source.is_file():
        raise FileNotFoundError(f"no task vector file at {source}")
    with safe_open(str(source), framework="pt") as handle:
        if "vectors" not in handle.keys():  # noqa: SIM118 (safe_open has no __contains__)
            raise ValueError(f"{source} holds no 'vectors' tensor: not a taskvec task vector")
        metadata = json.loads((handle.metadata() or {}).get("taskvec", "{}"))
        return TaskVector(handle.get_tensor("vectors"), metadata)
