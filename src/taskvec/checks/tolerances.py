"""The one table of tolerances the checks compare their deviations with, per precision.

A deviation is a relative error: |a - b| / |b| of a row (logits, residuals or an attention output
at one position), the largest row. Position ids and the text after the answer marker compare
exactly, whatever the precision.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch

from taskvec.models import ModelHandle

Precision = Literal["fp32", "bf16", "fp16", "4bit", "8bit"]


@dataclass(frozen=True)
class Tolerances:
    """The largest relative error (|a - b| / |b| of a row, the largest row) each floating-point
    comparison accepts. Position ids and the answer marker are compared exactly, whatever the dtype."""

    residuals: float
    patch: float
    sweep: float
    shared_prefix: float
    padded_batch: float
    lens: float
    heads: float
    attention_norm: float


# How the table was derived. Correct code: every check of the full set ran on every tiny family of
# the table (tests/tiny_models.py, text and image prompts) in fp32, bf16 and fp16 (fp16 without the
# Gemma families, which overflow it), on the default LM (Gemma-3-270M) in fp32 and bf16, on the
# default VLM in fp32, and on a 4-bit NF4 Llama (bf16 compute), all on the CPU (1 and 2 threads).
# Largest deviations, fp32 / bf16 / fp16 (where from):
#   residuals, own-value patch, attention norm: 0 / 0 / 0 (the same tensors, a value written back);
#   sweep: 1.6e-6 (default LM and VLM) / 1.5e-2 (default LM) / 5.6e-4;
#   shared-prefix rows: 2.7e-6 (default LM) / 2.0e-2 (default LM) / 8.4e-4;
#   padded batch: 1.9e-6 (default LM) / 6.0e-2 (tiny Gemma 4) / 8.9e-4;
#   lens: 3.4e-7 / 1.2e-3 / 0;  heads: 2.7e-7 (default VLM) / 3.7e-3 / 4.6e-4.
# Broken code (tests/test_checks.py: the wrong layer path, right padding, a patch one layer late, a
# lens without the final norm) deviates by 0.265 at the least (right padding, the tiny Gemma 2) and
# by the same in fp32 and bf16. Each tolerance is the geometric mean of the two, sqrt(largest
# correct x 0.265), rounded up to 1, 2 or 5 x 10^k: as far, in ratio, from what correct code shows
# as from what broken code shows. A correct deviation below the dtype's unit roundoff counts as
# that roundoff (fp32 6e-8, bf16 3.9e-3, fp16 4.9e-4), so a GPU kernel that sums in another order
# passes a check that measured 0 here.
# 4-bit computes in bf16 or fp16 on dequantized weights, the same on both sides of a comparison (the
# NF4 Llama measured 3.5e-3 / 5.3e-3 / 4.7e-3 / 2.6e-3 for the sweep, rows, batch and heads, under
# bf16's): it takes the bf16 row, the looser of its compute dtypes. 8-bit (fp16 compute around int8
# products) could not be measured here (bitsandbytes has no CPU int8 kernels): it takes the same.
FP32 = Tolerances(
    residuals=2e-4,
    patch=2e-4,
    sweep=1e-3,
    shared_prefix=1e-3,
    padded_batch=1e-3,
    lens=5e-4,
    heads=5e-4,
    attention_norm=2e-4,
)
BF16 = Tolerances(
    residuals=5e-2,
    patch=5e-2,
    sweep=1e-1,
    shared_prefix=1e-1,
    padded_batch=2e-1,
    lens=5e-2,
    heads=5e-2,
    attention_norm=5e-2,
)
FP16 = Tolerances(
    residuals=2e-2,
    patch=2e-2,
    sweep=2e-2,
    shared_prefix=2e-2,
    padded_batch=2e-2,
    lens=2e-2,
    heads=2e-2,
    attention_norm=2e-2,
)
TOLERANCES: dict[Precision, Tolerances] = {
    "fp32": FP32,
    "bf16": BF16,
    "fp16": FP16,
    "4bit": BF16,
    "8bit": BF16,
}
# Exact comparisons: position ids differ by no id, the text after the marker by no character.
EXACT = 0.0
# The sweep's cache copies may take up to the whole budget.
MEMORY_BUDGET_SHARE = 1.0


def _quantization(model: torch.nn.Module) -> str | None:
    config: Any = getattr(getattr(model, "config", None), "quantization_config", None)
    if config is None:
        return None
    read = config.get if isinstance(config, dict) else lambda key: getattr(config, key, None)
    if read("load_in_4bit"):
        return "4bit"
    if read("load_in_8bit"):
        return "8bit"
    return None


def precision_of(handle: ModelHandle) -> Precision:
    """The row of the table a model is checked by: its quantization, else its compute dtype."""
    quantization = _quantization(handle.model)
    if quantization == "4bit":
        return "4bit"
    if quantization == "8bit":
        return "8bit"
    by_dtype: dict[torch.dtype, Precision] = {torch.bfloat16: "bf16", torch.float16: "fp16"}
    return by_dtype.get(handle.dtype, "fp32")
