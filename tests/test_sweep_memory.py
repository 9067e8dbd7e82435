"""The one-pass sweep under a memory budget: the same logits for every chunk size, and no chunk
decoding more rows (so holding more copies of the prompt's cache) than its budget allows."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import pytest
import torch
from conftest import random_image, tiny_handle
from tiny_models import FAMILIES, VLM_FAMILIES
from transformers.cache_utils import DynamicCache

from taskvec.engine import sweep_layers, sweep_memory
from taskvec.engine.layer_outputs import hidden_from_output
from taskvec.engine.sweep_memory import cache_bytes, chunk_size, repeated_copy, rows_per_chunk
from taskvec.models import ModelHandle

CASES = [(family, False) for family in FAMILIES] + [(family, True) for family in VLM_FAMILIES]
CASE_IDS = [f"{family}-{'image' if images else 'text'}" for family, images in CASES]
CHUNK_SIZES = (1, 2, 3)


def test_rows_per_chunk() -> None:
    assert rows_per_chunk(100, 18, None) == 18
    assert rows_per_chunk(100, 18, 10**12) == 18
    assert rows_per_chunk(100, 18, 450) == 4
    assert rows_per_chunk(100, 18, 400) == 4
    assert rows_per_chunk(100, 18, 99) == 1, "a budget below one row still runs one row"
    assert rows_per_chunk(100, 18, 0) == 1
    assert rows_per_chunk(0, 18, 1) == 18, "an empty cache costs nothing to repeat"
    with pytest.raises(ValueError, match="at least one row"):
        rows_per_chunk(100, 0, None)


def two_layer_cache() -> DynamicCache:
    cache = DynamicCache()
    for layer in range(2):
        keys = torch.arange(2 * 3 * 4, dtype=torch.float32).reshape(1, 2, 3, 4) + layer
        cache.update(keys, -keys, layer)
    return cache


def test_cache_bytes_counts_every_layers_keys_and_values() -> None:
    assert cache_bytes(two_layer_cache()) == 2 * 2 * (2 * 3 * 4) * 4
    assert cache_bytes(DynamicCache()) == 0


def test_repeated_copy_leaves_the_prefix_unchanged() -> None:
    cache = two_layer_cache()
    before = [(layer.keys.clone(), layer.values.clone()) for layer in cache.layers]
    copied = repeated_copy(cache, 3)
    for layer, (keys, values) in zip(copied.layers, before, strict=True):
        assert torch.equal(layer.keys, keys.repeat(3, 1, 1, 1))
        assert torch.equal(layer.values, values.repeat(3, 1, 1, 1))
    copied.update(torch.ones(3, 2, 1, 4), torch.ones(3, 2, 1, 4), 0)  # a decode step's write
    for layer, (keys, values) in zip(cache.layers, before, strict=True):
        assert torch.equal(layer.keys, keys) and torch.equal(layer.values, values)


def test_a_cache_on_the_cpu_gets_a_fixed_budget_by_default() -> None:
    assert chunk_size(two_layer_cache(), 18, None) == 18
    assert chunk_size(two_layer_cache(), 18, cache_bytes(two_layer_cache()) * 5) == 5
    row = cache_bytes(two_layer_cache())
    assert chunk_size(two_layer_cache(), 10**9, None) == sweep_memory.DEFAULT_CPU_BUDGET // row


def test_a_cache_of_several_prompts_counts_one_prompts_row_per_decode_row() -> None:
    cache = two_layer_cache()
    cache.batch_repeat_interleave(4)
    assert chunk_size(cache, 18, cache_bytes(two_layer_cache()) * 5, cache_rows=4) == 5


def test_a_cache_on_gpus_takes_half_the_free_memory_of_the_tightest_by_default(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    free_bytes = {0: 1000, 1: 4000}
    by_device = {torch.device("cuda:0"): 100, torch.device("cuda:1"): 100, torch.device("cpu"): 10**9}
    monkeypatch.setattr(sweep_memory, "cache_bytes_by_device", lambda _cache: by_device)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (free_bytes[device.index], 10**12))
    assert chunk_size(two_layer_cache(), 18, None) == 5, "half of cuda:0's 1000 free bytes, 100 a row"


def query(handle: ModelHandle, with_images: bool) -> dict[str, Any]:
    if with_images:
        return handle.build_inputs(["Q:<image>\nA:"], [[random_image(5)]])
    return handle.build_inputs(["Q:France\nA:Paris\n\nQ:Spain\nA:"])


def layer_always_run(handle: ModelHandle) -> torch.nn.Module:
    # Mllama skips its cross-attention layers on a prompt without images.
    skipped = set(getattr(handle.text_config, "cross_attention_layers", None) or ())
    return next(layer for index, layer in enumerate(handle.layers) if index not in skipped)


@contextlib.contextmanager
def rows_per_call(handle: ModelHandle) -> Iterator[list[int]]:
    """The batch size of every forward through a decoder layer, in call order."""
    rows: list[int] = []

    def record(_module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        hidden = args[0] if args else kwargs["hidden_states"]
        rows.append(int(hidden.shape[0]))

    hook = layer_always_run(handle).register_forward_pre_hook(record, with_kwargs=True)
    try:
        yield rows
    finally:
        hook.remove()


@contextlib.contextmanager
def last_layer_outputs(handle: ModelHandle) -> Iterator[list[torch.Tensor]]:
    """The last decoder layer's output at the last position of every forward, in call order."""
    outputs: list[torch.Tensor] = []

    def record(_module: Any, _args: Any, output: Any) -> None:
        outputs.append(hidden_from_output(output)[:, -1].clone())

    hook = handle.layers[-1].register_forward_hook(record)
    try:
        yield outputs
    finally:
        hook.remove()


@contextlib.contextmanager
def recorded_row_bytes() -> Iterator[list[int]]:
    """What the sweep measured one copy of the prompt's cache at, for each budgeted sweep."""
    measured: list[int] = []
    original = sweep_memory.cache_bytes

    def spy(cache: Any) -> int:
        measured.append(original(cache))
        return measured[-1]

    with pytest.MonkeyPatch.context() as patcher:
        patcher.setattr(sweep_memory, "cache_bytes", spy)
        yield measured


@pytest.mark.parametrize(("family", "with_images"), CASES, ids=CASE_IDS)
def test_budgeted_sweeps_equal_unchunked_sweeps_of_their_chunks(
    family: str, with_images: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    handle = tiny_handle(family)
    if not handle.architecture.cached_step or handle.architecture.bidirectional_prompt:
        pytest.skip(f"{family} sweeps by the batched path (no one-pass sweep to chunk)")
    # Every row in one call per chunk; rows skipping layers in calls of their own: test_shared_prefix.
    monkeypatch.setattr(handle, "architecture", replace(handle.architecture, skips_lower_layers=False))
    inputs = query(handle, with_images)
    vectors = torch.randn(handle.num_layers, handle.hidden_size, generator=torch.Generator().manual_seed(0))
    unchunked = sweep_layers(handle, inputs, vectors, method="one_pass")
    with recorded_row_bytes() as measured:
        one_chunk = sweep_layers(handle, inputs, vectors, method="one_pass", memory_budget=2**62)
    assert torch.equal(one_chunk, unchunked)
    (row_bytes,) = measured
    assert row_bytes > 0
    rows = handle.num_layers
    for size in (*CHUNK_SIZES, rows):
        with rows_per_call(handle) as calls, last_layer_outputs(handle) as decoded:
            chunked = sweep_layers(handle, inputs, vectors, method="one_pass", memory_budget=size * row_bytes)
        # One forward over the prompt, then one decode step per chunk, none wider than the chunk.
        assert calls == [1] + [min(size, rows - start) for start in range(0, rows, size)], f"chunks of {size}"
        if size >= rows:
            assert torch.equal(chunked, unchunked)
        else:
            assert_each_chunk_equals_its_own_sweep(handle, inputs, vectors, decoded[1:], size)
        torch.testing.assert_close(chunked, unchunked, atol=1e-6, rtol=1e-5)
    naive = sweep_layers(handle, inputs, vectors, method="naive")
    torch.testing.assert_close(unchunked, naive, atol=1e-4, rtol=1e-4)


def assert_each_chunk_equals_its_own_sweep(
    handle: ModelHandle,
    inputs: dict[str, Any],
    vectors: torch.Tensor,
    decoded_chunks: list[torch.Tensor],
    size: int,
) -> None:
    """Chunk by chunk, the budgeted sweep's decode steps equal unchunked sweeps of just those layers.

    A float32 matrix product's rounding depends on how many rows it multiplies (MKL picks its kernel
    by that, and on several threads splits the rows by it), so a chunk of 2 rows and the 4-row whole
    agree only to rounding; a sweep of the same rows alone is what a chunk must equal exactly. The
    sweep's lens runs once over all rows, so chunks are compared on the decode steps' residuals. The
    later chunks matching a fresh sweep also shows no chunk changed the prefix's cache for the next.
    """
    rows = handle.num_layers
    starts = range(0, rows, size)
    assert len(decoded_chunks) == len(starts)
    for start, decoded in zip(starts, decoded_chunks, strict=True):
        chunk = list(range(start, min(start + size, rows)))
        with last_layer_outputs(handle) as alone:
            sweep_layers(handle, inputs, vectors, layers=chunk, method="one_pass")
        assert torch.equal(decoded, alone[-1]), f"chunks of {size}, rows {chunk}"
