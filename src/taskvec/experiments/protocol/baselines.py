"""Floors that need no model: what a constant answer, or the input itself, scores.

A vector patched at the last layers can simply write one frequent answer ("sweet" for every food's
flavour): the validation majority answer, given to every test query, is the floor such an answer
reaches. The paper's prefix metric (either string may start with the other) also credits copying
the input on some tasks ("chicken" counts for "chick"; 0.85 on Todd et al.'s present-past), so
answering with the query's own input is the second floor. A condition is evidence of a task vector
only where it beats both.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence

from taskvec.evaluation import is_correct_by
from taskvec.experiments.results.run_results import Floor
from taskvec.intervals import bootstrap_interval
from taskvec.tasks import Item, Task


def majority_answer(task: Task) -> str:
    """The most frequent validation output (ties: the alphabetically first)."""
    counts = Counter(item.output for item in task.split("val"))
    if not counts:
        raise ValueError(f"task {task.name!r} has no validation items")
    return min(counts, key=lambda answer: (-counts[answer], answer))


def _floor(
    name: str,
    label: str,
    tasks: Sequence[Task],
    answer_for: Callable[[Task, Item], str],
    *,
    metric: str,
    test_limit: int | None,
    samples: int,
) -> Floor:
    hits: dict[str, list[list[bool]]] = {}
    for task in tasks:
        items = task.split("test")[:test_limit]
        hits[task.name] = [[is_correct_by(answer_for(task, item), item.answers(), metric) for item in items]]
    per_task = {task: sum(rows[0]) / len(rows[0]) for task, rows in hits.items()}
    return Floor(
        name,
        label,
        metric,
        per_task,
        sum(per_task.values()) / len(per_task),
        bootstrap_interval(hits, samples=samples),
    )


def model_free_floors(
    tasks: Sequence[Task], *, metric: str, test_limit: int | None, samples: int = 1000
) -> list[Floor]:
    """The majority-answer floor and the copy-the-input floor, both scored by `metric`."""
    answers = {task.name: majority_answer(task) for task in tasks}
    majority = _floor(
        "majority_answer",
        "majority answer",
        tasks,
        lambda task, _item: answers[task.name],
        metric=metric,
        test_limit=test_limit,
        samples=samples,
    )
    majority.answers = answers
    copy_input = _floor(
        "copy_input",
        "copy the input",
        tasks,
        lambda _task, item: item.input,
        metric=metric,
        test_limit=test_limit,
        samples=samples,
    )
    return [majority, copy_input]
