"""Baselines that need no model: what a constant answer scores.

A vector patched at the last layers can simply write one frequent answer ("sweet" for every food's
flavour); the majority answer of the validation split, given to every test query, is the floor such
an answer reaches, so a patched condition is only evidence of a task vector where it beats this.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

from taskvec.evaluation import is_correct_by
from taskvec.tasks import Task


def majority_answer(task: Task) -> str:
    """The most frequent validation output (ties: the alphabetically first)."""
    counts = Counter(item.output for item in task.split("val"))
    if not counts:
        raise ValueError(f"task {task.name!r} has no validation items")
    return min(counts, key=lambda answer: (-counts[answer], answer))


def majority_answer_baseline(tasks: Sequence[Task], *, metric: str, test_limit: int | None) -> dict[str, Any]:
    """Test accuracy of answering every query with the task's validation majority answer."""
    per_task: dict[str, float] = {}
    answers: dict[str, str] = {}
    for task in tasks:
        answer = majority_answer(task)
        items = task.split("test")[:test_limit]
        hits = sum(is_correct_by(answer, item.answers(), metric) for item in items)
        per_task[task.name], answers[task.name] = hits / len(items), answer
    return {
        "metric": metric,
        "answers": answers,
        "per_task": per_task,
        "mean": sum(per_task.values()) / len(per_task),
    }
