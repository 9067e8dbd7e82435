"""The engine's numerical invariants, measured on a loaded model: each one what a test of the engine
states on tiny models (tests/test_engine.py, test_shared_prefix.py), run here on the user's model."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from taskvec.checks.measure import (
    Measurement,
    last_logits,
    layers_run,
    relative_error,
    top_token_flips,
)
from taskvec.checks.prompts import PromptSource
from taskvec.engine import (
    Patch,
    RowPatch,
    logit_lens,
    patch_at,
    patched_logits,
    record_residuals,
    sweep_layers,
)
from taskvec.engine.devices import to_module_input
from taskvec.engine.layer_outputs import last_logits_only
from taskvec.models import ModelHandle

# Two positions of each prompt: its last token, and the one before, which reaches the last through
# attention only.
RECORDED_POSITIONS = [-1, -2]
NEGATED_RESIDUAL_MOVES_AT_LEAST = 1e-3


def residuals_equal_hidden_states(prompts: PromptSource, modality: str) -> Measurement:
    """record_residuals at every layer equals output_hidden_states; the last entry of hidden_states
    is the last layer's output through the final norm."""
    handle = prompts.handle
    inputs = prompts.batch(modality)
    residuals = record_residuals(handle, inputs, RECORDED_POSITIONS)
    ran, output = layers_run(handle, inputs, output_hidden_states=True, **last_logits_only(handle.model))
    hidden_states = output.hidden_states
    if not ran or ran != sorted(set(ran)):
        return Measurement(float("inf"), broken=f"the decoder layers ran in the order {ran}, not 0..n-1")
    if len(hidden_states) != len(ran) + 1:
        return Measurement(
            float("inf"), broken=f"{len(hidden_states)} hidden states for {len(ran)} decoder layers run"
        )
    deviations = [
        relative_error(residuals[:, layer], hidden_states[entry][:, RECORDED_POSITIONS])
        for entry, layer in enumerate(ran[:-1], start=1)
    ]
    # A layer the forward skips (Mllama's cross-attention layers without images) leaves the stream
    # as it was: its residual is the layer's below.
    skipped = [layer for layer in range(handle.num_layers) if layer not in ran and layer > 0]
    deviations += [relative_error(residuals[:, layer], residuals[:, layer - 1]) for layer in skipped]
    norm = handle.final_norm
    normed = norm(to_module_input(residuals[:, ran[-1]], norm, handle.unembedding))
    deviations.append(relative_error(normed, hidden_states[-1][:, RECORDED_POSITIONS]))
    worst = max(range(len(deviations)), key=deviations.__getitem__)
    where = "the final norm of the last layer" if worst == len(deviations) - 1 else f"entry {worst + 1}"
    return Measurement(max(deviations), f"{len(ran)} layers run, worst at {where}")


def own_value_patch_changes_nothing(prompts: PromptSource, modality: str) -> Measurement:
    """Replacing residuals by their own recorded values (the last token, and the one before, which
    reaches the last through attention only) changes no logit, while another value at the same place
    does change them (else patches would not reach the model)."""
    handle = prompts.handle
    inputs = prompts.query(modality)
    ran, _ = layers_run(handle, inputs)
    layer = ran[(len(ran) - 1) // 2]  # a layer this prompt runs (Mllama skips some without images)
    own = record_residuals(handle, inputs, RECORDED_POSITIONS, layers=[layer])[:, 0]
    clean = last_logits(handle, inputs, every_position=True)
    patches = [Patch(layer, own[:, index], position) for index, position in enumerate(RECORDED_POSITIONS)]
    with patch_at(handle, patches):
        patched = last_logits(handle, inputs, every_position=True)
    with patch_at(handle, [Patch(layer, -own[:, 0], -1)]):
        changed = last_logits(handle, inputs)
    deviation = relative_error(patched, clean)
    moved = relative_error(changed, clean)
    # Negating the last token's residual moves its logits by about their own size (1.3 to 6 on the
    # tiny families and the default models); a patch that reaches nothing moves them by nothing.
    if moved < NEGATED_RESIDUAL_MOVES_AT_LEAST:
        return Measurement(
            deviation,
            broken=f"the negated residual moved the logits by {moved:.1e} only: patches do not land",
        )
    return Measurement(deviation, f"layer {layer}, last two tokens; a different value moves them {moved:.1e}")


def _naive_rows(
    handle: ModelHandle, alone: Sequence[dict[str, Any]], rows: Sequence[RowPatch], columns: Sequence[int]
) -> torch.Tensor:
    """Each row by a full forward of its prompt alone, its patch at its column counted from the end."""
    logits = []
    for row in rows:
        inputs = alone[row.query]
        patches = []
        if row.layer is not None and row.vector is not None:
            patches = [Patch(row.layer, row.vector, columns[row.query], row.mode, row.scale)]
        with patch_at(handle, patches):
            logits.append(last_logits(handle, inputs, every_position=True)[0])
    return torch.stack(logits)


def sweep_equals_naive_loop(
    prompts: PromptSource, modality: str, layers: Sequence[int] | None = None
) -> Measurement:
    """The layer sweep (one pass where the family allows it) equals a full forward per patched layer:
    logits within the tolerance and the same top token at every layer (a tie excepted)."""
    handle = prompts.handle
    inputs = prompts.query(modality)
    vectors = prompts.source_vectors
    chosen = list(range(handle.num_layers)) if layers is None else list(layers)
    fast = sweep_layers(handle, inputs, vectors, layers=chosen)
    naive = sweep_layers(handle, inputs, vectors, layers=chosen, method="naive")
    flips = top_token_flips(fast, naive)
    if flips:
        return Measurement(
            relative_error(fast, naive),
            broken=f"the top token differs at layer(s) {[chosen[row] for row in flips]}",
        )
    return Measurement(relative_error(fast, naive), f"{len(chosen)} layers, same top token at each")


def shared_prefix_rows_equal_prompts_alone(
    prompts: PromptSource, modality: str, layers: Sequence[int] | None = None
) -> Measurement:
    """Rows of one shared prefix pass over a mixed-length batch, patched at each prompt's answer marker,
    equal full forwards of each prompt alone under the same patch."""
    handle = prompts.handle
    batch, alone = prompts.batch(modality), prompts.alone(modality)
    vectors = prompts.source_vectors
    chosen = [0, handle.num_layers // 2, handle.num_layers - 1] if layers is None else list(layers)
    rows = [RowPatch(query) for query in range(len(alone))]
    rows += [RowPatch(query, layer, vectors[layer]) for query in range(len(alone)) for layer in chosen]
    columns = prompts.patch_columns(batch)
    shared = patched_logits(handle, batch, rows, patch_columns=columns)
    length = batch["input_ids"].shape[1]
    naive = _naive_rows(handle, alone, rows, [column - length for column in columns])
    flips = top_token_flips(shared, naive)
    if flips:
        return Measurement(relative_error(shared, naive), broken=f"the top token differs in rows {flips}")
    return Measurement(relative_error(shared, naive), f"{len(rows)} rows of {len(alone)} prompts")


def padded_batch_equals_prompts_alone(prompts: PromptSource, modality: str) -> Measurement:
    """A left-padded batch of prompts of different lengths gives each prompt's last logits as the
    prompt run alone does."""
    handle = prompts.handle
    batch, alone = prompts.batch(modality), prompts.alone(modality)
    mask = batch.get("attention_mask")
    if mask is None or bool(mask.all()):
        return Measurement(float("inf"), broken="the prompts were not padded to one length")
    together = last_logits(handle, batch)
    each = torch.cat([last_logits(handle, inputs) for inputs in alone])
    padding = int((mask == 0).sum(dim=1).max())
    return Measurement(relative_error(together, each), f"{len(alone)} prompts, up to {padding} pad tokens")


def lens_of_last_layer_equals_logits(prompts: PromptSource, modality: str) -> Measurement:
    """The logit lens of the last layer's residual equals the model's own logits."""
    handle = prompts.handle
    inputs = prompts.batch(modality)
    residual = record_residuals(handle, inputs, -1)[:, -1, 0]
    return Measurement(relative_error(logit_lens(handle, residual), last_logits(handle, inputs)))
