"""95% bootstrap intervals of accuracies over test items.

A table's number is the mean over tasks of the mean over seeds of the per-item hits. The bootstrap
resamples the items of each task with replacement, the same resampled items for every seed of that
task (seeds ask the same queries with other demonstrations), and recomputes that mean; the interval
is the 2.5th and 97.5th percentile. Seeded, so a rerun gives the same interval.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

CONFIDENCE = 0.95


@dataclass(frozen=True)
class Interval:
    low: float
    high: float

    def overlaps(self, other: Interval) -> bool:
        return self.low <= other.high and other.low <= self.high


def bootstrap_interval(
    hits_per_task: Mapping[str, Sequence[Sequence[bool]]], *, samples: int = 1000, seed: int = 0
) -> Interval:
    """`hits_per_task[task][seed][item]`: whether each answer was correct."""
    if not hits_per_task:
        raise ValueError("no hits to bootstrap")
    rng = np.random.default_rng(seed)
    total = np.zeros(samples)
    for task, per_seed in hits_per_task.items():
        matrix = np.asarray(per_seed, dtype=float)  # [seeds, items]
        if matrix.ndim != 2 or matrix.shape[1] == 0:
            raise ValueError(f"task {task!r}: every seed needs the same non-empty list of items")
        draws = rng.integers(0, matrix.shape[1], size=(samples, matrix.shape[1]))
        total += matrix[:, draws].mean(axis=2).mean(axis=0)
    means = total / len(hits_per_task)
    tail = (1 - CONFIDENCE) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    return Interval(round(float(low), 4), round(float(high), 4))
