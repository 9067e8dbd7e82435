"""Recognition: does the VLM name a picture? Greedy answer to the naming prompt, prefix match."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from taskvec.engine import generate_greedy
from taskvec.models.handle import ModelHandle
from taskvec.vlm.data import NAMING_PROMPT, EntityImage, load_picture


@dataclass(frozen=True)
class Naming:
    image: EntityImage
    answer: str

    @property
    def correct(self) -> bool:
        """The paper's metric: both non-empty and one starts with the other (here ignoring case)."""
        said = self.answer.strip().split("\n")[0].strip().lower()
        name = self.image.name.lower()
        return bool(said) and (said.startswith(name) or name.startswith(said))


def name_pictures(
    handle: ModelHandle,
    images: Sequence[EntityImage],
    prompt: str = NAMING_PROMPT,
    batch_size: int = 32,
    max_new_tokens: int = 6,
) -> list[Naming]:
    results: list[Naming] = []
    for start in range(0, len(images), batch_size):
        chunk = images[start : start + batch_size]
        inputs = handle.build_inputs([prompt] * len(chunk), [[load_picture(image.path)] for image in chunk])
        answers = generate_greedy(handle, inputs, max_new_tokens=max_new_tokens)
        results.extend(Naming(image, answer) for image, answer in zip(chunk, answers, strict=True))
    return results


def accuracy_by_family(results: Sequence[Naming]) -> dict[str, float]:
    totals: dict[str, list[int]] = {}
    for result in results:
        totals.setdefault(result.image.family, []).append(int(result.correct))
    return {family: sum(marks) / len(marks) for family, marks in totals.items()}
