"""Accuracy of greedy answers, plain or under a patched task vector, and layer sweeps over a split."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypedDict, Unpack

import torch

from taskvec.engine import PatchMode, RowPatch, generate_greedy_ids, patched_greedy_ids
from taskvec.models import ModelHandle
from taskvec.progress import with_progress
from taskvec.prompts import DEFAULT_TEMPLATE, Prompt, encode_prompts, query_marker_columns

# Bare queries are 1-2 dozen tokens, so a batch of 32 leaves the per-forward overhead small
# (bench/NOTES.md); the decode rows (queries x patches) are bounded by the memory budget instead.
SWEEP_BATCH_SIZE = 32


@dataclass(frozen=True)
class LayerPatch:
    """One patched condition of a batch of queries: `vector` [hidden] replacing (or, with mode
    "add", added to) the residual at the query's answer marker after decoder layer `layer`."""

    vector: torch.Tensor
    layer: int
    mode: PatchMode = "replace"
    scale: float = 1.0


@dataclass
class Answers:
    """Greedy answers (first line of the decoded text) and the id of each answer's first token."""

    texts: list[str]
    first_tokens: list[int]


def is_correct(generated: str, answers: Sequence[str], *, ignore_case: bool = False) -> bool:
    """The paper's metric: after stripping, both non-empty and one starts with the other."""
    guess = generated.strip()
    for answer in answers:
        expected = answer.strip()
        if ignore_case:
            guess, expected = guess.lower(), expected.lower()
        if guess and expected and (guess.startswith(expected) or expected.startswith(guess)):
            return True
    return False


def is_correct_by(generated: str, answers: Sequence[str], metric: str) -> bool:
    """ "prefix" (the paper's), "prefix_ignore_case" (its ensembling runs) or "exact" (after stripping)."""
    if metric == "prefix":
        return is_correct(generated, answers)
    if metric == "prefix_ignore_case":
        return is_correct(generated, answers, ignore_case=True)
    if metric == "exact":
        return bool(generated.strip()) and any(generated.strip() == answer.strip() for answer in answers)
    raise ValueError(f"unknown metric {metric!r}; use prefix, prefix_ignore_case or exact")


def first_line(text: str) -> str:
    # Answers end at the template's newline; what follows is the model starting a new example.
    return text.strip().split("\n")[0]


def generate_answers(
    handle: ModelHandle,
    prompts: Sequence[Prompt],
    *,
    vector: torch.Tensor | None = None,
    layer: int | None = None,
    max_new_tokens: int = 4,
    batch_size: int = 8,
    progress: str | None = None,
    first_tokens: list[int] | None = None,
    marker: str = DEFAULT_TEMPLATE.marker,
    memory_budget: int | None = None,
) -> list[str]:
    """Greedy answers (first line), with `vector` replacing the query's answer marker at `layer` if given.

    `first_tokens`, when given, receives the id of each answer's first generated token.
    """
    if vector is not None and layer is not None:
        (answers,) = generate_patched_answers(
            handle,
            prompts,
            [LayerPatch(vector, layer)],
            max_new_tokens=max_new_tokens,
            batch_size=batch_size,
            progress=progress,
            marker=marker,
            memory_budget=memory_budget,
        )
    else:
        answers = _generate_unpatched(handle, prompts, max_new_tokens, batch_size, progress)
    if first_tokens is not None:
        first_tokens.extend(answers.first_tokens)
    return answers.texts


def _generate_unpatched(
    handle: ModelHandle, prompts: Sequence[Prompt], max_new_tokens: int, batch_size: int, progress: str | None
) -> Answers:
    answers = Answers([], [])
    starts = range(0, len(prompts), batch_size)
    for start in with_progress(starts, progress, leave=False):
        ids = generate_greedy_ids(
            handle, encode_prompts(handle, prompts[start : start + batch_size]), max_new_tokens=max_new_tokens
        )
        _extend(handle, answers, ids)
    return answers


def _extend(handle: ModelHandle, answers: Answers, ids: torch.Tensor) -> None:
    texts = handle.tokenizer.batch_decode(ids, skip_special_tokens=True)
    answers.texts.extend(first_line(text) for text in texts)
    answers.first_tokens.extend(int(row[0]) for row in ids)


def generate_patched_answers(
    handle: ModelHandle,
    prompts: Sequence[Prompt],
    patches: Sequence[LayerPatch],
    *,
    max_new_tokens: int = 1,
    batch_size: int = SWEEP_BATCH_SIZE,
    progress: str | None = None,
    marker: str = DEFAULT_TEMPLATE.marker,
    memory_budget: int | None = None,
) -> list[Answers]:
    """Greedy answers of every prompt under each patch in turn ([patch]), all patches of a batch of
    prompts sharing one pass over the prompts (`taskvec.engine.patched_greedy_ids`)."""
    answers = [Answers([], []) for _ in patches]
    starts = range(0, len(prompts), batch_size)
    for start in with_progress(starts, progress, leave=False):
        batch = prompts[start : start + batch_size]
        inputs = encode_prompts(handle, batch)
        rows = [
            RowPatch(query, patch.layer % handle.num_layers, patch.vector, patch.mode, patch.scale)
            for patch in patches
            for query in range(len(batch))
        ]
        ids = patched_greedy_ids(
            handle,
            inputs,
            rows,
            max_new_tokens=max_new_tokens,
            patch_columns=query_marker_columns(handle, inputs, marker),
            memory_budget=memory_budget,
        )
        for index, patch_answers in enumerate(answers):
            _extend(handle, patch_answers, ids[index * len(batch) : (index + 1) * len(batch)])
    return answers


def accuracy(
    generated: Sequence[str], answers: Sequence[Sequence[str]], *, ignore_case: bool = False
) -> float:
    if not generated:
        raise ValueError("no answers to score")
    hits = sum(is_correct(g, a, ignore_case=ignore_case) for g, a in zip(generated, answers, strict=True))
    return hits / len(generated)


class SweepOptions(TypedDict, total=False):
    """How a layer sweep runs: every sweep function takes these as keywords (defaults in
    `sweep_first_tokens_of_vectors`)."""

    progress: str | None
    batch_size: int
    marker: str
    memory_budget: int | None
    mode: PatchMode
    scale: float


def sweep_first_tokens(
    handle: ModelHandle, prompts: Sequence[Prompt], vectors: torch.Tensor, **options: Unpack[SweepOptions]
) -> list[list[str]]:
    """[prompt][layer]: the greedy first token with the layer's vector patched at the query's marker.

    Kept as text so any metric can score it later without another sweep.
    """
    (tokens,) = sweep_first_tokens_of_vectors(handle, prompts, [vectors], **options)
    return tokens


def sweep_first_tokens_of_vectors(
    handle: ModelHandle,
    prompts: Sequence[Prompt],
    vector_sets: Sequence[torch.Tensor],
    *,
    progress: str | None = None,
    batch_size: int = SWEEP_BATCH_SIZE,
    marker: str = DEFAULT_TEMPLATE.marker,
    memory_budget: int | None = None,
    mode: PatchMode = "replace",
    scale: float = 1.0,
    set_modes: Sequence[tuple[PatchMode, float]] | None = None,
) -> list[list[list[str]]]:
    """[set][prompt][layer]: layer sweeps of several vector sets ([layers, hidden] each) over the same
    prompts, every layer of every set of a batch of prompts sharing one pass over the prompts.

    Every set is patched with `mode` and `scale`, or with its own (mode, scale) from `set_modes`
    (replaced task vectors and added function vectors at several scales in one pass)."""
    layers = handle.num_layers
    for vectors in vector_sets:
        if vectors.dim() != 2 or vectors.shape[0] != layers:
            raise ValueError(
                f"a sweep needs one vector per layer ({layers}), got shape {list(vectors.shape)}"
            )
    if set_modes is None:
        set_modes = [(mode, scale)] * len(vector_sets)
    if len(set_modes) != len(vector_sets):
        raise ValueError(f"{len(set_modes)} (mode, scale) pairs for {len(vector_sets)} vector sets")
    patches = [
        LayerPatch(vectors[layer], layer, *set_mode)
        for vectors, set_mode in zip(vector_sets, set_modes, strict=True)
        for layer in range(layers)
    ]
    answers = generate_patched_answers(
        handle,
        prompts,
        patches,
        max_new_tokens=1,
        batch_size=batch_size,
        progress=progress,
        marker=marker,
        memory_budget=memory_budget,
    )
    tokens: list[list[list[str]]] = []
    for index in range(len(vector_sets)):
        per_layer = [answers[index * layers + layer].first_tokens for layer in range(layers)]
        # Decoded one token at a time, special tokens kept, as a sweep has always reported them.
        decoded = [
            handle.tokenizer.batch_decode([[token] for token in layer_tokens]) for layer_tokens in per_layer
        ]
        tokens.append([[decoded[layer][query] for layer in range(layers)] for query in range(len(prompts))])
    return tokens


def sweep_accuracy(
    handle: ModelHandle,
    prompts: Sequence[Prompt],
    answers: Sequence[Sequence[str]],
    vectors: torch.Tensor,
    *,
    ignore_case: bool = False,
    **options: Unpack[SweepOptions],
) -> list[float]:
    """First-token accuracy per layer with the layer's vector patched at the query's marker.

    The paper's prefix metric is effectively first-token; this reads the argmax token of the
    one-pass sweep, so a whole split costs about one forward pass per prompt.
    """
    tokens = sweep_first_tokens(handle, prompts, vectors, **options)
    return layer_accuracy(tokens, answers, ignore_case=ignore_case)


def layer_accuracy(
    tokens: Sequence[Sequence[str]], answers: Sequence[Sequence[str]], *, ignore_case: bool = False
) -> list[float]:
    """Accuracy per layer of first tokens shaped [prompt][layer]."""
    if not tokens:
        raise ValueError("no prompts to score")
    hits = torch.zeros(len(tokens[0]))
    for row, expected in zip(tokens, answers, strict=True):
        hits += torch.tensor([float(is_correct(token, expected, ignore_case=ignore_case)) for token in row])
    return (hits / len(tokens)).tolist()
