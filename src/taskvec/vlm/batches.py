"""Turn examples into model inputs, with the loss computed only where an answer token is predicted.

The language model's unembedding has 262k rows, so its logits over every position of a batch would
cost more than the rest of the step; `logits_to_keep` (a boolean mask) gives LlavaForConditionalGeneration
only the positions that predict an answer token.

Pictures enter a batch as the frozen tower's cached tokens (`cached_features.TowerTokens`), and
`model_inputs` places their projection where LlavaModel would: the forward pass is the model's own
for those tokens, without running EfficientNet per step.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from taskvec.vlm.architecture import IMAGE_TOKEN
from taskvec.vlm.cached_features import TowerTokens
from taskvec.vlm.data import Example


@dataclass
class TrainingBatch:
    input_ids: torch.Tensor  # (batch, length), right padded
    attention_mask: torch.Tensor
    # (images, tokens_per_image, tower hidden): the tower's tokens in prompt order; None: text only
    image_tokens: torch.Tensor | None
    predicts_answer: torch.Tensor  # bool (batch, length): positions whose next token is an answer token
    targets: torch.Tensor  # (number of True in predicts_answer,), row-major order

    def model_inputs(self, model: torch.nn.Module) -> dict[str, Any]:
        """Inputs of `model` (a LlavaForConditionalGeneration): token ids alone, or with images the
        embeddings LlavaModel builds, the projected tower tokens at the image positions."""
        if self.image_tokens is None:
            return {"input_ids": self.input_ids, "attention_mask": self.attention_mask}
        llava: Any = model
        embeddings = llava.get_input_embeddings()(self.input_ids)
        projected = llava.model.multi_modal_projector(self.image_tokens.to(embeddings.dtype))
        slots = (self.input_ids == llava.config.image_token_id).unsqueeze(-1)
        if int(slots.sum()) != projected.shape[0] * projected.shape[1]:
            raise ValueError(
                f"{int(slots.sum())} image positions for {projected.shape[0]} images of "
                f"{projected.shape[1]} tokens"
            )
        embeddings = embeddings.masked_scatter(slots.expand_as(embeddings), projected.flatten(0, 1))
        return {"inputs_embeds": embeddings, "attention_mask": self.attention_mask}


def expand_image_tokens(prompt: str, tokens_per_image: int) -> str:
    """What LlavaProcessor does to a prompt: each placeholder becomes `tokens_per_image` image tokens."""
    return prompt.replace(IMAGE_TOKEN, IMAGE_TOKEN * tokens_per_image)


def collate(
    examples: Sequence[Example],
    processor: Any,
    tokens_per_image: int,
    tower_tokens: TowerTokens,
    rng: np.random.Generator | None,
) -> TrainingBatch:
    """Tokenise examples (prompt with BOS, then the answer) and look up their pictures' tokens.

    With `rng` each picture is one of its cached views drawn at random (itself or an augmented
    copy); without it, the picture itself (evaluation).
    """
    tokenizer = processor.tokenizer
    sequences: list[list[int]] = []
    answer_spans: list[tuple[int, list[int]]] = []
    image_tokens: list[torch.Tensor] = []
    for example in examples:
        prompt_ids = tokenizer(expand_image_tokens(example.prompt, tokens_per_image)).input_ids
        answer_ids = tokenizer(example.answer, add_special_tokens=False).input_ids
        sequences.append(prompt_ids + answer_ids)
        answer_spans.append((len(prompt_ids), answer_ids))
        for image in example.images:
            view = int(rng.integers(tower_tokens.views)) if rng is not None else 0
            image_tokens.append(tower_tokens.of(image, view))
    length = max(len(sequence) for sequence in sequences)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    input_ids = torch.full((len(sequences), length), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), length), dtype=torch.long)
    predicts_answer = torch.zeros((len(sequences), length), dtype=torch.bool)
    targets: list[int] = []
    for row, (sequence, (start, answer_ids)) in enumerate(zip(sequences, answer_spans, strict=True)):
        input_ids[row, : len(sequence)] = torch.tensor(sequence)
        attention_mask[row, : len(sequence)] = 1
        predicts_answer[row, start - 1 : start - 1 + len(answer_ids)] = True
        targets.extend(answer_ids)
    stacked = torch.stack(image_tokens) if image_tokens else None
    return TrainingBatch(input_ids, attention_mask, stacked, predicts_answer, torch.tensor(targets))


def answer_logits(model: torch.nn.Module, batch: TrainingBatch) -> torch.Tensor:
    """Logits (answer tokens, vocabulary) at the positions that predict an answer token, row-major."""
    output = model(**batch.model_inputs(model), logits_to_keep=batch.predicts_answer, use_cache=False)
    logits: torch.Tensor = output.logits.float()
    return logits


def answer_loss(model: torch.nn.Module, batch: TrainingBatch) -> torch.Tensor:
    """Mean next-token cross-entropy over the answer tokens only."""
    return F.cross_entropy(answer_logits(model, batch), batch.targets)


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """KL(teacher || student) of the next-token distributions, averaged over answer positions."""
    return F.kl_div(
        F.log_softmax(student_logits, dim=-1),
        F.log_softmax(teacher_logits, dim=-1),
        log_target=True,
        reduction="batchmean",
    )
