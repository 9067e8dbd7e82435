"""One prefix pass for a batch of prompts and any rows of patches: each row equals a full forward of
its own prompt alone (unpadded) under its own patch, for every family, text and image prompts of
mixed lengths, patches on the last token or earlier, first tokens and longer greedy answers."""

from __future__ import annotations

import itertools
import weakref
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import pytest
import torch
from conftest import random_image, tiny_handle
from tiny_models import FAMILIES, VLM_FAMILIES

from taskvec.engine import (
    HeadPatch,
    Patch,
    generate_greedy_ids,
    head_layout,
    layer_skipping,
    patch_at,
    patch_heads,
    shared_prefix,
)
from taskvec.engine.layer_skipping import skip_groups
from taskvec.engine.positions import marker_position
from taskvec.engine.shared_prefix import RowPatch, one_pass_reason_against, patched_greedy_ids, patched_logits
from taskvec.engine.sweep_memory import cache_bytes
from taskvec.engine.token_inputs import token_columns
from taskvec.models import ModelHandle

CASES = [(family, False) for family in FAMILIES] + [(family, True) for family in VLM_FAMILIES]
CASE_IDS = [f"{family}-{'image' if images else 'text'}" for family, images in CASES]

TEXT_PROMPTS = ["Q:France\nA:", "Q:France\nA:Paris\n\nQ:Spain\nA:", "Q:the United Kingdom\nA:"]
IMAGE_PROMPTS = ["Q:<image>\nA:", "Q:what is this <image> called\nA:", "Q:<image> name\nA:"]
# Processors that append a token of their own after the prompt.
APPENDING = {"paligemma", "fuyu"}
# A prompt whose answer marker is followed by tokens (as a chat template's turn markers follow it).
TAIL = " then, in one word:"


def batch_of(
    handle: ModelHandle, with_images: bool, tail: str = ""
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The prompts as one left-padded batch, and each alone."""
    texts = [text + tail for text in (IMAGE_PROMPTS if with_images else TEXT_PROMPTS)]
    images = [[random_image(seed)] for seed in range(len(texts))] if with_images else None
    batch = handle.build_inputs(texts, images)
    alone = [
        handle.build_inputs([text], None if images is None else [images[i]]) for i, text in enumerate(texts)
    ]
    return batch, alone


def marker_columns(handle: ModelHandle, batch: dict[str, Any]) -> list[int]:
    """The column, in the left-padded batch, of each prompt's last answer marker (the rule a run uses)."""
    return [marker_position(handle.tokenizer, ids, "A:") for ids in batch["input_ids"]]


def random_vectors(handle: ModelHandle, count: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(count, handle.hidden_size, generator=torch.Generator().manual_seed(seed))


def sweep_rows(handle: ModelHandle, prompts: int) -> list[RowPatch]:
    """Every layer of every prompt with its own vector, an unpatched row, an added and a scaled row."""
    vectors = random_vectors(handle, prompts * handle.num_layers + 2)
    rows = [
        RowPatch(query, layer, vectors[query * handle.num_layers + layer])
        for query in range(prompts)
        for layer in range(handle.num_layers)
    ]
    return [
        *rows,
        RowPatch(1),
        RowPatch(0, handle.num_layers // 2, vectors[-1], mode="add", scale=3.0),
        RowPatch(2, 0, vectors[-2], scale=0.5),
    ]


def naive_logits(handle: ModelHandle, alone: dict[str, Any], row: RowPatch, column: int) -> torch.Tensor:
    """A full forward of the prompt alone, with the row's patch at `column` (counted from the end)."""
    patches = (
        []
        if row.layer is None or row.vector is None
        else [Patch(row.layer, row.vector, column, row.mode, row.scale)]
    )
    with patch_at(handle, patches):
        # All positions' logits: a model asked for the last one only may skip earlier positions in
        # its top layers (Gemma 4's shared-KV layers), where an earlier patch would then be lost.
        output = handle.model(**alone, use_cache=False)
    return output.logits[0, -1].float()


@pytest.mark.parametrize(("family", "with_images"), CASES, ids=CASE_IDS)
@pytest.mark.parametrize("tail", ["", TAIL], ids=["last-token", "tokens-follow"])
def test_every_row_equals_a_full_forward_of_its_prompt_alone(
    family: str, with_images: bool, tail: str
) -> None:
    handle = tiny_handle(family)
    batch, alone = batch_of(handle, with_images, tail)
    assert bool((batch["attention_mask"] == 0).any()), "the prompts should differ in length"
    columns = marker_columns(handle, batch)
    if not tail:
        assert (
            columns == [batch["input_ids"].shape[1] - 1] * len(columns)
            or handle.architecture.family in APPENDING
        )
    rows = sweep_rows(handle, len(alone))
    logits = patched_logits(handle, batch, rows, patch_columns=columns)
    length = batch["input_ids"].shape[1]
    expected = torch.stack(
        [naive_logits(handle, alone[row.query], row, columns[row.query] - length) for row in rows]
    )
    torch.testing.assert_close(logits, expected, atol=2e-4, rtol=1e-4)
    assert torch.equal(logits.argmax(-1), expected.argmax(-1))


@pytest.mark.parametrize(("family", "with_images"), CASES, ids=CASE_IDS)
def test_longer_answers_equal_generation_under_the_same_patch(family: str, with_images: bool) -> None:
    handle = tiny_handle(family)
    batch, alone = batch_of(handle, with_images)
    vectors = random_vectors(handle, 3, seed=1) * 4
    rows = [RowPatch(0, 1, vectors[0]), RowPatch(1), RowPatch(2, -1, vectors[1]), RowPatch(0, 0, vectors[2])]
    rows = [
        RowPatch(row.query, None if row.layer is None else row.layer % handle.num_layers, row.vector)
        for row in rows
    ]
    answers = patched_greedy_ids(handle, batch, rows, max_new_tokens=3)
    for row, answer in zip(rows, answers, strict=True):
        patches = [] if row.layer is None or row.vector is None else [Patch(row.layer, row.vector, -1)]
        expected = generate_greedy_ids(handle, alone[row.query], patches, max_new_tokens=3)[0]
        assert torch.equal(answer, expected), f"row {row}"


@pytest.mark.parametrize(("family", "with_images"), CASES, ids=CASE_IDS)
def test_chunks_of_rows_under_a_budget_change_no_answer(family: str, with_images: bool) -> None:
    handle = tiny_handle(family)
    batch, _ = batch_of(handle, with_images)
    rows = sweep_rows(handle, 3)
    whole = patched_logits(handle, batch, rows, memory_budget=2**62)
    for rows_per_chunk in (1, 5):
        chunked = patched_logits(handle, batch, rows, memory_budget=rows_per_chunk * row_bytes(handle, batch))
        torch.testing.assert_close(chunked, whole, atol=1e-5, rtol=1e-5)
        assert torch.equal(chunked.argmax(-1), whole.argmax(-1))


def row_bytes(handle: ModelHandle, batch: dict[str, Any]) -> int:
    """What one row of the batch's prefix cache costs, measured from a forward of the prefix."""
    output = handle.model(**token_columns(batch, slice(None, -1)), use_cache=True)
    cache = getattr(output, "past_key_values", None)
    if cache is None:
        pytest.skip(f"{handle.architecture.family} returns no cache from a forward")
    return max(1, cache_bytes(cache) // batch["input_ids"].shape[0])


def test_a_patch_column_on_padding_is_refused() -> None:
    handle = tiny_handle("llama")
    batch, _ = batch_of(handle, False)
    with pytest.raises(IndexError, match="not one of its"):
        patched_logits(handle, batch, [RowPatch(0, 0, random_vectors(handle, 1)[0])], patch_columns=[0, 0, 0])


def test_a_row_with_a_layer_needs_a_vector() -> None:
    with pytest.raises(ValueError, match="both a layer and a vector"):
        RowPatch(0, 3)


@pytest.mark.parametrize("family", FAMILIES)
def test_rows_replacing_the_last_token_skip_the_layers_below_their_patch(
    family: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    handle = tiny_handle(family)
    batch, _ = batch_of(handle, False)
    rows = sweep_rows(handle, 3)
    # Every skip count in a call of its own (no weight-read cost to merge calls for).
    monkeypatch.setitem(layer_skipping.ROWS_PER_WEIGHT_READ, "cpu", 0)
    rows_through, logits = rows_through_each_layer(handle, batch, rows)
    skips = handle.architecture.skips_lower_layers and one_pass_reason_against(handle) is None
    monkeypatch.setattr(handle, "architecture", replace(handle.architecture, skips_lower_layers=False))
    all_rows_through, unskipped = rows_through_each_layer(handle, batch, rows)
    torch.testing.assert_close(logits, unskipped, atol=2e-5, rtol=1e-5)
    if not skips:
        assert rows_through == all_rows_through
        return
    for layer, count in enumerate(rows_through):
        if all_rows_through[layer]:  # layers a text-only forward runs (not Mllama's cross-attention)
            below = sum(1 for row in rows if row.layer is None or row.mode == "add" or row.layer < layer)
            assert (count, all_rows_through[layer]) == (below, len(rows)), f"layer {layer}"


def rows_through_each_layer(
    handle: ModelHandle, batch: dict[str, Any], rows: list[RowPatch]
) -> tuple[list[int], torch.Tensor]:
    """How many decode rows each layer's feed-forward block computed, and the rows' logits."""
    seen: list[list[int]] = [[] for _ in handle.layers]
    hooks = []
    for index, layer in enumerate(handle.layers):
        block = getattr(layer, "mlp", None) or getattr(layer, "feed_forward", None)
        assert block is not None, f"{handle.architecture.family} layer {index} has no mlp or feed_forward"

        def count(_module: Any, args: tuple[Any, ...], index: int = index) -> None:
            seen[index].append(args[0].shape[0])

        hooks.append(block.register_forward_pre_hook(count))
    try:
        logits = patched_logits(handle, batch, rows)
    finally:
        for hook in hooks:
            hook.remove()
    return [sum(calls[1:]) for calls in seen], logits  # calls[0]: the shared prefix pass


def test_skip_groups_merge_calls_when_a_weight_read_costs_more_than_the_layers_saved() -> None:
    skippable = [0, 3, 3, 1, 2, 4]  # rows by the layers each may skip, of a 4-layer model
    assert skip_groups(skippable, 4, rows_per_read=0) == [(0, [0]), (1, [3]), (2, [4]), (3, [1, 2]), (4, [5])]
    # A row patched at the last layer runs no layer at all, so it never joins a group that does.
    assert skip_groups(skippable, 4, rows_per_read=10**6) == [(0, [0, 3, 4, 1, 2]), (4, [5])]
    for rows_per_read in (1, 2, 3, 5):
        groups = skip_groups(skippable, 4, rows_per_read)
        assert sorted(index for _, members in groups for index in members) == list(range(6))
        cheapest = min(cost_of(candidate, 4, rows_per_read) for candidate in consecutive_groupings(skippable))
        assert cost_of(groups, 4, rows_per_read) == cheapest


def consecutive_groupings(skippable: list[int]) -> Iterator[list[tuple[int, list[int]]]]:
    """Every grouping of the rows into runs of consecutive skip counts (each at its smallest)."""
    counts = sorted(set(skippable))
    for cuts in itertools.product([False, True], repeat=len(counts) - 1):
        groups: list[tuple[int, list[int]]] = []
        for position, count in enumerate(counts):
            if position == 0 or cuts[position - 1]:
                groups.append((count, []))
            groups[-1][1].extend(index for index, own in enumerate(skippable) if own == count)
        yield groups


def cost_of(groups: list[tuple[int, list[int]]], layers: int, rows_per_read: int) -> int:
    return sum((layers - skipped) * (len(members) + rows_per_read) for skipped, members in groups)


@pytest.mark.parametrize("max_new_tokens", [1, 2])
def test_a_chunks_cache_copies_are_freed_before_the_next_chunk_copies_its_own(
    max_new_tokens: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    handle = tiny_handle("llama")
    batch, _ = batch_of(handle, False)
    rows = sweep_rows(handle, 3)
    copies: list[weakref.ref[Any]] = []
    copy_rows = shared_prefix.selected_copy

    def tracked_copy(cache: Any, queries: torch.Tensor) -> Any:
        assert all(earlier() is None for earlier in copies), "an earlier chunk's copies are still alive"
        duplicate = copy_rows(cache, queries)
        copies.append(weakref.ref(duplicate))
        return duplicate

    monkeypatch.setattr(shared_prefix, "selected_copy", tracked_copy)
    budget = 2 * row_bytes(handle, batch)
    patched_greedy_ids(handle, batch, rows, max_new_tokens=max_new_tokens, memory_budget=budget)
    if max_new_tokens == 1:
        patched_logits(handle, batch, rows, memory_budget=budget)
    assert len(copies) >= 3


@pytest.mark.parametrize(("family", "with_images"), CASES, ids=CASE_IDS)
def test_head_rows_equal_a_full_forward_with_that_head_replaced(family: str, with_images: bool) -> None:
    handle = tiny_handle(family)
    batch, alone = batch_of(handle, with_images)
    layout = head_layout(handle)
    generator = torch.Generator().manual_seed(3)
    rows = [
        RowPatch(query, layer, 3 * torch.randn(layout.head_dims[layer], generator=generator), head=head)
        for query in range(len(alone))
        for layer in range(handle.num_layers)
        for head in sorted({0, layout.heads - 1})
    ]
    rows.append(RowPatch(1))
    logits = patched_logits(handle, batch, rows)
    for row, row_logits in zip(rows, logits, strict=True):
        assert row.layer is not None or row.head is None
        patches = [] if row.head is None else [HeadPatch(row.layer or 0, row.head, _value(row), -1)]
        with patch_heads(handle, patches):
            expected = handle.model(**alone[row.query], use_cache=False).logits[0, -1].float()
        torch.testing.assert_close(row_logits, expected, atol=2e-4, rtol=1e-4)
    answers = patched_greedy_ids(handle, batch, rows, max_new_tokens=1)
    assert torch.equal(answers[:, 0], logits.argmax(-1))


def _value(row: RowPatch) -> torch.Tensor:
    assert row.vector is not None
    return row.vector


def test_a_head_row_replaces_without_scale() -> None:
    with pytest.raises(ValueError, match="replaces one head"):
        RowPatch(0, 1, torch.zeros(4), mode="add", head=0)
