"""One prefix pass for many patched rows: every layer of a sweep, every patched condition of a query.

A patch at column c of a prompt changes nothing before c (attention is causal). So a batch of
prompts, left padded so that all end in the last column, runs once over the columns before the
batch's first patched column s; that KV cache is shared. Each decode row then takes one prompt's
cache row and recomputes columns s.. under its own patch: one token when the patch sits on the last
token, a handful when a chat template's tokens follow the answer marker. When that one token's
residual is replaced at layer l, the row's first-token answer does not depend on layers 0..l, so
those rows run only the layers above l (where the family allows it). Rows decode in chunks whose
cache copies fit a memory budget (`taskvec.engine.sweep_memory`), and longer answers continue
greedily from each row's own cache.

Families whose prompt is not causal (PaliGemma's prefix attends both ways) or that have no exact
cached step recompute the whole batch once per row of each prompt instead.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any

import torch
from transformers.cache_utils import Cache

from taskvec.engine.decode_positions import prompt_position_ids
from taskvec.engine.devices import to_cpu_float32
from taskvec.engine.generation import generate_greedy_ids
from taskvec.engine.heads import HeadPatch, patch_heads
from taskvec.engine.layer_outputs import last_logits_only
from taskvec.engine.layer_skipping import rows_per_weight_read, skip_groups, skippable_layers, skipping_layers
from taskvec.engine.lens import logit_lens
from taskvec.engine.patching import Patch, PatchMode, patch_at
from taskvec.engine.sweep_memory import chunk_size, select_cache_rows, selected_copy
from taskvec.engine.token_inputs import select_rows, token_columns, token_side_inputs
from taskvec.engine.truncated_forward import run_to_last_layer
from taskvec.models.handle import ModelHandle

# Rows unembedded at once when only their top token is kept: the logits of a row are the vocabulary
# wide (a MiB in float32 for 262k words), so thousands of rows at once would not fit.
LENS_ROWS = 256


@dataclass(frozen=True)
class RowPatch:
    """One decode row: prompt `query` of the batch, with `vector` patched at the output of decoder
    layer `layer` at the prompt's patch column, or unpatched when both are None.

    With `head`, `vector` [head_dim] replaces that attention head's output in layer `layer` instead
    (the head's slice of the attention output projection's input, `taskvec.engine.heads`).
    """

    query: int
    layer: int | None = None
    vector: torch.Tensor | None = None
    mode: PatchMode = "replace"
    scale: float = 1.0
    head: int | None = None

    def __post_init__(self) -> None:
        if (self.layer is None) != (self.vector is None):
            raise ValueError("a row patch gives both a layer and a vector, or neither (an unpatched row)")
        if self.head is not None and (self.layer is None or self.mode != "replace" or self.scale != 1.0):
            raise ValueError(
                "a head row replaces one head of a layer: it needs a layer, mode 'replace', scale 1"
            )


def one_pass_reason_against(handle: ModelHandle) -> str | None:
    """Why a shared prefix pass would not equal full forwards on this family, or None if it does."""
    architecture = handle.architecture
    if architecture.bidirectional_prompt:
        return "attends bidirectionally within the prompt"
    if not architecture.cached_step:
        return "has no exact decode step on a cached prefix (cached_step=False in the table)"
    return None


@torch.no_grad()
def patched_logits(
    handle: ModelHandle,
    inputs: dict[str, Any],
    rows: Sequence[RowPatch],
    *,
    patch_columns: Sequence[int] | None = None,
    memory_budget: int | None = None,
) -> torch.Tensor:
    """Logits [len(rows), vocab] (float32, on the CPU) at the last token of each row's prompt.

    `inputs` is a left-padded batch of prompts (as `ModelHandle.build_inputs` makes it).
    `patch_columns` gives each prompt's patch column (default: its last token). `memory_budget`
    (bytes) bounds the decode steps' copies of the prompts' KV cache (see `sweep_memory.chunk_size`).
    """
    if not rows:
        raise ValueError("no rows to decode")
    columns = _columns(inputs, patch_columns)
    if one_pass_reason_against(handle) is not None:
        return to_cpu_float32(_logits_by_full_passes(handle, inputs, rows, columns))
    groups, pieces = [], []
    # Only each chunk's output is kept: a chunk held on holds its cache copies past the budget.
    for chunk in _decoded_chunks(handle, inputs, rows, columns, memory_budget, first_token_only=True):
        groups.append(chunk.members)
        pieces.append(chunk.last_hidden)
        del chunk  # else it lives on while the generator copies the next chunk's cache
    hidden = _in_row_order(groups, pieces)
    # One lens for all rows: it reads the whole unembedding, the largest matrix of many models.
    return to_cpu_float32(logit_lens(handle, hidden))


@torch.no_grad()
def patched_greedy_ids(
    handle: ModelHandle,
    inputs: dict[str, Any],
    rows: Sequence[RowPatch],
    *,
    max_new_tokens: int = 1,
    patch_columns: Sequence[int] | None = None,
    memory_budget: int | None = None,
) -> torch.Tensor:
    """The greedy answer [len(rows), max_new_tokens] (on the CPU) of each row's prompt under its patch.

    Equal to `generate_greedy_ids` of that prompt with that patch: the patch applies to the prompt
    only, and a row that ends (an end-of-sequence token) continues with padding, as generation pads.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    columns = _columns(inputs, patch_columns)
    if one_pass_reason_against(handle) is not None:
        return _greedy_by_full_passes(handle, inputs, rows, max_new_tokens, columns)
    groups, answers = [], []
    for chunk in _decoded_chunks(
        handle, inputs, rows, columns, memory_budget, first_token_only=max_new_tokens == 1
    ):
        groups.append(chunk.members)
        answers.append(_continue_greedily(handle, inputs, chunk, max_new_tokens))
        del chunk
    if not answers:
        return torch.empty(0, max_new_tokens, dtype=torch.long)
    return _in_row_order(groups, answers)


def _columns(inputs: dict[str, Any], patch_columns: Sequence[int] | None) -> list[int]:
    """Each prompt's patch column, checked to be one of its own tokens (not padding)."""
    input_ids = inputs["input_ids"]
    batch, length = input_ids.shape
    if patch_columns is None:
        return [length - 1] * batch
    columns = [int(column) % length if -length <= column < length else length for column in patch_columns]
    if len(columns) != batch:
        raise ValueError(f"{len(columns)} patch columns for a batch of {batch} prompts")
    mask = inputs.get("attention_mask")
    for query, (column, given) in enumerate(zip(columns, patch_columns, strict=True)):
        if column >= length or (mask is not None and not bool(mask[query, column])):
            raise IndexError(f"patch column {given} of prompt {query} is not one of its {length} tokens")
    return columns


@dataclass
class _Chunk:
    """Decoded rows (`members`, indices into the rows asked for): their prompts, their caches (prompt,
    then the recomputed columns; only the layers that ran) and the last decoder layer's output at
    each prompt's last token."""

    members: list[int]
    queries: torch.Tensor
    cache: Cache
    last_hidden: torch.Tensor
    positions: torch.Tensor


def _decoded_chunks(
    handle: ModelHandle,
    inputs: dict[str, Any],
    rows: Sequence[RowPatch],
    columns: list[int],
    memory_budget: int | None,
    *,
    first_token_only: bool = False,
) -> Iterator[_Chunk]:
    """The rows decoded in chunks; with `first_token_only` rows may skip the layers their patch
    overwrites (`taskvec.engine.layer_skipping`), and their caches then cannot continue."""
    if not rows:
        return
    positions = prompt_position_ids(handle, inputs)
    split = min(columns)
    if split == 0:
        raise ValueError("a patch on a prompt's first token leaves no prefix to share")
    prefix = {**token_columns({**inputs, "position_ids": positions}, slice(None, split)), "use_cache": True}
    _, cache = run_to_last_layer(handle, prefix)
    if cache is None:
        raise RuntimeError(f"{handle.architecture.model_class} passed no KV cache to its decoder layers")
    batch, length = inputs["input_ids"].shape
    size = chunk_size(cache, len(rows), memory_budget, cache_rows=batch)
    skippable = skippable_layers(
        handle,
        [row.layer for row in rows],
        [row.mode == "replace" and row.head is None for row in rows],
        one_token=first_token_only and split == length - 1,
    )
    pieces = [
        (count, members[start : start + size])
        for count, members in skip_groups(skippable, len(handle.layers), rows_per_weight_read(handle))
        for start in range(0, len(members), size)
    ]
    for number, (count, members) in enumerate(pieces):
        chunk_rows = [rows[index] for index in members]
        queries = torch.tensor([row.query for row in chunk_rows])
        if number + 1 < len(pieces):
            chunk_cache = selected_copy(cache, queries)
        else:  # nothing needs the prefix after the last chunk, so it keeps its own rows in place
            select_cache_rows(cache, queries)
            chunk_cache = cache
        with skipping_layers(handle, count):
            last_hidden = _decode_step(handle, inputs, positions, split, chunk_cache, chunk_rows, columns)
        yield _Chunk(members, queries, chunk_cache, last_hidden, positions)
        del chunk_cache  # frees this chunk's copies before the next chunk makes its own


def _decode_step(
    handle: ModelHandle,
    inputs: dict[str, Any],
    positions: torch.Tensor,
    split: int,
    cache: Cache,
    rows: Sequence[RowPatch],
    columns: list[int],
) -> torch.Tensor:
    """The last decoder layer's output [rows, hidden] at the last token, after recomputing the
    columns from `split` on for each row from its prompt's cached prefix, under the row's patch."""
    queries = torch.tensor([row.query for row in rows])
    suffix = slice(split, None)
    step_inputs = {
        **token_side_inputs(inputs, queries, suffix),
        "input_ids": select_rows(inputs["input_ids"], queries)[:, suffix],
        "attention_mask": select_rows(_attention_mask(inputs), queries),
        "position_ids": select_rows(positions, queries, dim=-2)[..., suffix],
        "cache": cache,
        "use_cache": True,
    }
    with _patched(handle, _patches_of_rows(rows, [columns[row.query] - split for row in rows])):
        last_hidden, _ = run_to_last_layer(handle, step_inputs)
    return last_hidden


def _attention_mask(inputs: dict[str, Any]) -> torch.Tensor:
    mask = inputs.get("attention_mask")
    if mask is not None:
        return mask
    input_ids = inputs["input_ids"]
    return torch.ones_like(input_ids)


@dataclass(frozen=True)
class _Patches:
    residual: list[Patch]
    heads: list[HeadPatch]


@contextmanager
def _patched(handle: ModelHandle, patches: _Patches) -> Iterator[None]:
    with patch_at(handle, patches.residual), patch_heads(handle, patches.heads):
        yield


def _patches_of_rows(rows: Sequence[RowPatch], columns: Sequence[int]) -> _Patches:
    """The rows' patches as one Patch per (layer, mode, scale) and one HeadPatch per (layer, head),
    each listing its rows (indices into `rows`) and their columns."""
    groups: dict[tuple[int, PatchMode, float], list[int]] = {}
    head_groups: dict[tuple[int, int], list[int]] = {}
    for index, row in enumerate(rows):
        if row.layer is not None and row.head is not None:
            head_groups.setdefault((row.layer, row.head), []).append(index)
        elif row.layer is not None:
            groups.setdefault((row.layer, row.mode, row.scale), []).append(index)
    residual = [
        Patch(
            layer,
            torch.stack([_vector_of(rows[index]) for index in members]),
            [columns[index] for index in members],
            mode,
            scale,
            rows=members,
        )
        for (layer, mode, scale), members in groups.items()
    ]
    heads = [
        HeadPatch(
            layer,
            head,
            torch.stack([_vector_of(rows[index]) for index in members]),
            [columns[index] for index in members],
            rows=members,
        )
        for (layer, head), members in head_groups.items()
    ]
    return _Patches(residual, heads)


def _vector_of(row: RowPatch) -> torch.Tensor:
    if row.vector is None:
        raise ValueError(f"row of prompt {row.query} has a layer but no vector")
    return row.vector


def _continue_greedily(
    handle: ModelHandle, inputs: dict[str, Any], chunk: _Chunk, max_new_tokens: int
) -> torch.Tensor:
    """The chunk's greedy tokens [rows, max_new_tokens]: the first from its decode step, the rest
    one step at a time from each row's own cache, unpatched (the patch was on the prompt)."""
    tokens = [_top_tokens(handle, chunk.last_hidden)]
    ended = _ends(handle, tokens[0])
    mask = select_rows(_attention_mask(inputs), chunk.queries)
    last_positions = select_rows(chunk.positions, chunk.queries, dim=-2)[..., -1:]
    side_inputs = token_side_inputs(inputs, chunk.queries, slice(-1, None))
    for step in range(1, max_new_tokens):
        ones = torch.ones(len(chunk.queries), step, dtype=mask.dtype, device=mask.device)
        step_inputs = {
            **side_inputs,
            "input_ids": tokens[-1][:, None].to(inputs["input_ids"].device),
            "attention_mask": torch.cat([mask, ones], dim=1),
            "position_ids": last_positions + step,
            "cache": chunk.cache,
            "use_cache": True,
        }
        last_hidden, _ = run_to_last_layer(handle, step_inputs)
        following = torch.where(ended, _pad_id(handle), _top_tokens(handle, last_hidden))
        ended = ended | _ends(handle, following)
        tokens.append(following)
    return torch.stack(tokens, dim=1)


def _top_tokens(handle: ModelHandle, last_hidden: torch.Tensor) -> torch.Tensor:
    return torch.cat(
        [
            logit_lens(handle, last_hidden[start : start + LENS_ROWS]).argmax(dim=-1).cpu()
            for start in range(0, last_hidden.shape[0], LENS_ROWS)
        ]
    )


def _end_ids(handle: ModelHandle) -> list[int]:
    config = getattr(handle.model, "generation_config", None)
    ends = getattr(config, "eos_token_id", None)
    if ends is None:
        ends = handle.tokenizer.eos_token_id
    if ends is None:
        return []
    return [int(end) for end in ends] if isinstance(ends, list | tuple) else [int(ends)]


def _ends(handle: ModelHandle, tokens: torch.Tensor) -> torch.Tensor:
    return torch.isin(tokens, torch.tensor(_end_ids(handle), dtype=tokens.dtype))


def _pad_id(handle: ModelHandle) -> int:
    tokenizer = handle.tokenizer
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return int(pad_id)


def _full_passes(rows: Sequence[RowPatch], batch: int) -> list[list[int]]:
    """Rows grouped into passes over the whole batch, each taking at most one row of each prompt."""
    passes: list[list[int]] = []
    taken: list[int] = [0] * batch
    for index, row in enumerate(rows):
        if taken[row.query] == len(passes):
            passes.append([])
        passes[taken[row.query]].append(index)
        taken[row.query] += 1
    return passes


def _pass_patches(rows: Sequence[RowPatch], members: list[int], columns: list[int]) -> _Patches:
    queries = [rows[index].query for index in members]
    patches = _patches_of_rows([rows[index] for index in members], [columns[query] for query in queries])
    # _patches_of_rows numbers rows within the pass; in a full pass a row is its prompt's batch row.
    return _Patches(
        [replace(patch, rows=[queries[index] for index in patch.rows or ()]) for patch in patches.residual],
        [replace(patch, rows=[queries[index] for index in patch.rows or ()]) for patch in patches.heads],
    )


def _logits_by_full_passes(
    handle: ModelHandle, inputs: dict[str, Any], rows: Sequence[RowPatch], columns: list[int]
) -> torch.Tensor:
    """The rows' last-token logits from full forwards of the batch, one per pass."""
    positions = prompt_position_ids(handle, inputs)
    passes = _full_passes(rows, inputs["input_ids"].shape[0])
    pieces: list[torch.Tensor] = []
    for members in passes:
        with _patched(handle, _pass_patches(rows, members, columns)):
            output = handle.model(
                **{**inputs, "position_ids": positions}, use_cache=False, **last_logits_only(handle.model)
            )
        queries = torch.tensor([rows[index].query for index in members])
        pieces.append(select_rows(output.logits[:, -1], queries).float())
    return _in_row_order(passes, pieces)


def _greedy_by_full_passes(
    handle: ModelHandle,
    inputs: dict[str, Any],
    rows: Sequence[RowPatch],
    max_new_tokens: int,
    columns: list[int],
) -> torch.Tensor:
    passes = _full_passes(rows, inputs["input_ids"].shape[0])
    pieces: list[torch.Tensor] = []
    for members in passes:
        patches = _pass_patches(rows, members, columns)
        if patches.heads and max_new_tokens > 1:
            # generate's later steps see one new token, where a head patch's column does not exist.
            raise ValueError(
                f"{handle.architecture.family} answers head-patched rows by full passes, which give "
                "their first token only: ask for max_new_tokens=1"
            )
        with patch_heads(handle, patches.heads):
            ids = generate_greedy_ids(handle, inputs, patches.residual, max_new_tokens)
        pieces.append(ids[torch.tensor([rows[index].query for index in members])])
    if not pieces:
        return torch.empty(0, max_new_tokens, dtype=torch.long)
    return _in_row_order(passes, pieces)


def _in_row_order(groups: Sequence[list[int]], pieces: Sequence[torch.Tensor]) -> torch.Tensor:
    """The results of every row in row order, from `pieces[i]` holding those of rows `groups[i]`."""
    order = torch.tensor([index for group in groups for index in group])
    return torch.cat(list(pieces))[torch.argsort(order)]
