"""A task vector (one residual per layer) with the metadata needed to reproduce it, and its file.

A vector file is safetensors holding one tensor, "vectors" [layers, hidden], and the metadata as JSON
under the header key "taskvec" (never pickle). A file that is missing, unreadable, without that
metadata or of the wrong shape raises `VectorFileError` naming the file; so does a vector used with a
model of another depth or width (`check_vector_fits`), or a layer that neither has.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError, safe_open

from taskvec.atomic_files import write_tensors_atomically
from taskvec.version import __version__

if TYPE_CHECKING:
    from taskvec.models import ModelHandle

TENSOR_KEY = "vectors"
METADATA_KEY = "taskvec"


class VectorFileError(ValueError):
    """A task vector file that cannot be used: missing, corrupt, without taskvec metadata, of the
    wrong shape, not fitting the model it is used with, or asked for a layer it does not have."""


class MissingVectorFileError(VectorFileError, FileNotFoundError):
    """No task vector file at the path."""


@dataclass
class TaskVector:
    vectors: torch.Tensor  # [num_layers, hidden]
    metadata: dict[str, Any] = field(default_factory=dict)

    def at(self, layer: int) -> torch.Tensor:
        return self.vectors[layer]

    @property
    def num_layers(self) -> int:
        return int(self.vectors.shape[0])

    @property
    def hidden_size(self) -> int:
        return int(self.vectors.shape[1])


def save_task_vector(vector: TaskVector, path: str | Path) -> Path:
    """Safetensors with the metadata as JSON in the header (never pickle), written whole or not at all."""
    target = Path(path)
    metadata = {"taskvec_version": __version__, **vector.metadata}
    write_tensors_atomically(
        target, {TENSOR_KEY: vector.vectors.float()}, {METADATA_KEY: json.dumps(metadata)}
    )
    return target


def load_task_vector(path: str | Path) -> TaskVector:
    """The vector saved at `path` by `save_task_vector`; VectorFileError naming the file otherwise."""
    source = Path(path)
    if not source.is_file():
        raise MissingVectorFileError(f"no task vector file at {source}")
    try:
        with safe_open(str(source), framework="pt") as handle:
            if TENSOR_KEY not in handle.keys():  # noqa: SIM118 (safe_open has no __contains__)
                found = ", ".join(handle.keys()) or "none"
                raise VectorFileError(
                    f"{source}: no {TENSOR_KEY!r} tensor (tensors: {found}): not a taskvec task vector"
                )
            metadata = parse_metadata(handle.metadata(), source)
            vectors = handle.get_tensor(TENSOR_KEY)
    except (SafetensorError, OSError) as error:
        raise VectorFileError(f"{source}: not a readable safetensors file ({error})") from None
    check_vector_tensor(vectors, source)
    return TaskVector(vectors, metadata)


def parse_metadata(header: dict[str, str] | None, source: Path) -> dict[str, Any]:
    text = (header or {}).get(METADATA_KEY)
    if text is None:
        raise VectorFileError(
            f"{source}: no {METADATA_KEY!r} metadata in the safetensors header: not written by "
            "taskvec.vectors.save_task_vector (or `taskvec extract`)"
        )
    try:
        metadata = json.loads(text)
    except json.JSONDecodeError as error:
        raise VectorFileError(f"{source}: malformed {METADATA_KEY!r} metadata: {error.msg}") from None
    if not isinstance(metadata, dict):
        kind = type(metadata).__name__
        raise VectorFileError(f"{source}: {METADATA_KEY!r} metadata must be a JSON object, got {kind}")
    return metadata


def check_vector_tensor(vectors: torch.Tensor, source: Path) -> None:
    shape = " x ".join(str(size) for size in vectors.shape) or "a scalar"
    if vectors.dim() != 2 or 0 in vectors.shape:
        raise VectorFileError(f"{source}: vectors of shape {shape}, expected layers x hidden")
    if not vectors.is_floating_point():
        raise VectorFileError(f"{source}: vectors of dtype {vectors.dtype}, expected floating point")
    if not bool(torch.isfinite(vectors).all()):
        raise VectorFileError(f"{source}: vectors hold NaN or infinite values")


def describe_shape(layers: int, hidden: int) -> str:
    return f"{layers} layer{'s' * (layers != 1)} x {hidden}"


def vector_name(path: str | Path | None) -> str:
    return str(path) if path is not None else "the vector"


def check_layers(vector: TaskVector, layers: Iterable[int], path: str | Path | None = None) -> None:
    """Each layer indexes the vector (negative counts from the top, as in Python)."""
    count = vector.num_layers
    for layer in layers:
        if not -count <= layer < count:
            raise VectorFileError(
                f"layer {layer} out of range: {vector_name(path)} holds "
                f"{describe_shape(count, vector.hidden_size)} (layers 0-{count - 1}, or -{count} to -1)"
            )


def check_vector_fits(
    vector: TaskVector, handle: ModelHandle, path: str | Path | None = None, *, layers: Iterable[int] = ()
) -> None:
    """The vector has one residual of the model's width per decoder layer of the model, and each of
    `layers` is one of them; VectorFileError naming the file, both shapes and the model otherwise.

    Only the shape is checked: a vector of another model of the same shape (an LM's vector patched
    into the VLM built on it) is a use, not an error."""
    model_shape = (handle.num_layers, handle.hidden_size)
    if (vector.num_layers, vector.hidden_size) != model_shape:
        source = f" (extracted from {vector.metadata['model']})" if vector.metadata.get("model") else ""
        raise VectorFileError(
            f"{vector_name(path)} holds {describe_shape(vector.num_layers, vector.hidden_size)}"
            f"{source} but {handle.name} has {describe_shape(*model_shape)}"
        )
    check_layers(vector, layers, path)
