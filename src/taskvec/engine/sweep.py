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
from transformers.cache_utils import Cache

from taskvec.engine.decode_positions import last_token_position_ids
from taskvec.engine.devices import to_cpu_float32
from taskvec.engine.layer_outputs import last_logits_only
from taskvec.engine.lens import logit_lens
from taskvec.engine.patching import Patch, PatchMode, patch_at
from taskvec.engine.sweep_memory import chunk_size, repeated_copy
from taskvec.engine.truncated_forward import run_to_last_layer
from taskvec.models.handle import ModelHandle

SweepMethod = Literal["auto", "one_pass", "batched", "naive"]


def _is_token_aligned(value: Any, input_ids: torch.Tensor) -> bool:
    # Token-aligned side inputs (attention_mask, token_type_ids, mm_token_type_ids, Fuyu's
    # image_patches_indices, Mllama's [batch, tokens, images, tiles] cross_attention_mask) are
    # integer tensors that start with input_ids' [batch, tokens]; pixels are floats, and per-image
    # integer tensors (grids, sizes, aspect ratios) list fewer images than the prompt has tokens.
    return (
        isinstance(value, torch.Tensor)
        and value.dim() >= 2
        and value.shape[:2] == input_ids.shape
        and not value.is_floating_point()
    )


def _token_columns(inputs: dict[str, Any], columns: slice) -> dict[str, Any]:
    """The inputs with every token-aligned tensor cut to `columns` of the sequence."""
    input_ids = inputs["input_ids"]

    def cut(key: str, value: Any) -> Any:
        if key == "position_ids" and isinstance(value, torch.Tensor):
            return value[..., columns]  # [batch, tokens], or mrope's [3, batch, tokens]
        return value[:, columns] if _is_token_aligned(value, input_ids) else value

    return {key: cut(key, value) for key, value in inputs.items()}


def _without_left_padding(inputs: dict[str, Any]) -> dict[str, Any]:
    input_ids = inputs["input_ids"]
    if input_ids.shape[0] != 1:
        raise ValueError(f"a layer sweep takes one prompt, got a batch of {input_ids.shape[0]}")
    mask = inputs.get("attention_mask")
    if mask is None or bool(mask.all()):
        return inputs
    return _token_columns(inputs, slice(int(mask[0].nonzero()[0]), None))


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
    None allows half the free memory of the GPU the cache is on, or all layers at once on the CPU.
    The budget moves the logits only by rounding: a matrix product rounds differently for different
    numbers of rows.
    """
    inputs = _without_left_padding(inputs)
    chosen = list(range(handle.num_layers)) if layers is None else [i % handle.num_layers for i in layers]
    per_layer = _vector_per_layer(vectors, chosen, handle.num_layers)
    if method == "auto":
        method = "one_pass" if _one_pass_reason_against(handle) is None else "batched"
    if method == "one_pass":
        reason = _one_pass_reason_against(handle)
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


def _one_pass_reason_against(handle: ModelHandle) -> str | None:
    """Why the one-pass sweep would not equal a full forward on this family, or None if it does."""
    architecture = handle.architecture
    if architecture.bidirectional_prompt:
        return "attends bidirectionally within the prompt"
    if not architecture.cached_step:
        return "has no exact decode step on a cached prefix (cached_step=False in the table)"
    return None


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
    input_ids = inputs["input_ids"]
    if input_ids.shape[1] < 2:
        return _sweep_batched(handle, inputs, layers, vectors, mode, scale)
    _, cache = run_to_last_layer(handle, {**_token_columns(inputs, slice(None, -1)), "use_cache": True})
    if cache is None:
        raise RuntimeError(f"{handle.architecture.model_class} passed no KV cache to its decoder layers")
    rows = len(layers)
    size = chunk_size(cache, rows, memory_budget)
    positions = last_token_position_ids(handle, inputs, rows)
    last_residuals = []
    for start in range(0, rows, size):
        stop = min(start + size, rows)
        if stop < rows:
            chunk_cache = repeated_copy(cache, stop - start)
        else:  # nothing needs the prefix after the last chunk, so it repeats the cache itself
            cache.batch_repeat_interleave(stop - start)
            chunk_cache = cache
        last_residuals.append(
            _decode_rows(
                handle,
                inputs,
                chunk_cache,
                positions[..., start:stop, :],
                _row_patches(layers[start:stop], vectors[start:stop], mode, scale),
            )
        )
        del chunk_cache  # frees this chunk's copies before the next chunk makes its own
    # One lens for all rows: it reads the whole unembedding, the largest matrix of many models.
    return logit_lens(handle, torch.cat(last_residuals))


def _decode_rows(
    handle: ModelHandle,
    inputs: dict[str, Any],
    cache: Cache,
    position_ids: torch.Tensor,
    patches: list[Patch],
) -> torch.Tensor:
    """The last decoder layer's output [rows, hidden] at the prompt's last token, decoded once per
    row of the repeated cache, row i under patches[i]."""
    input_ids = inputs["input_ids"]
    rows = len(patches)
    step_inputs = {
        **_decode_step_extras(inputs, rows),
        "input_ids": input_ids[:, -1:].expand(rows, -1),
        "attention_mask": torch.ones(rows, input_ids.shape[1], dtype=torch.long, device=input_ids.device),
        "position_ids": position_ids,
        "cache": cache,
        "use_cache": True,
    }
    with patch_at(handle, patches):
        last_residuals, _ = run_to_last_layer(handle, step_inputs)
    return last_residuals


def _decode_step_extras(inputs: dict[str, Any], rows: int) -> dict[str, Any]:
    """The last token's column of token-aligned side inputs (e.g. token_type_ids), one per row."""
    input_ids = inputs["input_ids"]
    skip = {"input_ids", "attention_mask", "position_ids"}
    last_columns = {
        key: value[:, -1:]
        for key, value in inputs.items()
        if key not in skip and _is_token_aligned(value, input_ids)
    }
    return {key: column.expand(rows, *column.shape[1:]) for key, column in last_columns.items()}
