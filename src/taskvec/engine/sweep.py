"""Layer sweeps: the last position's logits with a vector patched at each layer in turn.

Patching the last position at layer L changes nothing before it, and (attention being causal) no
earlier position above it. So one clean pass over the prompt minus its last token gives a KV cache
that every patched variant shares; each variant then recomputes just one token. The "batched" path
runs the whole prompt once per layer as one batch (row i patched at layer i), and "naive" is the
plain loop of one full forward pass per layer that the others are tested against.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch

from taskvec.engine.layer_outputs import last_logits_only
from taskvec.engine.lens import logit_lens
from taskvec.engine.patching import Patch, PatchMode, patch_at
from taskvec.engine.truncated_forward import run_to_last_layer
from taskvec.models.handle import ModelHandle, resolve_attribute

SweepMethod = Literal["auto", "one_pass", "batched", "naive"]


def _is_sequence_aligned(value: Any, input_ids: torch.Tensor) -> bool:
    # Token-aligned side inputs (attention_mask, token_type_ids, mm_token_type_ids, Fuyu's
    # image_patches_indices) are integer tensors shaped exactly like input_ids; pixels are floats.
    return (
        isinstance(value, torch.Tensor) and value.shape == input_ids.shape and not value.is_floating_point()
    )


def _without_left_padding(inputs: dict[str, Any]) -> dict[str, Any]:
    input_ids = inputs["input_ids"]
    if input_ids.shape[0] != 1:
        raise ValueError(f"a layer sweep takes one prompt, got a batch of {input_ids.shape[0]}")
    mask = inputs.get("attention_mask")
    if mask is None or bool(mask.all()):
        return inputs
    start = int(mask[0].nonzero()[0])
    return {
        key: value[:, start:] if _is_sequence_aligned(value, input_ids) else value
        for key, value in inputs.items()
    }


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
) -> torch.Tensor:
    """Logits [len(layers), vocab] at the last position of one prompt, patched at each layer.

    `vectors` is one vector for every layer ([hidden]) or one per model layer ([num_layers, hidden]),
    as extracted task vectors are.
    """
    inputs = _without_left_padding(inputs)
    chosen = list(range(handle.num_layers)) if layers is None else [i % handle.num_layers for i in layers]
    per_layer = _vector_per_layer(vectors, chosen, handle.num_layers)
    if method == "auto":
        method = "batched" if handle.architecture.bidirectional_prompt else "one_pass"
    if method == "one_pass":
        if handle.architecture.bidirectional_prompt:
            raise ValueError(
                f"{handle.architecture.family} attends bidirectionally within the prompt, so the "
                "one-pass sweep does not apply; use method='batched' or 'auto'"
            )
        return _sweep_one_pass(handle, inputs, chosen, per_layer, mode, scale)
    if method == "batched":
        return _sweep_batched(handle, inputs, chosen, per_layer, mode, scale)
    if method == "naive":
        return _sweep_naive(handle, inputs, chosen, per_layer, mode, scale)
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
) -> torch.Tensor:
    input_ids = inputs["input_ids"]
    length = input_ids.shape[1]
    if length < 2:
        return _sweep_batched(handle, inputs, layers, vectors, mode, scale)
    prefix = {
        key: value[:, :-1] if _is_sequence_aligned(value, input_ids) else value
        for key, value in inputs.items()
    }
    _, cache = run_to_last_layer(handle, {**prefix, "use_cache": True})
    if cache is None:
        raise RuntimeError(f"{handle.architecture.model_class} passed no KV cache to its decoder layers")
    rows = len(layers)
    cache.batch_repeat_interleave(rows)
    step_inputs = {
        "input_ids": input_ids[:, -1:].expand(rows, -1),
        "attention_mask": torch.ones(rows, length, dtype=torch.long, device=input_ids.device),
        "past_key_values": cache,
        "cache_position": torch.tensor([length - 1], device=input_ids.device),
        "position_ids": _last_token_positions(handle, length, rows).to(input_ids.device),
        "use_cache": True,
        **_decode_step_extras(inputs, rows),
    }
    with patch_at(handle, _row_patches(layers, vectors, mode, scale)):
        last_residuals, _ = run_to_last_layer(handle, step_inputs)
    return logit_lens(handle, last_residuals)


def _decode_step_extras(inputs: dict[str, Any], rows: int) -> dict[str, Any]:
    """The last token's column of token-aligned side inputs (e.g. token_type_ids), one per row."""
    input_ids = inputs["input_ids"]
    skip = {"input_ids", "attention_mask", "position_ids"}
    return {
        key: value[:, -1:].expand(rows, -1)
        for key, value in inputs.items()
        if key not in skip and _is_sequence_aligned(value, input_ids)
    }


def _last_token_positions(handle: ModelHandle, length: int, rows: int) -> torch.Tensor:
    """Position ids of the last token for a hand-built decode step (no padding: see sweep_layers)."""
    if handle.architecture.position_style == "mrope":
        # Qwen2-VL numbers text after an image from the image's grid; the prefill stored the offset.
        path = handle.architecture.rope_deltas_path
        assert path is not None, "the architecture table requires rope_deltas_path for mrope"
        rope_deltas: torch.Tensor = resolve_attribute(handle.model, path)
        return (length - 1 + rope_deltas.reshape(1, -1, 1)[:, :1]).expand(3, rows, 1)
    return torch.full((rows, 1), length - 1, dtype=torch.long)
