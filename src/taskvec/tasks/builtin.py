"""Built-in tasks: facts in data/tasks/*.json, pictures in data/images (see docs/DATA_CARD.md)."""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import Any

from taskvec.tasks.splits import assign_splits
from taskvec.tasks.task import Item, Task, TaskFileError

DATA_DIR = Path(__file__).resolve().parent.parent / "data"
TASKS_DIR = DATA_DIR / "tasks"
IMAGES_DIR = DATA_DIR / "images"
MANIFEST = IMAGES_DIR / "manifest.json"

# The paper's six tasks, in the paper's order; list_tasks() puts them first.
PAPER_TASKS = (
    "country-capital",
    "country-currency",
    "animal-latin",
    "animal-young",
    "food-color",
    "food-flavor",
)


def slugify(name: str) -> str:
    """File-name form of an entity name, as used by the image bundle ("polar bear" -> "polar-bear")."""
    return "-".join("".join(c if c.isalnum() else " " for c in name.lower()).split())


def list_tasks() -> list[str]:
    """Names of the built-in tasks, the paper's six first."""
    others = sorted(p.stem for p in TASKS_DIR.glob("*.json") if p.stem not in PAPER_TASKS)
    return [name for name in PAPER_TASKS if (TASKS_DIR / f"{name}.json").is_file()] + others


@cache
def task_spec(name: str) -> dict[str, Any]:
    """The raw JSON of a built-in task file (instruction, task_words, answers, dropped, ...)."""
    path = TASKS_DIR / f"{name}.json"
    if not path.is_file():
        raise KeyError(f"no built-in task {name!r}; built-in tasks: {', '.join(list_tasks())}")
    spec: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    return spec


@cache
def manifest() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(MANIFEST.read_text(encoding="utf-8"))
    return data


@cache
def images_by_entity() -> dict[str, dict[str, Path]]:
    """ "family/slug" -> {style: absolute path} for every picture in the bundle."""
    index: dict[str, dict[str, Path]] = {}
    for record in manifest()["images"]:
        index.setdefault(record["entity"], {})[record["style"]] = IMAGES_DIR / record["path"]
    return index


def entity_names(family: str) -> list[str]:
    spec = json.loads((TASKS_DIR / "entities" / f"{family}.json").read_text(encoding="utf-8"))
    return [entity["name"] for entity in spec["entities"]]


def parse_answers(value: str | list[str], where: str) -> tuple[str, tuple[str, ...]]:
    """An answer cell is one string or a list whose first element is the output, the rest aliases."""
    answers = [value] if isinstance(value, str) else value
    if not answers or not all(isinstance(a, str) and a.strip() for a in answers):
        raise TaskFileError(f"{where}: answer must be a non-empty string or list of strings, got {value!r}")
    return answers[0], tuple(answers[1:])


def load_builtin_task(
    name: str, *, instruction: str | None = None, task_words: tuple[str, ...] | None = None
) -> Task:
    spec = task_spec(name)
    path = TASKS_DIR / f"{name}.json"
    family = spec["entities"]
    known = set(entity_names(family))
    images = images_by_entity()
    items = []
    for entity, value in spec["answers"].items():
        where = f"{path}: item {entity!r}"
        if entity not in known:
            raise TaskFileError(f"{where}: not an entity of data/tasks/entities/{family}.json")
        output, aliases = parse_answers(value, where)
        pictures = images.get(f"{family}/{slugify(entity)}", {})
        if not pictures:
            raise TaskFileError(f"{where}: no images in {MANIFEST}")
        items.append(Item(entity, output, aliases, dict(pictures)))
    return Task(
        name=name,
        instruction=spec["instruction"] if instruction is None else instruction,
        items=tuple(items),
        splits=assign_splits([item.input for item in items]),
        task_words=tuple(spec["task_words"]) if task_words is None else task_words,
        source="builtin",
    )
