"""Extract task vectors: one path from ICL prompts to a TaskVector, used by every caller.

    prompts (`icl_prompts`) -> encoded batches -> residual at an answer marker (`residuals_at_marker`)
    -> mean over prompts with its metadata (`extract_vector`)

Exemplar vector (the paper's protocol): for each query of a split, a prompt of `shots`
demonstrations drawn from the other items of that split, then the query; the residual is read at
the last token of the last demonstration's answer marker (a position that has not seen the query)
at every layer, and averaged over the prompts. Instruction vector: the residual at the last token of
the bare instruction. Under the chat template (`template="chat"`) the prompt is one user turn of the
model's chat template and the same rules hold: positions are found in the tokens by rule (the
marker's second-to-last occurrence; the instruction's last word), never as the prompt's last token,
which is the template's assistant header. The run's vector store, the analyses, the command line and the VLM's
acceptance measurements all read residuals here, so they agree on prompts, positions and batching.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from taskvec.engine import record_residuals
from taskvec.models import ModelHandle
from taskvec.progress import with_progress
from taskvec.prompts import (
    DEFAULT_TEMPLATE,
    Modality,
    Prompt,
    QATemplate,
    TemplateName,
    as_template,
    build_icl_prompt,
    encode_prompts,
    marker_columns,
    text_end_columns,
)
from taskvec.prompts.settings import DEFAULT_PROMPT_SETTINGS, PromptSettings
from taskvec.tasks import Item, Task
from taskvec.vectors.spec import VectorSpec, parse_spec
from taskvec.vectors.task_vector import TaskVector

# The answer-marker occurrence an exemplar vector is read at: the last demonstration's, before the query.
LAST_DEMONSTRATION = -2


class TooFewDemonstrationsError(ValueError):
    """A prompt asks for more demonstrations than the pool holds besides its query."""


def sample_demonstrations(
    pool: Sequence[Item], query: Item, shots: int, rng: random.Random, *, task: str | None = None
) -> list[Item]:
    """`shots` items of `pool` other than the query (by input), drawn with `rng`."""
    if shots < 0:
        raise ValueError(f"shots must be 0 (the query alone) or more, got {shots}")
    candidates = [item for item in pool if item.input != query.input]
    if len(candidates) < shots:
        owner = f"task {task!r}: " if task else ""
        raise TooFewDemonstrationsError(
            f"{owner}{shots}-shot prompts need {shots} demonstrations besides the query {query.input!r}, "
            f"the pool of {len(pool)} items has {len(candidates)}; lower the shots or add items"
        )
    return rng.sample(candidates, shots)


def icl_prompts(
    pool: Sequence[Item],
    queries: Sequence[Item],
    settings: PromptSettings,
    *,
    modality: Modality = "text",
    query_modality: Modality | None = None,
    task: str | None = None,
) -> list[Prompt]:
    """One prompt per query: `settings.shots` demonstrations from `pool` (never the query), then the
    query, images in `settings.style`, under `settings.template` (its batch size does not apply).

    One stream seeded by `settings.seed` for the whole list, so the same (pool, queries, seed) gives
    the same prompts wherever they are built: the vectors, the in-context baselines and the analyses
    agree. The query is shown in `query_modality` (default: the demonstrations' modality). Too small
    a pool raises `TooFewDemonstrationsError` naming `task` and the counts, never a prompt with fewer
    shots.
    """
    template = as_template(settings.template)
    rng = random.Random(settings.seed)
    return [
        build_icl_prompt(
            sample_demonstrations(pool, query, settings.shots, rng, task=task),
            query,
            demo_modality=modality,
            query_modality=query_modality or modality,
            style=settings.style,
            template=template,
        )
        for query in queries
    ]


def _batched(prompts: Sequence[Prompt], size: int) -> list[Sequence[Prompt]]:
    if size < 1:
        raise ValueError(f"batch size must be at least 1, got {size}")
    return [prompts[start : start + size] for start in range(0, len(prompts), size)]


@contextmanager
def capture_input_embeddings(handle: ModelHandle, store: list[torch.Tensor]) -> Iterator[None]:
    """Record what the first decoder layer receives: token embeddings with image features merged in."""

    def hook(_module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        hidden = args[0] if args else kwargs["hidden_states"]
        store.append(hidden.detach().float().cpu())

    registered = handle.layers[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield
    finally:
        registered.remove()


def _image_token_id(handle: ModelHandle) -> int | None:
    config = handle.model.config
    for name in ("image_token_id", "image_token_index"):
        value = getattr(config, name, None)
        if isinstance(value, int):
            return value
    return None


def _mean_embedding(
    embedding: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor, image_id: int | None
) -> torch.Tensor:
    """Mean over the image tokens when there are any (image prompts), else over the prompt's tokens."""
    keep = mask.bool()
    if image_id is not None and bool((ids == image_id).any()):
        keep = ids == image_id
    return embedding[keep].mean(dim=0)


@dataclass
class MarkerResiduals:
    """Residuals at an answer marker, [prompts, layers, hidden], and optionally each prompt's mean
    input embedding, [prompts, hidden]."""

    residuals: torch.Tensor
    input_embeddings: torch.Tensor | None = None


# Per row of an encoded batch, the column to read: the rule of one kind of residual.
ColumnRule = Callable[[ModelHandle, Mapping[str, torch.Tensor]], list[int]]


@torch.no_grad()
def residuals_at_columns(
    handle: ModelHandle,
    prompts: Sequence[Prompt],
    columns: ColumnRule,
    *,
    layers: Sequence[int] | None = None,
    batch_size: int = 8,
    progress: str | None = None,
    input_embeddings: bool = False,
) -> MarkerResiduals:
    """Each prompt's residual at the column `columns` picks in its encoded batch: [prompts, layers,
    hidden], float32, CPU; see `residuals_at_marker` for `input_embeddings`."""
    if not prompts:
        raise ValueError("residuals need at least one prompt")
    image_id = _image_token_id(handle) if input_embeddings else None
    residuals: list[torch.Tensor] = []
    embeddings: list[torch.Tensor] = []
    for batch in with_progress(_batched(prompts, batch_size), progress, leave=False):
        inputs = encode_prompts(handle, batch)
        ids = inputs["input_ids"]
        positions = torch.tensor([[column] for column in columns(handle, inputs)])
        captured: list[torch.Tensor] = []
        if input_embeddings:
            with capture_input_embeddings(handle, captured):
                recorded = record_residuals(handle, inputs, positions, layers=layers)
            mask = inputs.get("attention_mask", torch.ones_like(ids)).cpu()
            embeddings.extend(
                _mean_embedding(captured[0][row], ids[row].cpu(), mask[row], image_id)
                for row in range(len(batch))
            )
        else:
            recorded = record_residuals(handle, inputs, positions, layers=layers)
        residuals.append(recorded[:, :, 0].float().cpu())
    return MarkerResiduals(torch.cat(residuals), torch.stack(embeddings) if input_embeddings else None)


def residuals_at_marker(
    handle: ModelHandle,
    prompts: Sequence[Prompt],
    *,
    occurrence: int,
    layers: Sequence[int] | None = None,
    batch_size: int = 8,
    progress: str | None = None,
    input_embeddings: bool = False,
    template: QATemplate | TemplateName = DEFAULT_TEMPLATE,
) -> MarkerResiduals:
    """Each prompt's residual at one answer-marker occurrence: [prompts, layers, hidden], float32, CPU.

    `occurrence` counts the template's marker in the prompt: -1 the query's (where vectors are
    patched, and under the qa template where the answer is generated), -2 the last demonstration's
    (where exemplar vectors are read). Found in the tokens, so it holds under the chat template too.
    `layers` defaults to every layer. With `input_embeddings`, also each prompt's mean input embedding
    [prompts, hidden] (what the first decoder layer receives, image features merged in; the mean
    over the image tokens when the prompt has any), the raw-input side of the embedding map.
    """
    marker = as_template(template).marker

    def at_marker(handle: ModelHandle, inputs: Mapping[str, torch.Tensor]) -> list[int]:
        return marker_columns(handle, inputs, marker, occurrence)

    return residuals_at_columns(
        handle,
        prompts,
        at_marker,
        layers=layers,
        batch_size=batch_size,
        progress=progress,
        input_embeddings=input_embeddings,
    )


def last_columns(_handle: ModelHandle, inputs: Mapping[str, torch.Tensor]) -> list[int]:
    """The last column of every row (left padding): the token whose prediction is the reply."""
    ids = inputs["input_ids"]
    return [ids.shape[-1] - 1] * ids.shape[0]


@dataclass
class Extraction:
    """An extracted vector and, for exemplar vectors, the per-prompt residuals it is the mean of.

    `per_prompt` is [prompts, layers, hidden] (None for an instruction vector, read from one prompt);
    the ensemble curve averages subsets of its rows.
    """

    vector: TaskVector
    per_prompt: torch.Tensor | None


def _exemplar_metadata(
    handle: ModelHandle,
    task: Task,
    spec: VectorSpec,
    *,
    shots: int,
    seed: int,
    split: str,
    prompts: int,
    style: str | None,
    template: QATemplate,
) -> dict[str, Any]:
    return {
        "model": handle.name,
        "task": task.name,
        "spec": spec.value,
        "shots": shots,
        "seed": seed,
        "split": split,
        "prompts": prompts,
        "style": style,
        "position": f"last token of the last demonstration's {template.marker!r}",
        "template": _template_record(template),
    }


def _template_record(template: QATemplate) -> dict[str, Any]:
    record: dict[str, Any] = {"query": template.query, "answer": template.answer}
    if template.chat:
        record["format"] = template.name  # qa records keep the keys they always had
    return record


INSTRUCTION_POSITION = "last token of the instruction"
CHAT_INSTRUCTION_POSITION = (
    "last token of the instruction (its final word's last occurrence) in a user turn of the chat "
    "template, before the end of the turn and the assistant header"
)


@torch.no_grad()
def _instruction_extraction(
    handle: ModelHandle, task: Task, text: str, template: QATemplate = DEFAULT_TEMPLATE
) -> Extraction:
    """The residual at the last token of the bare instruction, every layer.

    Under the chat template the instruction is the one user turn, and the residual is read at its own
    last token: the template's tokens after it (end of turn, assistant header) are the same for every
    task, so reading there would see the instruction only through them.
    """
    if not text:
        raise ValueError(f"task {task.name!r} has no instruction")
    metadata: dict[str, Any] = {
        "model": handle.name,
        "task": task.name,
        "spec": VectorSpec.INSTRUCTION.value,
        "instruction": text,
        "position": INSTRUCTION_POSITION,
    }
    if not template.chat:
        residuals = record_residuals(handle, handle.build_inputs([text]), -1)
        return Extraction(TaskVector(residuals[0, :, 0], metadata), None)

    def at_instruction_end(handle: ModelHandle, inputs: Mapping[str, torch.Tensor]) -> list[int]:
        return text_end_columns(handle, inputs, [text])

    prompt = Prompt(text, chat=True)
    residuals = residuals_at_columns(handle, [prompt], at_instruction_end).residuals
    metadata.update(position=CHAT_INSTRUCTION_POSITION, template=_template_record(template))
    return Extraction(TaskVector(residuals[0], metadata), None)


def extract_vector(
    handle: ModelHandle,
    task: Task,
    spec: VectorSpec | str,
    *,
    settings: PromptSettings = DEFAULT_PROMPT_SETTINGS,
    split: str = "val",
    limit: int | None = None,
    progress: str | None = None,
) -> Extraction:
    """The task vector of `task` specified by `spec` (text ICL, image ICL or the instruction).

    Exemplar specs build one prompt per query of `split` (the first `limit` queries; all by default),
    each of `settings.shots` demonstrations drawn from the whole split other than the query, seeded
    by `settings.seed`, and average the residuals at the last demonstration's answer marker, read in
    batches of `settings.batch_size`. `settings.style` picks the image style of image ICL (default:
    the item's first). Instruction vectors take only the template. `settings.template` is "qa" (the
    paper's) or "chat" (the prompt as one user turn of the model's chat template; the read positions
    are the same tokens, found by rule).
    """
    template = as_template(settings.template)
    shots, seed, style = settings.shots, settings.seed, settings.style
    kind = parse_spec(spec)
    if not kind.extractable:
        raise ValueError(
            f"{kind.value!r} vectors are made from other vectors, not extracted; extract one of "
            + ", ".join(s.value for s in VectorSpec if s.extractable)
        )
    if kind is VectorSpec.INSTRUCTION:
        return _instruction_extraction(handle, task, task.instruction, template)
    if shots < 1:
        raise ValueError(
            f"an exemplar vector is read at the last demonstration's answer: shots must be at least 1, "
            f"got {shots}"
        )
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be at least 1 query (None: the whole split), got {limit}")
    modality = kind.demo_modality or "text"
    pool = task.split(split)
    prompts = icl_prompts(pool, pool[:limit], settings, modality=modality, task=task.name)
    per_prompt = residuals_at_marker(
        handle,
        prompts,
        occurrence=LAST_DEMONSTRATION,
        batch_size=settings.batch_size,
        progress=progress,
        template=template,
    ).residuals
    metadata = _exemplar_metadata(
        handle,
        task,
        kind,
        shots=shots,
        seed=seed,
        split=split,
        prompts=len(prompts),
        style=style,
        template=template,
    )
    return Extraction(TaskVector(per_prompt.mean(dim=0), metadata), per_prompt)


def exemplar_vector(
    handle: ModelHandle,
    task: Task,
    *,
    shots: int = 5,
    split: str = "val",
    seed: int = 0,
    modality: Modality = "text",
    style: str | None = None,
    template: QATemplate | TemplateName = DEFAULT_TEMPLATE,
    batch_size: int = 8,
) -> TaskVector:
    """The text- or image-ICL vector of `task` over every query of `split` (see `extract_vector`)."""
    spec = VectorSpec.IMAGE_ICL if modality == "image" else VectorSpec.TEXT_ICL
    return extract_vector(
        handle,
        task,
        spec,
        settings=PromptSettings(shots, seed, style, as_template(template).name, batch_size),
        split=split,
        progress=f"{task.name} {modality} vectors",
    ).vector


def instruction_vector(
    handle: ModelHandle,
    task: Task,
    instruction: str | None = None,
    *,
    template: QATemplate | TemplateName = DEFAULT_TEMPLATE,
) -> TaskVector:
    """The residual at the last token of the bare instruction (the task's own unless one is given)."""
    text = instruction if instruction is not None else task.instruction
    return _instruction_extraction(handle, task, text, as_template(template)).vector
