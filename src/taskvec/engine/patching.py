"""Patch the residual stream: replace or add a vector at (layer, position), per batch row."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

import torch

from taskvec.engine.layer_outputs import hidden_from_output, output_with_hidden
from taskvec.models.handle import ModelHandle

PatchMode = Literal["replace", "add"]


class PatchShapeError(ValueError):
    """A patch vector's width is not the model's hidden size."""


@dataclass(frozen=True)
class Patch:
    """One intervention on the output of decoder layer `layer`.

    `vector` is [hidden] (same for every row) or [rows, hidden]. `position` is one index for every row
    (negative counts from the end, so -1 is the last token of a left-padded batch) or one per row.
    `rows` limits the patch to some batch rows; with a per-row vector, its rows follow `rows`.
    """

    layer: int
    vector: torch.Tensor
    position: int | Sequence[int] = -1
    mode: PatchMode = "replace"
    scale: float = 1.0
    rows: Sequence[int] | None = None

    def apply(self, hidden: torch.Tensor) -> torch.Tensor:
        """The layer output `hidden` [batch, length, hidden] with this patch applied (a new tensor).

        The vector moves to the layer output's device and dtype: with a device map each layer runs
        on its own device, and a bf16 model must not turn its residual stream into float32.
        """
        batch, length, width = hidden.shape
        if self.vector.shape[-1] != width:
            raise PatchShapeError(
                f"a patch vector of {self.vector.shape[-1]} values cannot go into layer {self.layer}, "
                f"whose residual stream is {width} wide (a vector of another model?)"
            )
        rows = torch.arange(batch) if self.rows is None else torch.as_tensor(list(self.rows))
        if isinstance(self.position, int):
            positions = torch.full((len(rows),), self.position)
        else:
            positions = torch.as_tensor(list(self.position))
        positions = torch.where(positions < 0, positions + length, positions)
        if bool(((positions < 0) | (positions >= length)).any()):
            raise IndexError(f"patch position {self.position} outside a sequence of {length} tokens")
        rows, positions = rows.to(hidden.device), positions.to(hidden.device)
        # Scaled before rounding to the model's dtype, so a bf16 model sees one rounding, not two.
        scaled = self.vector.to(device=hidden.device, dtype=torch.float32) * self.scale
        vector = scaled.to(hidden.dtype)
        vector = vector.expand(len(rows), -1) if vector.dim() == 1 else vector
        patched = hidden.clone()
        if self.mode == "replace":
            patched[rows, positions] = vector
        elif self.mode == "add":
            patched[rows, positions] = hidden[rows, positions] + vector
        else:
            raise ValueError(f"unknown patch mode {self.mode!r}; use 'replace' or 'add'")
        return patched


@contextmanager
def patch_at(handle: ModelHandle, patches: Sequence[Patch], first_call_only: bool = False) -> Iterator[None]:
    """Apply the patches to every forward pass inside the block.

    With `first_call_only`, each layer is patched on its first call only: in cached generation that
    is the prefill, so decode steps (one new token each) are never patched. Patching the prefill once
    equals re-patching a cache-free recomputation at every step, because the patched position's
    effect reaches later tokens only through the keys and values the cache already holds.
    """
    layers = handle.layers
    by_layer: dict[int, list[Patch]] = {}
    for patch in patches:
        if not -len(layers) <= patch.layer < len(layers):
            raise IndexError(f"layer {patch.layer} out of range for a model with {len(layers)} layers")
        by_layer.setdefault(patch.layer % len(layers), []).append(patch)
    handles = []
    for index, layer_patches in by_layer.items():
        calls = {"count": 0}

        def hook(
            _module: Any,
            _args: Any,
            output: Any,
            layer_patches: list[Patch] = layer_patches,
            calls: dict[str, int] = calls,
        ) -> Any:
            calls["count"] += 1
            if first_call_only and calls["count"] > 1:
                return output
            hidden = hidden_from_output(output)
            for patch in layer_patches:
                hidden = patch.apply(hidden)
            return output_with_hidden(output, hidden)

        handles.append(layers[index].register_forward_hook(hook))
    try:
        yield
    finally:
        for registered in handles:
            registered.remove()
