"""The engine: record residuals and attention heads, patch, sweep layers, generate, logit lens. It knows
nothing of tasks."""

from taskvec.engine.attention_residual import attention_output_gate, attention_output_norm, heads_in_residual
from taskvec.engine.generation import generate_greedy, generate_greedy_ids
from taskvec.engine.heads import (
    AttentionOutputNotFoundError,
    HeadLayout,
    HeadPatch,
    HeadShapeError,
    attention_output,
    head_contribution,
    head_layout,
    patch_heads,
    record_heads,
)
from taskvec.engine.lens import logit_lens, top_tokens
from taskvec.engine.patching import Patch, PatchMode, patch_at
from taskvec.engine.positions import AnswerMarkerNotFoundError, find_marker_positions, marker_position
from taskvec.engine.residuals import record_residuals
from taskvec.engine.shared_prefix import RowPatch, patched_greedy_ids, patched_logits
from taskvec.engine.sweep import SweepMethod, sweep_layers

__all__ = [
    "AnswerMarkerNotFoundError",
    "AttentionOutputNotFoundError",
    "HeadLayout",
    "HeadPatch",
    "HeadShapeError",
    "Patch",
    "PatchMode",
    "RowPatch",
    "SweepMethod",
    "attention_output",
    "attention_output_gate",
    "attention_output_norm",
    "find_marker_positions",
    "generate_greedy",
    "generate_greedy_ids",
    "head_contribution",
    "head_layout",
    "heads_in_residual",
    "logit_lens",
    "marker_position",
    "patch_at",
    "patch_heads",
    "patched_greedy_ids",
    "patched_logits",
    "record_heads",
    "record_residuals",
    "sweep_layers",
    "top_tokens",
]
