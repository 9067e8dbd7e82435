"""Decode rows that skip the decoder layers their patch overwrites.

A decode row that recomputes one token (the prompt's last) and replaces its residual at the output of
layer l discards what layers 0..l computed for that token; the layers above read the prompt from the
cache. So its first-token answer needs only layers l+1.. . Skipping is not free: rows that skip
different numbers of layers run as separate calls, and each call reads the weights of every layer it
runs. Rows are therefore grouped by a cost model, one call per group: a group's cost is the layers it
runs times (its rows plus the rows whose arithmetic costs one read of a layer's weights).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch

from taskvec.models.devices import execution_device
from taskvec.models.handle import ModelHandle

# Rows of one decode call whose arithmetic costs about one read of a layer's weights. A GPU streams
# weights far slower than it multiplies (~150 bf16 FLOPs per byte on an A100), so below ~128 rows a
# call is bound by the weight read and skipping layers in separate calls would cost more than it
# saves; a CPU is bound by the arithmetic, and a few rows pay for one more call's overhead.
ROWS_PER_WEIGHT_READ: dict[str, int] = {"cpu": 8, "cuda": 128}
DEFAULT_ROWS_PER_WEIGHT_READ = 128


def skippable_layers(
    handle: ModelHandle, layers: Sequence[int | None], replaces: Sequence[bool], one_token: bool
) -> list[int]:
    """Per row, how many of the first decoder layers its first-token answer does not need.

    `layers[i]` is row i's patched layer (None: unpatched), `replaces[i]` whether its patch replaces
    the residual; `one_token` says whether the decode step recomputes the last token only.
    """
    if not one_token or not handle.architecture.skips_lower_layers:
        return [0] * len(layers)
    count = len(handle.layers)
    return [
        layer % count + 1 if layer is not None and replace else 0
        for layer, replace in zip(layers, replaces, strict=True)
    ]


def skip_groups(skippable: Sequence[int], layers: int, rows_per_read: int) -> list[tuple[int, list[int]]]:
    """Rows (indices into `skippable`) grouped into decode calls, each with the layers it skips.

    A group skips the fewest layers any of its rows may skip. The grouping minimises the summed
    cost (layers run x (rows + rows_per_read)) over groups of consecutive skip counts, exactly.
    """
    members: dict[int, list[int]] = {}
    for index, count in enumerate(skippable):
        members.setdefault(count, []).append(index)
    counts = sorted(members)
    sizes = [len(members[count]) for count in counts]
    # best[i]: the cheapest grouping of the first i skip counts; cut[i]: where its last group starts.
    best = [0.0] + [float("inf")] * len(counts)
    cut = [0] * (len(counts) + 1)
    for end in range(1, len(counts) + 1):
        for start in range(end):
            cost = best[start] + (layers - counts[start]) * (sum(sizes[start:end]) + rows_per_read)
            if cost < best[end]:
                best[end], cut[end] = cost, start
    groups: list[tuple[int, list[int]]] = []
    end = len(counts)
    while end > 0:
        start = cut[end]
        groups.append((counts[start], [index for count in counts[start:end] for index in members[count]]))
        end = start
    return groups[::-1]


def rows_per_weight_read(handle: ModelHandle) -> int:
    device = execution_device(handle.layers[-1])
    kind = device.type if device is not None else "cpu"
    return ROWS_PER_WEIGHT_READ.get(kind, DEFAULT_ROWS_PER_WEIGHT_READ)


@contextmanager
def skipping_layers(handle: ModelHandle, count: int) -> Iterator[None]:
    """Decoder layers 0..count-1 hand their input on unchanged; their forward hooks (patches) still run."""
    skipped = list(handle.layers[:count])
    # An instance attribute shadows the class's forward; accelerate's device hooks set one of their own.
    own_forwards = [layer.__dict__.get("forward") for layer in skipped]
    for layer in skipped:
        layer.forward = _pass_hidden_on
    try:
        yield
    finally:
        for layer, own in zip(skipped, own_forwards, strict=True):
            if own is None:
                del layer.forward
            else:
                layer.forward = own


def _pass_hidden_on(*args: Any, **kwargs: Any) -> torch.Tensor:
    hidden: torch.Tensor = args[0] if args else kwargs["hidden_states"]
    return hidden
