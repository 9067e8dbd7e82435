"""Turn examples into model inputs, with the loss computed only where an answer token is predicted.

The language model's unembedding has 262k rows, so its logits over every position of a batch would
cost more than the rest of the step; `logits_to_keep` (a boolean mask) gives LlavaForConditionalGeneration
only the positions that predict an answer token.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from taskvec.vlm.architecture import IMAGE_TOKEN
from taskvec.vlm.data import Example, augment, load_picture


@dataclass
class TrainingBatch:
    input_ids: torch.Tensor  # (batch, length), right padded
    attention_mask: torch.Tensor
    pixel_values: torch.Tensor | None  # (images, 3, side, side), in prompt order; None: text only
    predicts_answer: torch.Tensor  # bool (batch, length): positions whose next token is an answer token
    targets: torch.Tensor  # (number of True in predicts_answer,), row-major order
    entities: list[str]  # "family/name" of each image, for the alignment stage

    def model_inputs(self) -> dict[str, Any]:
        inputs = {"input_ids": self.input_ids, "attention_mask": self.attention_mask}
        if self.pixel_values is not None:
            inputs["pixel_values"] = self.pixel_values
        return inputs


def expand_image_tokens(prompt: str, tokens_per_image: int) -> str:
    """What LlavaProcessor does to a prompt: each placeholder becomes `tokens_per_image` image tokens."""
    return prompt.replace(IMAGE_TOKEN, IMAGE_TOKEN * tokens_per_image)


def collate(
    examples: Sequence[Example],
    processor: Any,
    tokens_per_image: int,
    rng: np.random.Generator | None,
) -> TrainingBatch:
    """Tokenise examples (prompt with BOS, then the answer) and preprocess their pictures.

    With `rng` the pictures are augmented; without it they are used as they are (evaluation).
    """
    tokenizer = processor.tokenizer
    side = int(processor.image_processor.size["height"])
    sequences: list[list[int]] = []
    answer_spans: list[tuple[int, list[int]]] = []
    pictures: list[Image.Image] = []
    entities: list[str] = []
    for example in examples:
        prompt_ids = tokenizer(expand_image_tokens(example.prompt, tokens_per_image)).input_ids
        answer_ids = tokenizer(example.answer, add_special_tokens=False).input_ids
        sequences.append(prompt_ids + answer_ids)
        answer_spans.append((len(prompt_ids), answer_ids))
        for image in example.images:
            picture = load_picture(image.path)
            pictures.append(augment(picture, rng, side) if rng is not None else picture)
            entities.append(image.entity)
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
    pixel_values = (
        processor.image_processor(pictures, return_tensors="pt")["pixel_values"] if pictures else None
    )
    return TrainingBatch(
        input_ids, attention_mask, pixel_values, predicts_answer, torch.tensor(targets), entities
    )


def answer_logits(model: torch.nn.Module, batch: TrainingBatch) -> torch.Tensor:
    """Logits (answer tokens, vocabulary) at the positions that predict an answer token, row-major."""
    output = model(**batch.model_inputs(), logits_to_keep=batch.predicts_answer, use_cache=False)
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
