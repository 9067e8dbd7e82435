"""Small tasks written in the tiny tokenizer's vocabulary, with random images, for analysis tests.

Two tasks share their inputs (countries -> capital, countries -> colour) so task conflict has a
pair; a third (food -> colour) has other inputs. Every word is in the tiny vocabulary, so logit-lens
probabilities are of real tokens, not of the unknown token.
"""

from __future__ import annotations

from pathlib import Path

from conftest import random_image

from taskvec.tasks import Item, Task

COUNTRIES = (
    ("France", "Paris", "blue"),
    ("Japan", "Tokyo", "red"),
    ("Italy", "Rome", "green"),
    ("Spain", "Madrid", "yellow"),
    ("Egypt", "Cairo", "black"),
    ("Peru", "Lima", "white"),
    ("Germany", "Berlin", "orange"),
    ("Kenya", "Nairobi", "purple"),
)
FOODS = (
    ("apple", "red"),
    ("banana", "yellow"),
    ("bread", "brown"),
    ("cheese", "white"),
    ("rice", "white"),
    ("grape", "purple"),
)


def _image(directory: Path, name: str, seed: int) -> dict[str, Path]:
    path = directory / f"{name}.png"
    if not path.is_file():
        random_image(seed).save(path)
    return {"picture": path}


def make_tiny_tasks(directory: Path) -> list[Task]:
    directory.mkdir(parents=True, exist_ok=True)
    country_splits = {"val": (0, 1, 2, 3, 4), "test": (5, 6, 7)}
    capital = Task(
        "tiny-capital",
        "The capital city of the country:",
        tuple(Item(c, k, images=_image(directory, c, i)) for i, (c, k, _) in enumerate(COUNTRIES)),
        country_splits,
        task_words=("capital", "city"),
    )
    flag_colour = Task(
        "tiny-flag-colour",
        "The colour of the country:",
        tuple(Item(c, f, images=_image(directory, c, i)) for i, (c, _, f) in enumerate(COUNTRIES)),
        country_splits,
        task_words=("colour",),
    )
    food_colour = Task(
        "tiny-food-colour",
        "The colour of the food:",
        tuple(Item(f, c, images=_image(directory, f, 20 + i)) for i, (f, c) in enumerate(FOODS)),
        {"val": (0, 1, 2, 3), "test": (4, 5)},
        task_words=("colour",),
    )
    return [capital, flag_colour, food_colour]
