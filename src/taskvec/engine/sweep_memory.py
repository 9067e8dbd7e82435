"""How many decode rows of a shared prefix pass run at once, each with its own copy of its prompt's cache.

Every decode row needs its own copy of its prompt's KV cache (its patched tokens write their own
keys and values above the prefix). All rows at once cost the prefix's cache times the number of
rows: tens of GiB for a layer sweep of a many-shot LLaVA prompt. So the rows run in chunks, each
from a fresh copy of the rows it needs, sized to a memory budget.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from typing import Any

import torch
from transformers.cache_utils import Cache

# Of the free memory on a GPU the cache lives on, what the copies of one chunk may take by default:
# the decode step's activations and the allocator's fragmentation need the rest.
DEFAULT_FREE_MEMORY_FRACTION = 0.5
# A cache on the CPU gets a fixed budget, not a share of free RAM, so that which rows share a decode
# step (and so how a matrix product rounds) does not depend on what else the machine runs.
DEFAULT_CPU_BUDGET = 2 * 2**30
SWEEP_MEMORY_HELP = (
    "bytes the decode rows of a shared prefix pass (one per query and patched layer) may take in "
    "copies of the prompts' KV cache at once, e.g. 8GiB or 500MB; rows are decoded in chunks that "
    "fit, at least one at a time. Unset: half the free GPU memory; 2 GiB on the CPU"
)


def rows_per_chunk(row_bytes: int, rows: int, budget: int | None) -> int:
    """How many rows, each needing `row_bytes` of cache, fit in `budget` bytes (None: no limit).

    Never fewer than one (a budget below one row still has to run that row) nor more than `rows`.
    """
    if rows < 1:
        raise ValueError(f"a sweep has at least one row, got {rows}")
    if budget is None or row_bytes <= 0:
        return rows
    return max(1, min(rows, budget // row_bytes))


def _cache_layers(cache: Cache) -> Iterator[Any]:
    """The cache's layer objects, including those of nested caches (encoder-decoder self and cross)."""
    for value in vars(cache).values():
        if isinstance(value, Cache):
            yield from _cache_layers(value)
    yield from getattr(cache, "layers", ())


def _layer_tensors(layer: Any) -> Iterator[tuple[str, torch.Tensor]]:
    for name, value in vars(layer).items():
        if isinstance(value, torch.Tensor):
            yield name, value


def cache_bytes_by_device(cache: Cache) -> dict[torch.device, int]:
    """The bytes of the cache's keys and values on each device they sit on."""
    totals: dict[torch.device, int] = {}
    for layer in _cache_layers(cache):
        for name in ("keys", "values"):
            tensor = getattr(layer, name, None)
            if isinstance(tensor, torch.Tensor):
                totals[tensor.device] = totals.get(tensor.device, 0) + tensor.nbytes
    return totals


def cache_bytes(cache: Cache) -> int:
    """The bytes of every layer's keys and values: what one more copy of the cache costs."""
    return sum(cache_bytes_by_device(cache).values())


def chunk_size(cache: Cache, rows: int, budget: int | None, cache_rows: int = 1) -> int:
    """Rows per chunk for decoding `rows` rows, each from a copy of one of the `cache_rows` rows of
    `cache`, within `budget` bytes.

    Without a budget: on each CUDA device the cache sits on, a fraction of that device's free
    memory (the tightest device decides); a cache wholly on the CPU gets `DEFAULT_CPU_BUDGET`.
    """
    if budget is not None:
        return rows_per_chunk(cache_bytes(cache) // cache_rows, rows, budget)
    by_device = cache_bytes_by_device(cache)
    sizes = [
        rows_per_chunk(row_bytes // cache_rows, rows, default_budget(device))
        for device, row_bytes in by_device.items()
        if device.type == "cuda"
    ]
    if sizes:
        return min(sizes)
    return rows_per_chunk(sum(by_device.values()) // cache_rows, rows, DEFAULT_CPU_BUDGET)


def default_budget(device: torch.device) -> int:
    """The bytes one chunk's cache copies may take on a CUDA device: a fraction of its free memory."""
    free_bytes, _total = torch.cuda.mem_get_info(device)
    return int(free_bytes * DEFAULT_FREE_MEMORY_FRACTION)


def repeated_copy(cache: Cache, repeats: int) -> Cache:
    """A copy of the one-row `cache` with every row repeated `repeats` times; `cache` is unchanged."""
    return _copy_with(cache, lambda duplicate: duplicate.batch_repeat_interleave(repeats))


def selected_copy(cache: Cache, rows: torch.Tensor) -> Cache:
    """A copy of `cache` holding its batch rows `rows` (repeats allowed, in that order); `cache` is
    unchanged."""
    return _copy_with(cache, lambda duplicate: select_cache_rows(duplicate, rows))


def select_cache_rows(cache: Cache, rows: torch.Tensor) -> None:
    """Keep `cache`'s batch rows `rows` (in place), indexed on each layer's own device."""
    for layer in _cache_layers(cache):
        for name in ("keys", "values"):
            tensor = getattr(layer, name, None)
            if isinstance(tensor, torch.Tensor) and tensor.dim() > 0:
                setattr(layer, name, tensor.index_select(0, rows.to(tensor.device)))


def _copy_with(cache: Cache, reshape: Any) -> Cache:
    # The copy starts out sharing the prefix's tensors, so the only new memory is the rows the
    # reshape allocates, not a whole extra copy of the prefix first.
    prefix_tensors = {
        id(tensor): tensor for layer in _cache_layers(cache) for _, tensor in _layer_tensors(layer)
    }
    duplicate = copy.deepcopy(cache, memo=dict(prefix_tensors))
    reshape(duplicate)
    # A tensor the reshape left in place (a sliding window's size, say) would still be the prefix's
    # own, and a decode step writing into it would change what every later chunk starts from.
    for layer in _cache_layers(duplicate):
        for name, tensor in list(_layer_tensors(layer)):
            if id(tensor) in prefix_tensors:
                setattr(layer, name, tensor.clone())
    return duplicate
