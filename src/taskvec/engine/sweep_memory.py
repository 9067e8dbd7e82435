"""How many of the one-pass sweep's decode rows share one copy of the prefix's KV cache.

Every decode row of the one-pass sweep needs its own copy of the prefix's cache (its patched token
writes its own keys and values above the prefix). All rows at once cost the prefix's cache times
the number of swept layers: tens of GiB for a many-shot LLaVA prompt. So the rows run in chunks,
each from a fresh repeated copy of the prefix, sized to a memory budget.
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


def chunk_size(cache: Cache, rows: int, budget: int | None) -> int:
    """Rows per chunk for repeating the one-row `cache` `rows` times within `budget` bytes.

    Without a budget: on each CUDA device the cache sits on, a fraction of that device's free
    memory (the tightest device decides); a cache wholly on the CPU runs all rows at once.
    """
    if budget is not None:
        return rows_per_chunk(cache_bytes(cache), rows, budget)
    sizes = [
        rows_per_chunk(row_bytes, rows, default_budget(device))
        for device, row_bytes in cache_bytes_by_device(cache).items()
        if device.type == "cuda"
    ]
    return min(sizes, default=rows)


def default_budget(device: torch.device) -> int:
    """The bytes one chunk's cache copies may take on a CUDA device: a fraction of its free memory."""
    free_bytes, _total = torch.cuda.mem_get_info(device)
    return int(free_bytes * DEFAULT_FREE_MEMORY_FRACTION)


def repeated_copy(cache: Cache, repeats: int) -> Cache:
    """A copy of the one-row `cache` with every row repeated `repeats` times; `cache` is unchanged.

    The copy starts out sharing the prefix's tensors, so the only new memory is the repeated rows
    `batch_repeat_interleave` allocates, not a whole extra copy of the prefix first.
    """
    prefix_tensors = {
        id(tensor): tensor for layer in _cache_layers(cache) for _, tensor in _layer_tensors(layer)
    }
    duplicate = copy.deepcopy(cache, memo=dict(prefix_tensors))
    duplicate.batch_repeat_interleave(repeats)
    # A tensor the repeat left in place (a sliding window's size, say) would still be the prefix's
    # own, and a decode step writing into it would change what every later chunk starts from.
    for layer in _cache_layers(duplicate):
        for name, tensor in list(_layer_tensors(layer)):
            if id(tensor) in prefix_tensors:
                setattr(layer, name, tensor.clone())
    return duplicate
