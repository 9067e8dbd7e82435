"""Layer sweeps: the last position's logits with a vector patched at each layer in turn.

Patching the last position at layer L changes nothing before it, and (attention being causal) no
earlier position above it. So one clean pass over the prompt minus its last token gives a KV cache
that every patched variant shares; each variant then recomputes just one token. The "batched" path
runs the whole prompt once per layer as one batch (row i patched at layer i), and "naive" is the
plain loop of one full forward pass per layer that the others are tested against.

Each decode row needs its own copy of the shared cache, so the one-pass rows run in chunks that
keep those copies within a memory budget (`taskvec.engine.sweep_memory`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch

from taskvec.engine.devices import to_cpu_float32
from taskvec.engine.layer_outputs import last_logits_only
from taskvec.engine.patching import Patch, PatchMode, patch_at
from taskvec.engine.shared_prefix import RowPatch, one_pass_reason_against, patched_logits
from taskvec.engine.token_inputs import token_columns
from taskvec.models.handle import ModelHandle

SweepMethod = Literal["auto", "one_pass", "batched", "naive"]


def _without_left_padding(inputs: dict[str, Any]) -> dict[str, Any]:
    input_ids = inputs["input_ids"]
    if input_ids.shape[0] != 1:
        raise ValueError(f"a layer sweep takes one prompt, got a batch of {input_ids.shape[0]}")
    mask = inputs.get("attention_mask")
    if mask is None or bool(mask.all()):
        return inputs
    return token_columns(inputs, slice(int(mask[0].nonzero()[0]), None))


def _repeat_batch(inputs: dict[str, Any], repeats: int) -> dict[str, Any]:
    # With one prompt, per-image tensors (pixel_values, image_grid_thw, ...) list that prompt's
    # images along dim 0, so concatenating copies keeps each row's images in order.
    return {
        key: torch.cat([value] * repeats) if isinstance(value, torch.Tensor) else value
        for key, value in inputs.items()
    }


def _vector_per_layer(vectors: torch.Tensor, layers: list[int], num_layers: int) -> list[torch.Tensor]:
    if vectors.dim() == 1:
        return [vectors] * len(layers)
    if vectors.shape[0] != num_layers:
        raise ValueError(f"vectors have {vectors.shape[0]} layers, the model has {num_layers}")
    return [vectors[layer] for layer in layers]


def _row_patches(
    layers: list[int], vectors: list[torch.Tensor], mode: PatchMode, scale: float
) -> list[Patch]:
    return [
        Patch(layer, vector, -1, mode, scale, rows=[row])
        for row, (layer, vector) in enumerate(zip(layers, vectors, strict=True))
    ]


@torch.no_grad()
def sweep_layers(
    handle: ModelHandle,
    inputs: dict[str, Any],
    vectors: torch.Tensor,
    *,
    layers: Sequence[int] | None = None,
    mode: PatchMode = "replace",
    scale: float = 1.0,
    method: SweepMethod = "auto",
    memory_budget: int | None = None,
) -> torch.Tensor:
    """Logits [len(layers), vocab] (float32, on the CPU) at the last position of one prompt,
    patched at each layer.

    `vectors` is one vector for every layer ([hidden]) or one per model layer ([num_layers, hidden]),
    as extracted task vectors are. `memory_budget` (bytes) bounds the one-pass sweep's copies of the
    prompt's KV cache, one per layer decoded at a time (at least one layer at a time however small);
    None allows half the free memory of the GPU the cache is on, or 2 GiB on the CPU.
    The budget moves the logits only by rounding: a matrix product rounds differently for different
    numbers of rows.
    """
    inputs = _without_left_padding(inputs)
    chosen = list(range(handle.num_layers)) if layers is None else [i % handle.num_layers for i in layers]
    per_layer = _vector_per_layer(vectors, chosen, handle.num_layers)
    if method == "auto":
        method = "one_pass" if one_pass_reason_against(handle) is None else "batched"
    if method == "one_pass":
        reason = one_pass_reason_against(handle)
        if reason is not None:
            raise ValueError(
                f"{handle.architecture.family} {reason}, so the one-pass sweep does not apply; "
                "use method='batched' or 'auto'"
            )
        return to_cpu_float32(_sweep_one_pass(handle, inputs, chosen, per_layer, mode, scale, memory_budget))
    if method == "batched":
        return to_cpu_float32(_sweep_batched(handle, inputs, chosen, per_layer, mode, scale))
    if method == "naive":
        return to_cpu_float32(_sweep_naive(handle, inputs, chosen, per_layer, mode, scale))
    raise ValueError(f"unknown sweep method {method!r}; use auto, one_pass, batched or naive")


def _sweep_naive(
    handle: ModelHandle,
    inputs: dict[str, Any],
    layers: list[int],
    vectors: list[torch.Tensor],
    mode: PatchMode,
    scale: float,
) -> torch.Tensor:
    rows = []
    for layer, vector in zip(layers, vectors, strict=True):
        with patch_at(handle, [Patch(layer, vector, -1, mode, scale)]):
            output = handle.model(**inputs, use_cache=False, **last_logits_only(handle.model))
        rows.append(output.logits[0, -1].float())
    return torch.stack(rows)


def _sweep_batched(
    handle: ModelHandle,
    inputs: dict[str, Any],
    layers: list[int],
    vectors: list[torch.Tensor],
    mode: PatchMode,
    scale: float,
) -> torch.Tensor:
    with patch_at(handle, _row_patches(layers, vectors, mode, scale)):
        output = handle.model(
            **_repeat_batch(inputs, len(layers)), use_cache=False, **last_logits_only(handle.model)
        )
    return output.logits[:, -1].float()


def _sweep_one_pass(
    handle: ModelHandle,
    inputs: dict[str, Any],
    layers: list[int],
    vectors: list[torch.Tensor],
    mode: PatchMode,
    scale: float,
    memory_budget: int | None,
) -> torch.Tensor:
    if inputs["input_ids"].shape[1] < 2:
        return _sweep_batched(handle, inputs, layers, vectors, mode, scale)
    rows = [RowPatch(0, layer, vector, mode, scale) for layer, vector in zip(layers, vectors, strict=True)]
    return patched_logits(handle, inputs, rows, memory_budget=memory_budget)
