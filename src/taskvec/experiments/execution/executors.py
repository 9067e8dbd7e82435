"""Where a run's expensive steps execute: in this process one after another, or on Ray workers.

The runner keeps the orchestration (which steps, in which phase, what is done with their results)
and hands each phase's steps to an executor as one batch, so an executor is free to run a batch's
steps in any order or at once. Every executor leaves the same files in the driver's step cache and
vector store; that cache is the only place results of different executors meet.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from taskvec.analysis import PAPER_ANALYSES, Analysis, VectorKey
from taskvec.analysis.settings import AnalysisSettings
from taskvec.caching import StepCache
from taskvec.experiments.execution.steps import StepRunner, TestStep
from taskvec.experiments.protocol.conditions import Condition
from taskvec.experiments.results.step_results import SweepResult, TestAnswers
from taskvec.progress import with_progress
from taskvec.tasks import Task

# One task's sweeps: the task and its (condition, seed) pairs.
SweepJob = tuple[Task, list[tuple[Condition, int | None]]]
# One task's test evaluations: the task and its steps (condition, seed, layer and scale).
TestJob = tuple[Task, list[TestStep]]
VectorJob = tuple[Condition, Task, int | None]


@dataclass(frozen=True)
class EarlySteps:
    """What the run needs before its layer choice: the vectors, the sweeps that read them, and the
    tests of conditions that patch nothing (they need no layer)."""

    vectors: Sequence[VectorJob]
    sweeps: Sequence[SweepJob]
    tests: Sequence[TestJob]


# Each sweep job's results and each test job's, in the jobs' order.
EarlyResults = tuple[list[list[SweepResult]], list[list[TestAnswers]]]


@dataclass(frozen=True)
class AnalysisJob:
    """What the run's analyses read: an executor may compute their steps into `cache` beforehand."""

    tasks: Sequence[Task]
    layer: int
    vectors: Mapping[VectorKey, torch.Tensor]
    settings: AnalysisSettings
    cache: StepCache
    analyses: Sequence[Analysis[Any]] = PAPER_ANALYSES


class StepExecutor(Protocol):
    def vectors(self, steps: StepRunner, jobs: Sequence[VectorJob]) -> None:
        """Every vector of `jobs` in the driver's vector store."""

    def sweeps(self, steps: StepRunner, jobs: Sequence[SweepJob]) -> list[list[SweepResult]]:
        """Each job's sweep results, in the job's order (as `StepRunner.sweeps` returns them)."""

    def tests(self, steps: StepRunner, jobs: Sequence[TestJob]) -> list[list[TestAnswers]]:
        """Each job's test answers, in the job's order (as `StepRunner.tests` returns them)."""

    def before_layer_choice(self, steps: StepRunner, early: EarlySteps) -> EarlyResults:
        """`vectors`, then `sweeps` and `tests` of the early steps, in any order their inputs allow."""

    def analyses(self, job: AnalysisJob) -> None:
        """The analyses' expensive steps in the job's cache (or nothing: the driver computes them)."""


class SequentialExecutor:
    """The steps in this process on the driver's own models, task after task."""

    def vectors(self, steps: StepRunner, jobs: Sequence[VectorJob]) -> None:
        for condition, task, seed in with_progress(jobs, "vectors", enabled=steps.progress):
            steps.vector_for(condition, task, seed)

    def sweeps(self, steps: StepRunner, jobs: Sequence[SweepJob]) -> list[list[SweepResult]]:
        label = "layer sweeps (validation), tasks"
        return [steps.sweeps(task, work) for task, work in with_progress(jobs, label, enabled=steps.progress)]

    def tests(self, steps: StepRunner, jobs: Sequence[TestJob]) -> list[list[TestAnswers]]:
        label = "test, tasks"
        return [steps.tests(task, work) for task, work in with_progress(jobs, label, enabled=steps.progress)]

    def before_layer_choice(self, steps: StepRunner, early: EarlySteps) -> EarlyResults:
        self.vectors(steps, early.vectors)
        return self.sweeps(steps, early.sweeps), self.tests(steps, early.tests)

    def analyses(self, job: AnalysisJob) -> None:
        """Nothing ahead: `run_analyses` computes each step here as it needs it."""
