"""Training data of the embedded VLM: entity pictures, augmentation, captions and question/answer pairs.

Everything is drawn from a seeded generator per (seed, step), so a resumed run sees exactly the
batches an uninterrupted run would have seen, without storing any random state.

None of the examples is one of the paper's evaluation tasks: stage 1 names the entity, stage 2 asks
for its name or its kind (flag, animal, food). The six tasks (capital, currency, latin name, young,
colour, flavour) are never trained; the VLM must get them from its language model.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance

from taskvec.tasks.builtin import entity_names, images_by_entity, slugify

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
    with Image.open(path) as image:
        return image.convert("RGB")


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
    """One training sequence: `prompt` (with <image> placeholders) is context, `answer` is predicted."""

    prompt: str
    answer: str
    images: tuple[EntityImage, ...]


def caption_example(image: EntityImage, rng: np.random.Generator) -> Example:
    """Stage 1: a short caption naming the entity, either with its family word or the naming prompt."""
    family_prompt = f"<image>\n{CAPTION_FAMILY_WORD[image.family]}:"
    prompt = family_prompt if rng.random() < 0.5 else NAMING_PROMPT
    return Example(prompt, f" {image.name}{ANSWER_END}", (image,))


QUESTIONS_NAME = ("What is shown?", "What is in the picture?", "Name what you see.")
QUESTIONS_KIND = (
    "Is this a flag, an animal or a food?",
    "What kind of picture is this: flag, animal or food?",
)


def question_example(image: EntityImage, rng: np.random.Generator) -> Example:
    """Stage 2: a question about the picture (never one of the evaluation tasks)."""
    if rng.random() < 0.7:
        question = QUESTIONS_NAME[int(rng.integers(len(QUESTIONS_NAME)))]
        answer = image.name
    else:
        question = QUESTIONS_KIND[int(rng.integers(len(QUESTIONS_KIND)))]
        answer = KIND[image.family]
    return Example(f"<image>\nQuestion: {question}\nAnswer:", f" {answer}{ANSWER_END}", (image,))


def sample_examples(
    pool: Sequence[EntityImage], batch_size: int, seed: int, step: int, stage: str
) -> tuple[list[Example], np.random.Generator]:
    """The batch of `step`; also returns the generator to use for that batch's augmentation.

    Stage "qa" mixes in captions (a third of the examples) so the naming prompt stays trained.
    """
    rng = np.random.default_rng([seed, step, 1 if stage == "caption" else 2])
    chosen = rng.choice(len(pool), size=batch_size, replace=len(pool) < batch_size)
    examples = []
    for index in chosen:
        make = caption_example if stage == "caption" or rng.random() < 1 / 3 else question_example
        examples.append(make(pool[int(index)], rng))
    return examples, rng
