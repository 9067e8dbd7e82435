"""How the checks compare: a relative error per row, and one forward pass of the model as it is."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from taskvec.engine.layer_outputs import last_logits_only
from taskvec.models import ModelHandle


@dataclass(frozen=True)
class Measurement:
    """What one check measured: the deviation compared with the tolerance, and a note for the table.

    `broken` fails the check whatever the deviation (a patch that changes nothing, a layer that ran
    out of order): something the deviation alone cannot show.
    """

    deviation: float
    detail: str = ""
    broken: str | None = None


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """The largest, over rows (every dimension but the last), of |actual - expected| / |expected|."""
    actual_rows = actual.detach().float().cpu().reshape(-1, actual.shape[-1])
    expected_rows = expected.detach().float().cpu().reshape(-1, expected.shape[-1])
    if actual_rows.shape != expected_rows.shape:
        raise ValueError(f"shapes differ: {tuple(actual.shape)} against {tuple(expected.shape)}")
    errors = (actual_rows - expected_rows).norm(dim=-1) / expected_rows.norm(dim=-1).clamp_min(1e-12)
    return float(errors.max())


@torch.no_grad()
def full_forward(handle: ModelHandle, inputs: dict[str, Any], **kwargs: Any) -> Any:
    """The model's own forward pass, no cache: what every engine path is compared with."""
    return handle.model(**inputs, use_cache=False, **kwargs)


def last_logits(handle: ModelHandle, inputs: dict[str, Any], *, every_position: bool = False) -> torch.Tensor:
    """[batch, vocab] float32 on the CPU: the logits at the last column.

    Only that column is unembedded unless `every_position`: a model asked for the last position only
    may skip earlier positions in its top layers (Gemma 4's shared-KV layers), where a patch at an
    earlier position would then be lost.
    """
    keep = {} if every_position else last_logits_only(handle.model)
    return full_forward(handle, inputs, **keep).logits[:, -1].float().cpu()


def top_token_flips(fast: torch.Tensor, naive: torch.Tensor) -> list[int]:
    """Rows whose top token differs beyond a tie: the naive row's own logit of the fast path's top
    token is further below its top logit than the largest difference between the two rows."""
    flips = []
    for row, (fast_row, naive_row) in enumerate(zip(fast.float(), naive.float(), strict=True)):
        fast_top, naive_top = int(fast_row.argmax()), int(naive_row.argmax())
        if fast_top == naive_top:
            continue
        gap = float(naive_row[naive_top] - naive_row[fast_top])
        if gap > float((fast_row - naive_row).abs().max()):
            flips.append(row)
    return flips


def layers_run(handle: ModelHandle, inputs: dict[str, Any], **kwargs: Any) -> tuple[list[int], Any]:
    """A full forward, and the decoder layers it ran in the order it ran them (a model may skip
    some: Mllama's cross-attention layers on a prompt without images)."""
    ran: list[int] = []
    hooks = [
        layer.register_forward_hook(lambda _m, _a, _o, index=index: ran.append(index))
        for index, layer in enumerate(handle.layers)
    ]
    try:
        output = full_forward(handle, inputs, **kwargs)
    finally:
        for hook in hooks:
            hook.remove()
    return ran, output
