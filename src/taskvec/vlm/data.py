"""Training data of the embedded VLM: entity pictures, augmentation, captions and question/answer pairs.

Everything is drawn from a seeded generator per (seed, step), so a resumed run sees exactly the
batches an uninterrupted run would have seen, without storing any random state.

None of the examples is one of the paper's evaluation tasks: the instruct stage names the entity in
captions, asks for its name or its kind (flag, animal, food), and does in-context learning, with text
and with image demonstrations, on the extra tasks (continent, language, animal class, food category)
and on tasks computed from the name (the name, in capitals, its initial).
The six tasks (capital, currency, latin name, young, colour, flavour) are never trained; the VLM must
get them from its language model and the demonstrations.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance

from taskvec.prompts.template import DEFAULT_TEMPLATE, Modality
from taskvec.tasks.builtin import (
    PAPER_TASKS,
    entity_names,
    images_by_entity,
    load_builtin_task,
    slugify,
    task_spec,
)
from taskvec.tasks.images import read_rgb

FAMILIES = ("countries", "animals", "foods")
# Word for an entity's kind in captions and answers.
KIND = {"countries": "flag", "animals": "animal", "foods": "food"}
CAPTION_FAMILY_WORD = {"countries": "Country", "animals": "Animal", "foods": "Food"}
# The style each family keeps out of training, to measure recognition of an unseen art style. Noto, not
# OpenMoji: OpenMoji draws animals and foods as line art, which a tower trained from scratch on four
# styles does not transfer to (5-8% after 700 align steps against 20% for Noto; docs/VLM_NOTES.md).
DEFAULT_HELD_OUT = {"countries": "noto", "animals": "noto", "foods": "noto"}
# Answers end with a newline so the VLM learns to stop after the name.
ANSWER_END = "\n"

# The prompt that asks the VLM to name a picture; recognition is measured with it.
NAMING_PROMPT = "<image>\nName:"


@dataclass(frozen=True)
class EntityImage:
    family: str
    name: str
    style: str
    path: Path

    @property
    def entity(self) -> str:
        return f"{self.family}/{self.name}"


def entity_images(
    families: Iterable[str] = FAMILIES, styles: Mapping[str, Sequence[str]] | None = None
) -> list[EntityImage]:
    """Every picture of the families' entities, in a stable order; `styles` restricts styles per family."""
    pictures = images_by_entity()
    found = []
    for family in families:
        for name in entity_names(family):
            by_style = pictures.get(f"{family}/{slugify(name)}", {})
            for style in sorted(by_style):
                if styles is None or style in styles.get(family, ()):
                    found.append(EntityImage(family, name, style, by_style[style]))
    return found


def split_by_style(
    images: Sequence[EntityImage], held_out: Mapping[str, str] = DEFAULT_HELD_OUT
) -> tuple[list[EntityImage], list[EntityImage]]:
    """(training pictures, held-out pictures): a family's held-out style is never trained on."""
    train = [image for image in images if held_out.get(image.family) != image.style]
    test = [image for image in images if held_out.get(image.family) == image.style]
    return train, test


@cache
def _load_rgb(path: Path) -> Image.Image:
    return read_rgb(path)


def load_picture(path: Path) -> Image.Image:
    return _load_rgb(path).copy()


def augment(image: Image.Image, rng: np.random.Generator, side: int) -> Image.Image:
    """A `side` x `side` picture: squashed to a square (as the processor does), shrunk and shifted on
    white, with mild brightness/contrast/saturation jitter.

    No flips (Ireland and Ivory Coast are mirror images) and no hue changes (many flags differ only in
    their colours).
    """
    square = image.convert("RGB").resize((side, side), Image.Resampling.BICUBIC)
    scale = rng.uniform(0.7, 1.0)
    inner = max(8, round(side * scale))
    aspect = rng.uniform(0.85, 1.15)
    width = min(side, max(8, round(inner * aspect)))
    height = min(side, max(8, round(inner / aspect)))
    resized = square.resize((width, height), Image.Resampling.BICUBIC)
    canvas = Image.new("RGB", (side, side), (255, 255, 255))
    left = int(rng.integers(0, side - width + 1))
    top = int(rng.integers(0, side - height + 1))
    canvas.paste(resized, (left, top))
    for enhancer in (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color):
        canvas = enhancer(canvas).enhance(float(rng.uniform(0.8, 1.2)))
    return canvas


@dataclass(frozen=True)
class Example:
    """One training sequence: `prompt` (with <image> placeholders) is context, `answer` is predicted.

    `text_prompt`, for in-context prompts with pictures: the same prompt with each picture's entity
    name in its place (what the base LM reads, as the teacher of `InstructMix.image_distill_weight`).
    """

    prompt: str
    answer: str
    images: tuple[EntityImage, ...]
    text_prompt: str | None = None


def caption_example(image: EntityImage, rng: np.random.Generator) -> Example:
    """A short caption naming the entity, either with its family word or the naming prompt."""
    family_prompt = f"<image>\n{CAPTION_FAMILY_WORD[image.family]}:"
    prompt = family_prompt if rng.random() < 0.5 else NAMING_PROMPT
    return Example(prompt, f" {image.name}{ANSWER_END}", (image,))


QUESTIONS_NAME = ("What is shown?", "What is in the picture?", "Name what you see.")
QUESTIONS_KIND = (
    "Is this a flag, an animal or a food?",
    "What kind of picture is this: flag, animal or food?",
)


def question_example(image: EntityImage, rng: np.random.Generator) -> Example:
    """A question about the picture (never one of the evaluation tasks)."""
    if rng.random() < 0.7:
        question = QUESTIONS_NAME[int(rng.integers(len(QUESTIONS_NAME)))]
        answer = image.name
    else:
        question = QUESTIONS_KIND[int(rng.integers(len(QUESTIONS_KIND)))]
        answer = KIND[image.family]
    return Example(f"<image>\nQuestion: {question}\nAnswer:", f" {answer}{ANSWER_END}", (image,))


def captions_and_questions(
    pool: Sequence[EntityImage], batch_size: int, rng: np.random.Generator
) -> list[Example]:
    """A batch of pictures, a third of them with a caption (the naming prompt stays trained), the
    rest with a question."""
    chosen = rng.choice(len(pool), size=batch_size, replace=len(pool) < batch_size)
    examples = []
    for index in chosen:
        make = question_example if rng.random() >= 1 / 3 else caption_example
        examples.append(make(pool[int(index)], rng))
    return examples


# ------------------------------------------------------------------------ in-context learning


# Tasks whose in-context learning the instruct stage trains. They share the evaluation tasks' entities
# and prompt format but ask other facts, so the six paper tasks stay untrained.
INSTRUCT_ICL_TASKS = ("animal-class", "country-continent", "country-language", "food-category")


@dataclass(frozen=True)
class IclTask:
    """A mapping from an entity (by name) to the answer, over one family's entities."""

    name: str
    family: str
    answers: Mapping[str, str]


# Tasks computed from the entity's name alone (no fact to recall), one of each per family. With only
# one fact task per family, a VLM trained here answered the food-category of any food whatever the
# demonstrations asked (food-color text ICL .39 -> .03): several tasks over the same inputs make the
# demonstrations, not the family, decide the answer.
FORMAT_TASKS: dict[str, Callable[[str], str]] = {
    "name": lambda name: name,
    "capitals": lambda name: name.upper(),
    "initial": lambda name: name[0].upper(),
}


def training_icl_tasks(
    names: Sequence[str] = INSTRUCT_ICL_TASKS, formats: Sequence[str] = tuple(FORMAT_TASKS)
) -> list[IclTask]:
    """The extra tasks, plus per family one task per format (`FORMAT_TASKS`): e.g. `name-flag`
    answers the entity's own name, so image demonstrations show the format without a fact to recall."""
    trained_paper_tasks = sorted(set(names) & set(PAPER_TASKS))
    if trained_paper_tasks:
        raise ValueError(f"the VLM must not train on the paper's evaluation tasks: {trained_paper_tasks}")
    unknown = sorted(set(formats) - set(FORMAT_TASKS))
    if unknown:
        raise ValueError(f"unknown format tasks {unknown}; known: {sorted(FORMAT_TASKS)}")
    tasks = []
    for name in names:
        family = task_spec(name)["entities"]
        task = load_builtin_task(name)
        tasks.append(IclTask(name, family, {item.input: item.output for item in task.items}))
    for form in formats:
        answer = FORMAT_TASKS[form]
        for family in FAMILIES:
            entities = entity_names(family)
            tasks.append(IclTask(f"{form}-{KIND[family]}", family, {name: answer(name) for name in entities}))
    return tasks


@dataclass(frozen=True)
class InstructMix:
    """What one instruct step trains on: one kind per step (so a batch's sequences have similar
    lengths), drawn with these weights. In-context prompts are 2-6 times longer than a question
    (4 tokens per image), hence their smaller batch: measured per step on the real model, a question
    batch of 16 costs about what an ICL batch of 8 does."""

    questions: float = 0.3
    text_icl: float = 0.3
    image_icl: float = 0.4
    icl_batch_size: int = 8
    max_shots: int = 5
    format_tasks: tuple[str, ...] = tuple(FORMAT_TASKS)
    # On text-only steps, weight of the KL divergence from the base LM's (adapters off) next-token
    # distribution at the answer positions: the VLM's language model should answer text as the base
    # does. At 0.5 with rank-16 LoRA on attention and MLP the LM moved further (cosine 0.978 at the
    # lowest layer, against 0.99) but lost 0.13 of text ICL (bench/NOTES.md).
    text_distill_weight: float = 1.0
    # On image in-context steps, weight of the KL divergence from the base LM reading the same prompt
    # with the entities' names in place of the pictures (`Example.text_prompt`): the pictures should
    # act in a prompt as their names do, beyond the answers of the few training tasks.
    image_distill_weight: float = 1.0


def icl_example(
    task: IclTask,
    pictures: Mapping[str, Sequence[EntityImage]],
    shots: int,
    modality: Modality,
    rng: np.random.Generator,
) -> Example:
    """`shots` demonstrations and a query of `task`, in the paper's `Q:{x}\nA:{y}\n\n` format; with
    modality "image" every input is a training picture of the entity (a random style)."""
    entities = [name for name in task.answers if name in pictures]
    chosen = rng.choice(len(entities), size=shots + 1, replace=len(entities) < shots + 1)
    text, named, images = "", "", []
    for position, index in enumerate(chosen):
        entity = entities[int(index)]
        if modality == "image":
            options = pictures[entity]
            images.append(options[int(rng.integers(len(options)))])
            query_input = "<image>"
        else:
            query_input = entity
        if position < shots:
            text += DEFAULT_TEMPLATE.demonstration(query_input, task.answers[entity])
            named += DEFAULT_TEMPLATE.demonstration(entity, task.answers[entity])
        else:
            text += DEFAULT_TEMPLATE.query.format(input=query_input)
            named += DEFAULT_TEMPLATE.query.format(input=entity)
            answer = DEFAULT_TEMPLATE.answer.format(output=task.answers[entity])
    return Example(text, answer, tuple(images), named if images else None)


def instruct_examples(
    pool: Sequence[EntityImage],
    tasks: Sequence[IclTask],
    mix: InstructMix,
    batch_size: int,
    seed: int,
    step: int,
) -> tuple[list[Example], np.random.Generator]:
    """The instruct stage's batch of `step` (questions and captions, text ICL or image ICL) and the
    generator for its augmentation. Only tasks with at least two pictured entities in `pool` are used."""
    rng = np.random.default_rng([seed, step, 2])
    weights = np.array([mix.questions, mix.text_icl, mix.image_icl])
    kind = ("questions", "text", "image")[int(rng.choice(3, p=weights / weights.sum()))]
    if kind == "questions":
        return captions_and_questions(pool, batch_size, rng), rng
    modality: Modality = "image" if kind == "image" else "text"
    pictures: dict[str, dict[str, list[EntityImage]]] = {}
    for image in pool:
        pictures.setdefault(image.family, {}).setdefault(image.name, []).append(image)
    usable = [
        task for task in tasks if sum(name in pictures.get(task.family, {}) for name in task.answers) >= 2
    ]
    if not usable:
        raise ValueError("no in-context-learning task has two pictured entities in the training pool")
    examples = []
    for _ in range(mix.icl_batch_size):
        task = usable[int(rng.integers(len(usable)))]
        shots = int(rng.integers(1, mix.max_shots + 1))
        examples.append(icl_example(task, pictures[task.family], shots, modality, rng))
    return examples, rng
