"""Scoring a run: its answered test steps -> result rows, summaries, floors and tables, in one call
(`score_run`); its validation sweeps -> the accuracy curves the layer choice reads (`validation_curves`).

The runner gathers what the steps returned; everything that turns answers into numbers happens here,
in one direction: rows (per step and metric), then summaries (per condition and metric), then the
model-free floors and the tables that place each summary beside them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from taskvec.evaluation import is_correct, layer_accuracy
from taskvec.experiments.config import METRICS, RunConfig
from taskvec.experiments.protocol.baselines import model_free_floors
from taskvec.experiments.protocol.conditions import Condition
from taskvec.experiments.protocol.tables import (
    TABLE_DEFINITIONS,
    build_tables,
    score_rows,
    summarise,
    table_metric,
)
from taskvec.experiments.results.run_results import ConditionResult, Example, Floor, ResultTable, Summary
from taskvec.experiments.results.step_results import SweepResult, TestAnswers
from taskvec.tasks import Task


@dataclass(frozen=True)
class AnsweredStep:
    """One condition's test answers on one task and seed, with where it was patched."""

    condition: Condition
    task: str
    seed: int | None
    layer: int | None  # None: asked unpatched (an unpatched condition, or no layer helped)
    scale: float | None
    answers: TestAnswers
    vector_token: int | None = None  # the patched vector's own decoded token
    vector_answer: str | None = None  # that token as text, as the answers are decoded


@dataclass(frozen=True)
class Scores:
    rows: list[ConditionResult]
    summaries: list[Summary]  # one per condition, in the table metric of its tables
    tables: list[ResultTable]
    floors: list[Floor]  # in the run's metric
    examples: list[Example]


def score_run(
    conditions: Sequence[Condition],
    answered: Sequence[AnsweredStep],
    tasks: Sequence[Task],
    config: RunConfig,
) -> Scores:
    """Every number of results.json that comes from the answers."""
    rows: list[ConditionResult] = []
    examples: list[Example] = []
    first_seed = config.seeds[0]
    for step in answered:
        rows += score_rows(
            step.condition,
            step.task,
            step.seed,
            step.layer,
            step.answers.generated,
            step.answers.expected,
            first_tokens=step.answers.first_tokens,
            vector_token=step.vector_token,
            vector_answer=step.vector_answer,
            samples=config.bootstrap_samples,
            scale=step.scale,
        )
        if step.task == tasks[0].name and step.seed in (None, first_seed):
            examples += _examples(step, config.examples_per_condition)
    floors: dict[str, list[Floor]] = {
        metric: model_free_floors(
            list(tasks), metric=metric, test_limit=config.test_limit, samples=config.bootstrap_samples
        )
        for metric in METRICS
    }
    summaries: dict[tuple[str, str], Summary] = {}
    for condition in conditions:
        for metric in METRICS:
            summary = summarise(rows, condition, metric, samples=config.bootstrap_samples)
            if summary is not None:
                summaries[(condition.name, metric)] = summary
    tables = build_tables(
        list(conditions),
        summaries,
        floors,
        metric=config.metric,
        ensemble_ignore_case=config.ensemble_ignore_case,
        max_new_tokens=config.max_new_tokens,
    )
    ensemble = next(d for d in TABLE_DEFINITIONS if d.id == "ensemble")
    ensemble_metric = table_metric(ensemble, config.metric, config.ensemble_ignore_case)
    shown = [summaries[(c.name, ensemble_metric if c.ignores_case else config.metric)] for c in conditions]
    return Scores(rows, shown, tables, floors[config.metric], examples)


def _examples(step: AnsweredStep, count: int) -> list[Example]:
    answers = step.answers
    return [
        Example(
            step.task,
            step.condition.name,
            step.seed,
            step.layer,
            answers.inputs[index],
            answers.images[index],
            answers.expected[index][0],
            answers.generated[index],
        )
        for index in range(min(count, len(answers.generated)))
    ]


def validation_curves(
    sweeps: dict[str, list[SweepResult]], *, ignore_case: bool
) -> tuple[dict[float, dict[str, list[list[float]]]], dict[str, float]]:
    """{scale: {task: one accuracy-per-layer curve per seed}} of a condition's sweeps, and each task's
    accuracy of the same queries unpatched (the mean over its seeds' sweeps)."""
    curves: dict[float, dict[str, list[list[float]]]] = {}
    unpatched: dict[str, float] = {}
    for task, runs in sweeps.items():
        for run in runs:
            for scale, tokens in zip(run.scales, run.tokens_per_scale, strict=True):
                curve = layer_accuracy(tokens, run.expected, ignore_case=ignore_case)
                curves.setdefault(scale, {}).setdefault(task, []).append(curve)
        hits = [
            sum(
                is_correct(token, expected, ignore_case=ignore_case)
                for token, expected in zip(run.unpatched, run.expected, strict=True)
            )
            / len(run.expected)
            for run in runs
        ]
        unpatched[task] = sum(hits) / len(hits)
    return curves, unpatched
