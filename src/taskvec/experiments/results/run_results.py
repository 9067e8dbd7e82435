"""The typed results of a run: what results.json and summary.csv hold, and what the report reads.

Every accuracy carries its 95% bootstrap interval over test items; every patched result carries the
share of its answers that equal the vector's own decoded answer (final norm + unembedding of the
patched vector alone), which is 1.0 when the answer no longer depends on the query.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from taskvec.atomic_files import replacing, write_json_atomically
from taskvec.checks.results import EngineChecks
from taskvec.experiments.config import RunConfig
from taskvec.intervals import Interval
from taskvec.layer_choice import LayerChoice
from taskvec.typed_json import from_json, to_json

RESULTS_FORMAT = 3
SUMMARY_FIELDS = (
    "model",
    "condition",
    "label",
    "task",
    "seed",
    "metric",
    "accuracy",
    "low",
    "high",
    "n",
    "layer",
    "scale",
    "vector_answer_share",
    "vector_answer_accuracy",
    "max_new_tokens",
)


@dataclass
class Floor:
    """A model-free answer rule scored on the test split, per task and as the mean over tasks."""

    name: str
    label: str
    metric: str
    per_task: dict[str, float]
    mean: float
    interval: Interval
    answers: dict[str, str] | None = None  # the constant answer per task, for the majority floor


@dataclass
class ConditionResult:
    """One condition on one task and seed, scored by one metric."""

    condition: str
    model: str  # whose vectors were patched: "vlm" (the model run) or "llm" (its base LM)
    task: str
    seed: int | None  # None for conditions that do not depend on sampled demonstrations
    layer: int | None  # the patched layer; None for unpatched conditions
    metric: str
    accuracy: float
    n: int
    interval: Interval
    hits: str  # "1" / "0" per test item, in the split's order: any aggregate can be re-bootstrapped
    vector_answer_share: float | None = None
    # The accuracy of answering every query with the patched vector's own decoded token.
    vector_answer_accuracy: float | None = None
    scale: float | None = None  # a function vector's, added at `layer`; None: the residual replaced

    def hit_list(self) -> list[bool]:
        return [flag == "1" for flag in self.hits]


@dataclass
class Summary:
    """A condition over the run's tasks (mean over tasks of the mean over seeds), one metric."""

    condition: str
    label: str
    metric: str
    mean: float
    interval: Interval
    seed_std: float  # standard deviation over seeds of the task mean (0 with one seed)
    seeds: int
    per_task: dict[str, float]
    items: int  # test items per seed, summed over tasks
    layer: int | None = None
    vector_answer_share: float | None = None
    vector_answer_accuracy: float | None = None
    scale: float | None = None

    def query_independent(self, threshold: float) -> bool:
        """Whether the answers are mostly the vector's own decoded answer, whatever the query."""
        return self.vector_answer_share is not None and self.vector_answer_share >= threshold


@dataclass
class TableColumn:
    column: str
    condition: str
    summary: Summary
    x: int | None = None  # a curve's x value


@dataclass
class ResultTable:
    """One of the report's tables: our columns, the paper's rows of the same columns, the floors."""

    id: str
    title: str
    metric: str
    max_new_tokens: int
    columns: list[TableColumn]
    paper: dict[str, dict[str, float | None]] = field(default_factory=dict)
    paper_source: str = ""
    floors: list[Floor] = field(default_factory=list)
    curve: bool = False  # columns are series over x (the ensemble curve)

    def column(self, name: str) -> TableColumn | None:
        return next((column for column in self.columns if column.column == name), None)

    def series(self, name: str) -> list[TableColumn]:
        return sorted((c for c in self.columns if c.column == name), key=lambda c: c.x or 0)


@dataclass
class Example:
    task: str
    condition: str
    seed: int | None
    layer: int | None
    input: str
    image: str | None
    expected: str
    generated: str


@dataclass
class VectorCosine:
    """Cosine per layer of the base LM's and the model's text-ICL vectors (mean over tasks and seeds)."""

    per_layer: list[float]
    layer: int | None
    at_layer: float | None


@dataclass
class HeadEffects:
    """The attention heads behind one task's function vectors from one model and demonstration kind."""

    role: str  # "vlm" (the model run) or "llm" (its base LM)
    task: str
    spec: str  # text-icl or image-icl
    k: int
    seeds: list[int]
    effects: list[list[float]]  # [layer][head] mean indirect effect, mean over seeds
    top_heads: list[list[int]]  # (layer, head) of the k largest mean effects, largest first
    heads_per_seed: list[list[list[int]]]  # each seed's function vector's heads
    top_tokens: list[str]  # the seeds' mean function vector through the final norm and unembedding


@dataclass
class HeadOverlap:
    """Whether text and image demonstrations of a task put it in the same heads (of one model)."""

    task: str
    k: int
    shared: list[list[int]]  # heads in both top-k sets, in the text set's order
    correlation: float | None  # Pearson over every head's mean effect, text vs image


@dataclass
class PaperNumbers:
    """The paper's own figures, recorded beside the run's (experiments/protocol/paper_numbers.py)."""

    source: str
    table: dict[str, dict[str, float | None]]
    directions_model: str
    directions: dict[str, float]
    llm_to_vlm: dict[str, dict[str, float | None]]
    llm_vlm_cosine_range: list[float]
    best_layers: dict[str, list[int]]
    efficiency: dict[str, dict[str, float] | float]


@dataclass
class RunMeta:
    model: str
    llm: str | None
    model_fingerprint: str
    taskvec: str
    packages: dict[str, str]
    started: str
    seconds: float
    quick: bool
    num_layers: int
    conditions: list[str]
    notes: list[str]
    steps: dict[str, int]
    # Source (repo id, commit or path), loading options, pad token and image settings of each model.
    model_settings: dict[str, Any] = field(default_factory=dict)
    llm_settings: dict[str, Any] | None = None


@dataclass
class RunResults:
    format: int
    meta: RunMeta
    config: RunConfig
    tasks: list[str]
    layers: dict[str, LayerChoice]
    results: list[ConditionResult]
    summaries: list[Summary]  # every condition, at its table metric
    tables: list[ResultTable]
    floors: list[Floor]  # at the run's metric
    examples: list[Example]
    analysis_layer: int
    analysis_layer_source: str
    vector_cosine: VectorCosine | None = None
    paper_numbers: PaperNumbers | None = None
    function_vectors: list[HeadEffects] = field(default_factory=list)
    head_overlaps: list[HeadOverlap] = field(default_factory=list)
    # The engine's invariants on each model of the run (the model, then its base LM), before any step.
    engine_checks: list[EngineChecks] = field(default_factory=list)

    def table(self, table_id: str) -> ResultTable | None:
        return next((table for table in self.tables if table.id == table_id), None)

    def summary(self, condition: str) -> Summary | None:
        return next((summary for summary in self.summaries if summary.condition == condition), None)

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = to_json(self)
        return data

    @classmethod
    def from_json(cls, data: Any) -> RunResults:
        if not isinstance(data, dict):
            raise ValueError(f"expected a JSON object, got {type(data).__name__}")
        if data.get("format") != RESULTS_FORMAT:
            raise ValueError(
                f"format {data.get('format')!r}; this taskvec reads format "
                f"{RESULTS_FORMAT} (rerun `taskvec run` with the same --out to rewrite it from its cache)"
            )
        return from_json(cls, data, "results")

    def write(self, run_dir: Path) -> None:
        write_json_atomically(run_dir / "results.json", self.to_json())
        write_summary_csv(self, run_dir / "summary.csv")

    @classmethod
    def read(cls, path: Path) -> RunResults:
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, ValueError) as error:
            raise ValueError(f"{path} cannot be read: {error}") from None
        if not text.strip():
            raise ValueError(f"{path} is empty")
        try:
            data = json.loads(text)
        except ValueError as error:
            raise ValueError(f"{path} is not JSON (truncated?): {error}") from None
        try:
            return cls.from_json(data)
        except ValueError as error:
            raise ValueError(f"{path}: {error}") from None


def write_summary_csv(results: RunResults, path: Path) -> None:
    """One row per (model, condition, task, seed, metric) with its interval and protocol."""
    labels = {summary.condition: summary.label for summary in results.summaries}
    with replacing(path) as temporary, temporary.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=SUMMARY_FIELDS)
        writer.writeheader()
        for row in results.results:
            values: dict[str, Any] = {
                "model": row.model,
                "condition": row.condition,
                "label": labels.get(row.condition, row.condition),
                "task": row.task,
                "seed": row.seed,
                "metric": row.metric,
                "accuracy": row.accuracy,
                "low": row.interval.low,
                "high": row.interval.high,
                "n": row.n,
                "layer": row.layer,
                "scale": row.scale,
                "vector_answer_share": row.vector_answer_share,
                "vector_answer_accuracy": row.vector_answer_accuracy,
                "max_new_tokens": results.config.max_new_tokens,
            }
            writer.writerow({key: "" if value is None else value for key, value in values.items()})
