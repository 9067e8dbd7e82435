"""Which vocabulary ids stand for a word when the logit lens looks for it.

The lens reads one next-token distribution, so a word is represented by the first token of its
encoding. Sentencepiece vocabularies (Gemma, Llama) hold a word twice, "▁Paris" (after a space) and
"Paris" (glued to the previous token); after "A:" the model may prefer either, so a word's
probability is the maximum over both variants. Task words also count in capitalised form
("Capital"), since a layer that "thinks capital" need not pick the case.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, Literal

import torch

TOKEN_RULE = (
    "first token of the word, max over the leading-space variants ('word' and ' word', e.g. "
    "sentencepiece 'Paris' vs '▁Paris'); task words also in capitalised form; unknown tokens ignored"
)
WordReduce = Literal["max", "sum"]


def first_token_variants(tokenizer: Any, word: str, *, capitalised: bool = False) -> list[int]:
    """Distinct first-token ids of `word` written with and without a leading space.

    The unknown token is dropped: a word-level vocabulary maps every unseen word to it, which would
    make unrelated words look alike.
    """
    word = word.strip()
    if not word:
        return []
    spellings = [word, " " + word]
    if capitalised and word[:1].islower():
        spellings += [word[:1].upper() + word[1:], " " + word[:1].upper() + word[1:]]
    unknown = getattr(tokenizer, "unk_token_id", None)
    ids: list[int] = []
    for spelling in spellings:
        encoded = tokenizer(spelling, add_special_tokens=False)["input_ids"]
        # Some tokenizers emit a lone "▁" before a word; the word itself starts at the next token.
        pieces = [int(i) for i in encoded if tokenizer.decode([int(i)]).strip()]
        if pieces and pieces[0] != unknown and pieces[0] not in ids:
            ids.append(pieces[0])
    return ids


def word_set_ids(tokenizer: Any, words: Iterable[str], *, capitalised: bool = False) -> list[list[int]]:
    """Variant ids of each word (one list per word, possibly empty)."""
    return [first_token_variants(tokenizer, word, capitalised=capitalised) for word in words]


def word_probability(probabilities: torch.Tensor, variant_ids: Sequence[int]) -> torch.Tensor:
    """Probability of one word in [..., vocab] distributions: max over its token variants.

    A word without a token has probability 0, on the distributions' device and in their dtype, so
    it stacks with other words' probabilities wherever the lens ran.
    """
    if not variant_ids:
        return probabilities.new_zeros(probabilities.shape[:-1])
    return probabilities[..., list(variant_ids)].amax(dim=-1)


def words_probability(
    probabilities: torch.Tensor, words: Sequence[Sequence[int]], reduce: WordReduce = "max"
) -> torch.Tensor:
    """Probability of a set of words (e.g. a task's task words): max or sum over the words.

    Each word counts once (the max over its own variants) even under "sum", so a word with two
    spellings in the vocabulary is not counted twice.
    """
    per_word = [word_probability(probabilities, ids) for ids in words if ids]
    if not per_word:
        return probabilities.new_zeros(probabilities.shape[:-1])
    stacked = torch.stack(per_word, dim=-1)
    return stacked.amax(dim=-1) if reduce == "max" else stacked.sum(dim=-1)
