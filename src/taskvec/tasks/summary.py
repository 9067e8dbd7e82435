"""What `taskvec tasks` prints: the built-in tasks, their sizes per split and their image styles."""

from __future__ import annotations

from typing import Any

from taskvec.tasks.builtin import PAPER_TASKS, list_tasks, load_builtin_task, task_spec

SPLIT_ORDER = ("val", "test", "train")


def task_summaries() -> list[dict[str, Any]]:
    """One machine-readable record per built-in task."""
    summaries = []
    for name in list_tasks():
        task = load_builtin_task(name)
        spec = task_spec(name)
        summaries.append(
            {
                "name": name,
                "paper_task": name in PAPER_TASKS,
                "instruction": task.instruction,
                "task_words": list(task.task_words),
                "entities": spec["entities"],
                "items": len(task.items),
                "splits": {split: len(task.splits.get(split, ())) for split in SPLIT_ORDER},
                "styles": task.style_counts(),
                "dropped": len(spec.get("dropped", {})),
            }
        )
    return summaries


def format_styles(counts: dict[str, int], total: int) -> str:
    if counts and all(count == total for count in counts.values()):
        return ", ".join(counts) + f" ({len(counts)} x {total})"
    return ", ".join(f"{style} {count}" for style, count in counts.items()) or "text only"


def task_table() -> str:
    """A readable table of the built-in tasks (paper tasks marked with *)."""
    rows = [("task", "val", "test", "train", "instruction", "image styles")]
    for summary in task_summaries():
        splits = summary["splits"]
        rows.append(
            (
                summary["name"] + (" *" if summary["paper_task"] else ""),
                str(splits["val"]),
                str(splits["test"]),
                str(splits["train"]),
                summary["instruction"],
                format_styles(summary["styles"], summary["items"]),
            )
        )
    widths = [max(len(row[col]) for row in rows) for col in range(len(rows[0]) - 1)]
    lines = []
    for row in rows:
        # Split sizes right-aligned, text left-aligned; the last column is left ragged.
        cells = [
            cell.rjust(width) if 1 <= col <= 3 else cell.ljust(width)
            for col, (cell, width) in enumerate(zip(row[:-1], widths, strict=True))
        ]
        lines.append("  ".join([*cells, row[-1]]).rstrip())
    lines.append("* = task of the paper. Splits are seeded and stable; images: src/taskvec/data/images.")
    return "\n".join(lines)
