"""Tasks: built-in tasks with text and image inputs, and loaders for external task files.

    from taskvec.tasks import load_task, list_tasks
    task = load_task("country-capital")
    item = task.split("val")[0]          # Item(input="...", output="...", aliases=(...), images={...})
    item.image("twemoji")                # Path to a PNG

A leaf module: standard library, pillow and numpy only (no torch, no models).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from taskvec.tasks.builtin import PAPER_TASKS, list_tasks, load_builtin_task
from taskvec.tasks.loaders import STRICT_HELP, load_task_file
from taskvec.tasks.task import (
    STYLE_PREFERENCE,
    DuplicateInputWarning,
    Item,
    MissingImageError,
    Task,
    TaskFileError,
)

__all__ = [
    "PAPER_TASKS",
    "STRICT_HELP",
    "STYLE_PREFERENCE",
    "DuplicateInputWarning",
    "Item",
    "MissingImageError",
    "Task",
    "TaskFileError",
    "list_tasks",
    "load_task",
]


def load_task(
    name_or_path: str | Path,
    *,
    instruction: str | None = None,
    task_words: Sequence[str] | None = None,
    image_root: str | Path | None = None,
    strict: bool = False,
) -> Task:
    """A built-in task by name, or an external task file by path (format detected from the file).

    `instruction` and `task_words` override the task's own; for an external file they default to
    those of the built-in task of the same name, if any. `image_root` is where relative image paths
    of an external file start (default: the file's folder, or `data/` for `data/annotations/*.json`).
    An external file that gives an input more than once loads as one item of all its answers, with a
    `DuplicateInputWarning`; `strict=True` refuses it (`TaskFileError`). Built-in tasks never repeat one.
    """
    text = str(name_or_path)
    if not isinstance(name_or_path, Path) and text in list_tasks() and not Path(text).is_file():
        words = tuple(task_words) if task_words is not None else None
        return load_builtin_task(text, instruction=instruction, task_words=words)
    path = Path(text).expanduser()
    if not path.exists():
        raise TaskFileError(
            f"unknown task {text!r}: not a built-in task ({', '.join(list_tasks())}) and no such file"
        )
    return load_task_file(
        path, instruction=instruction, task_words=task_words, image_root=image_root, strict=strict
    )
