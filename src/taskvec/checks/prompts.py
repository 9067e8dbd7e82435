"""The few short real prompts the checks run: country-capital questions in the run's template, as text
and (where the model takes images) as flags, one batch of mixed lengths each."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from taskvec.engine import record_residuals
from taskvec.engine.token_inputs import is_token_aligned
from taskvec.models import ModelHandle
from taskvec.prompts import Prompt, QATemplate, build_icl_prompt, encode_prompts, query_marker_columns
from taskvec.tasks import Item, load_task

# Words the tiny test vocabularies know too, so no check reads unknown tokens on any model.
QUERY_INPUTS = ("Spain", "Japan", "Italy", "Germany")
# Small flag images: a prompt of a few hundred tokens at most, whatever the processor makes of them.
IMAGE_STYLE = "noto"


class NotApplicable(Exception):
    """The check does not apply to this model or these prompts (its row is marked skip, with this
    reason)."""


@functools.cache
def check_items() -> tuple[Item, ...]:
    task = load_task("country-capital")
    by_input = {item.input: item for item in task.items}
    return tuple(by_input[name] for name in QUERY_INPUTS)


class PromptSource:
    """Where the checks take their prompts from: batches of prompts of mixed lengths (left padded),
    each prompt alone, a single query, per kind of prompt ("text", "image")."""

    handle: ModelHandle

    @property
    def modalities(self) -> Sequence[str]:
        raise NotImplementedError

    def batch(self, modality: str) -> dict[str, Any]:
        """Prompts of different lengths as one left-padded batch."""
        raise NotImplementedError

    def alone(self, modality: str) -> list[dict[str, Any]]:
        """Each prompt of `batch(modality)` encoded by itself, in the same order."""
        raise NotImplementedError

    def query(self, modality: str) -> dict[str, Any]:
        """One prompt: the kind a layer sweep patches."""
        raise NotImplementedError

    def patch_columns(self, batch: dict[str, Any]) -> list[int]:
        """Where each row of `batch` is patched: its last column unless a template says otherwise."""
        return [batch["input_ids"].shape[1] - 1] * batch["input_ids"].shape[0]

    def source_prompt(self) -> dict[str, Any]:
        """The prompt the patched vectors are read from."""
        return self.alone("text")[-1]

    @functools.cached_property
    def source_vectors(self) -> torch.Tensor:
        """[layers, hidden]: the residuals at the last token of another prompt, a vector per layer, as
        a task vector is (patched rows then carry the model's own activations, not noise)."""
        return record_residuals(self.handle, self.source_prompt(), -1)[0, :, 0]


@dataclass(frozen=True)
class CheckPrompts(PromptSource):
    """Country-capital questions in one template, encoded by the model's own processor."""

    handle: ModelHandle
    template: QATemplate

    def _prompt(self, shots: int, query: int, modality: str) -> Prompt:
        items = check_items()
        demonstrations = [items[(query + 1 + shot) % len(items)] for shot in range(shots)]
        return build_icl_prompt(
            demonstrations,
            items[query],
            demo_modality="text",
            query_modality="image" if modality == "image" else "text",
            style=IMAGE_STYLE,
            template=self.template,
        )

    def _batch_prompts(self, modality: str) -> list[Prompt]:
        """Three prompts of different lengths: a bare query, two and one demonstrations before one."""
        return [self._prompt(shots, query, modality) for query, shots in enumerate((0, 2, 1))]

    def batch(self, modality: str) -> dict[str, Any]:
        return encode_prompts(self.handle, self._batch_prompts(modality))

    def alone(self, modality: str) -> list[dict[str, Any]]:
        return [encode_prompts(self.handle, [prompt]) for prompt in self._batch_prompts(modality)]

    def query(self, modality: str) -> dict[str, Any]:
        return encode_prompts(self.handle, [self._prompt(1, 0, modality)])

    def patch_columns(self, batch: dict[str, Any]) -> list[int]:
        """Each row's answer marker: the last column under qa, before the chat template's tokens."""
        return query_marker_columns(self.handle, batch, self.template.marker)

    def source_prompt(self) -> dict[str, Any]:
        return encode_prompts(self.handle, [self._prompt(2, 3, "text")])

    @property
    def modalities(self) -> Sequence[str]:
        return ("text", "image") if self.handle.architecture.is_vision_language else ("text",)


@dataclass(frozen=True)
class EncodedPrompts(PromptSource):
    """Prompts given already encoded, for a model without a processor to write them (random-weight
    benchmarks): `alone[kind]` are prompts of different lengths, batched here with left padding
    (token inputs only: a kind whose prompts carry pixels has no batch); `queries[kind]` one each."""

    handle: ModelHandle
    prompts_alone: dict[str, list[dict[str, Any]]]
    queries: dict[str, dict[str, Any]]
    pad_token_id: int = 0

    @property
    def modalities(self) -> Sequence[str]:
        return tuple(self.queries)

    def alone(self, modality: str) -> list[dict[str, Any]]:
        if modality not in self.prompts_alone:
            raise NotApplicable(f"no batch of {modality} prompts given")
        return self.prompts_alone[modality]

    def batch(self, modality: str) -> dict[str, Any]:
        """The prompts left padded: their tokens, attention masks and the token-aligned inputs they all
        have (a prefix LM's token_type_ids mark its prefix; without them a batch masks otherwise)."""
        prompts = [{"attention_mask": torch.ones_like(p["input_ids"]), **p} for p in self.alone(modality)]
        keys = [
            key for key in prompts[0] if all(is_token_aligned(p.get(key), p["input_ids"]) for p in prompts)
        ]
        length = max(prompt["input_ids"].shape[1] for prompt in prompts)
        return {
            key: torch.cat(
                [
                    _left_padded(prompt[key], length, self.pad_token_id if key == "input_ids" else 0)
                    for prompt in prompts
                ]
            )
            for key in keys
        }

    def query(self, modality: str) -> dict[str, Any]:
        return self.queries[modality]


def _left_padded(value: torch.Tensor, length: int, fill: int) -> torch.Tensor:
    """`value` [1, tokens, ...] with `fill` before its tokens up to `length` columns."""
    padding = value.new_full((value.shape[0], length - value.shape[1], *value.shape[2:]), fill)
    return torch.cat([padding, value], dim=1)
