"""Accuracy of greedy answers, plain or under a patched task vector, and layer sweeps over a split."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from tqdm import tqdm

from taskvec.engine import Patch, generate_greedy_ids, sweep_layers
from taskvec.models import ModelHandle
from taskvec.prompts import Prompt, encode_prompts


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
) -> list[str]:
    """Greedy answers (first line), with `vector` replacing the last position at `layer` if given.

    `first_tokens`, when given, receives the id of each answer's first generated token.
    """
    answers: list[str] = []
    tokenizer = handle.tokenizer
    starts = range(0, len(prompts), batch_size)
    for start in tqdm(starts, desc=progress, disable=progress is None, leave=False):
        batch = prompts[start : start + batch_size]
        patches = [Patch(layer, vector, position=-1)] if vector is not None and layer is not None else []
        ids = generate_greedy_ids(
            handle, encode_prompts(handle, batch), patches, max_new_tokens=max_new_tokens
        )
        answers.extend(first_line(text) for text in tokenizer.batch_decode(ids, skip_special_tokens=True))
        if first_tokens is not None:
            first_tokens.extend(int(row[0]) for row in ids)
    return answers


def accuracy(
    generated: Sequence[str], answers: Sequence[Sequence[str]], *, ignore_case: bool = False
) -> float:
    if not generated:
        raise ValueError("no answers to score")
    hits = sum(is_correct(g, a, ignore_case=ignore_case) for g, a in zip(generated, answers, strict=True))
    return hits / len(generated)


def sweep_first_tokens(
    handle: ModelHandle,
    prompts: Sequence[Prompt],
    vectors: torch.Tensor,
    *,
    progress: str | None = None,
) -> list[list[str]]:
    """[prompt][layer]: the greedy first token with the layer's vector patched at the last position.

    Kept as text so any metric can score it later without another sweep.
    """
    tokens: list[list[str]] = []
    for prompt in tqdm(prompts, desc=progress, disable=progress is None, leave=False):
        logits = sweep_layers(handle, encode_prompts(handle, [prompt]), vectors)
        tokens.append(list(handle.tokenizer.batch_decode(logits.argmax(dim=-1)[:, None])))
    return tokens


def sweep_accuracy(
    handle: ModelHandle,
    prompts: Sequence[Prompt],
    answers: Sequence[Sequence[str]],
    vectors: torch.Tensor,
    *,
    ignore_case: bool = False,
    progress: str | None = None,
) -> list[float]:
    """First-token accuracy per layer with the layer's vector patched at the last position.

    The paper's prefix metric is effectively first-token; this reads the argmax token of the
    one-pass sweep, so a whole split costs about one forward pass per prompt.
    """
    tokens = sweep_first_tokens(handle, prompts, vectors, progress=progress)
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
