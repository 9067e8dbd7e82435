"""Scores -> result rows, per-condition summaries, the result tables and their printed form.

A condition is placed in a table by its `TableSlot`s; the tables themselves (title, the paper's rows,
whether they are a curve) are the explicit list `TABLE_DEFINITIONS`. A slot naming a table that is
not in the list gets a table of its own, titled by its id.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from taskvec.evaluation import is_correct_by
from taskvec.experiments.config import METRICS
from taskvec.experiments.protocol.conditions import Condition
from taskvec.experiments.protocol.paper_numbers import (
    PAPER_COLUMNS,
    PAPER_DIRECTIONS,
    PAPER_DIRECTIONS_MODEL,
    PAPER_LLM_TO_VLM,
    PAPER_LLM_VLM_COSINE,
    PAPER_TABLE,
)
from taskvec.experiments.results.run_results import (
    ConditionResult,
    Floor,
    ResultTable,
    RunResults,
    Summary,
    TableColumn,
)
from taskvec.intervals import Interval, bootstrap_interval
from taskvec.layer_choice import NO_LAYER_HELPED, LayerChoice, layer_and_scale


@dataclass(frozen=True)
class TableDefinition:
    id: str
    title: str
    paper: Mapping[str, Mapping[str, float | None]] = field(default_factory=dict)
    paper_source: str = ""
    curve: bool = False
    # The ensemble curve is scored ignoring case, as the reference scores its ensembling runs.
    ignore_case: bool = False
    # The table is shown only when this column ran (LLM -> VLM needs the base LM's vectors).
    requires_column: str | None = None
    column_order: tuple[str, ...] = ()  # these columns first, in this order (the paper's)


TABLE_DEFINITIONS: tuple[TableDefinition, ...] = (
    TableDefinition(
        "paper",
        "Main table: test accuracy, mean over tasks (the paper's table 1)",
        PAPER_TABLE,
        "Table 1",
        column_order=PAPER_COLUMNS,
    ),
    TableDefinition(
        "directions",
        "Transfer directions (vector source -> query)",
        {PAPER_DIRECTIONS_MODEL: dict(PAPER_DIRECTIONS)},
        "the directions figure",
        column_order=tuple(PAPER_DIRECTIONS),
    ),
    TableDefinition(
        "llm_to_vlm",
        "LLM -> VLM: text-ICL vectors of the model and of its base LM, patched into image queries",
        PAPER_LLM_TO_VLM,
        f"the LLM -> VLM table (vector cosine {PAPER_LLM_VLM_COSINE[0]}-{PAPER_LLM_VLM_COSINE[1]})",
        requires_column="llm_vectors",
    ),
    TableDefinition(
        "function_vectors",
        "Function vectors (top attention heads, added) beside residual task vectors (replaced), "
        "same demonstrations, queries, seeds and test items",
        requires_column="FV text->text",
        column_order=tuple(
            f"{kind} {direction}"
            for direction in ("text->image", "text->text", "image->image", "llm->image")
            for kind in ("FV", "TV")
        ),
    ),
    TableDefinition("instruction", "Instruction vectors"),
    TableDefinition(
        "ensemble",
        "Instruction + exemplar ensemble (n = examples behind the exemplar vector)",
        curve=True,
        ignore_case=True,
    ),
)


def score_rows(
    condition: Condition,
    task: str,
    seed: int | None,
    layer: int | None,
    generated: Sequence[str],
    expected: Sequence[Sequence[str]],
    *,
    first_tokens: Sequence[int],
    vector_token: int | None,
    vector_answer: str | None,
    samples: int,
    scale: float | None = None,
) -> list[ConditionResult]:
    """One row per metric for a finished test step.

    `vector_token` is the patched vector's own decoded token, compared with each answer's first
    generated token; `vector_answer` is that token as text, scored as if it answered every query.
    """
    share = None
    if vector_token is not None:
        share = sum(token == vector_token for token in first_tokens) / len(first_tokens)
    rows = []
    for metric in METRICS:
        hits = [is_correct_by(g, e, metric) for g, e in zip(generated, expected, strict=True)]
        own = None
        if vector_answer is not None:
            own = sum(is_correct_by(vector_answer, e, metric) for e in expected) / len(expected)
        rows.append(
            ConditionResult(
                condition=condition.name,
                model=condition.model_role,
                task=task,
                seed=seed,
                layer=layer,
                metric=metric,
                accuracy=sum(hits) / len(hits),
                n=len(hits),
                interval=bootstrap_interval({task: [hits]}, samples=samples),
                hits="".join("1" if hit else "0" for hit in hits),
                vector_answer_share=share,
                vector_answer_accuracy=own,
                scale=scale,
            )
        )
    return rows


def summarise(
    rows: Sequence[ConditionResult], condition: Condition, metric: str, *, samples: int
) -> Summary | None:
    """Mean over tasks of the mean over seeds, its bootstrap interval and the spread over seeds."""
    chosen = [row for row in rows if row.condition == condition.name and row.metric == metric]
    if not chosen:
        return None
    hits: dict[str, list[list[bool]]] = {}
    per_seed: dict[int | None, dict[str, float]] = {}
    for row in chosen:
        hits.setdefault(row.task, []).append(row.hit_list())
        per_seed.setdefault(row.seed, {})[row.task] = row.accuracy
    seed_means = [statistics.fmean(values.values()) for values in per_seed.values()]
    shares = [row.vector_answer_share for row in chosen if row.vector_answer_share is not None]
    own = [row.vector_answer_accuracy for row in chosen if row.vector_answer_accuracy is not None]
    return Summary(
        condition=condition.name,
        label=condition.label,
        metric=metric,
        mean=statistics.fmean(seed_means),
        interval=bootstrap_interval(hits, samples=samples),
        seed_std=statistics.pstdev(seed_means) if len(seed_means) > 1 else 0.0,
        seeds=len(seed_means),
        per_task={task: statistics.fmean(sum(h) / len(h) for h in runs) for task, runs in hits.items()},
        items=sum(len(runs[0]) for runs in hits.values()),
        layer=chosen[0].layer,
        vector_answer_share=statistics.fmean(shares) if shares else None,
        vector_answer_accuracy=statistics.fmean(own) if own else None,
        scale=chosen[0].scale,
    )


def table_metric(definition: TableDefinition, metric: str, ensemble_ignore_case: bool) -> str:
    return "prefix_ignore_case" if definition.ignore_case and ensemble_ignore_case else metric


def build_tables(
    conditions: Sequence[Condition],
    summaries: Mapping[tuple[str, str], Summary],
    floors: Mapping[str, list[Floor]],
    *,
    metric: str,
    ensemble_ignore_case: bool,
    max_new_tokens: int,
) -> list[ResultTable]:
    """Every table that has a column that ran; `summaries[(condition, metric)]`, `floors[metric]`."""
    definitions = {definition.id: definition for definition in TABLE_DEFINITIONS}
    for condition in conditions:
        for slot in condition.tables:
            definitions.setdefault(slot.table, TableDefinition(slot.table, slot.table))
    tables = []
    for definition in definitions.values():
        scored_by = table_metric(definition, metric, ensemble_ignore_case)
        columns = [
            TableColumn(slot.column, condition.name, summaries[(condition.name, scored_by)], slot.x)
            for condition in conditions
            for slot in condition.tables
            if slot.table == definition.id and (condition.name, scored_by) in summaries
        ]
        if not columns:
            continue
        order = {name: index for index, name in enumerate(definition.column_order)}
        columns.sort(key=lambda column: order.get(column.column, len(order)))
        if definition.requires_column and not any(c.column == definition.requires_column for c in columns):
            continue
        tables.append(
            ResultTable(
                id=definition.id,
                title=definition.title,
                metric=scored_by,
                max_new_tokens=max_new_tokens,
                columns=columns,
                paper={model: dict(values) for model, values in definition.paper.items()},
                paper_source=definition.paper_source,
                floors=floors[scored_by],
                curve=definition.curve,
            )
        )
    return tables


# ---- printed tables ----------------------------------------------------------------------------


def interval_cell(value: float | None, interval: Interval | None = None) -> str:
    if value is None:
        return "-"
    return f"{value:.2f}" if interval is None else f"{value:.2f} [{interval.low:.2f},{interval.high:.2f}]"


def _grid(header: Sequence[str], body: Sequence[Sequence[str]]) -> str:
    widths = [max(len(str(row[i])) for row in [header, *body]) for i in range(len(header))]
    lines = [
        "  ".join(
            str(cell).ljust(widths[i]) if i == 0 else str(cell).rjust(widths[i]) for i, cell in enumerate(row)
        )
        for row in [header, *body]
    ]
    return "\n".join(lines)


def _summary_cell(summary: Summary) -> str:
    return interval_cell(summary.mean, summary.interval)


def protocol_line(metric: str, max_new_tokens: int) -> str:
    tokens = "1 generated token" if max_new_tokens == 1 else f"{max_new_tokens} generated tokens"
    return f"metric {metric}, {tokens}; [95% bootstrap interval over test items] ±std over seeds"


def floors_line(floors: Sequence[Floor]) -> str:
    return "floors (no model): " + "; ".join(
        f"{floor.label} {interval_cell(floor.mean, floor.interval)}" for floor in floors
    )


NO_LAYER_MARK = "†"
NO_LAYER_NOTE = (
    f"{NO_LAYER_MARK} {NO_LAYER_HELPED}: no candidate layer beat the unpatched queries on validation, "
    "so the condition's test queries ran unpatched"
)


def no_layer_helped(layers: Mapping[str, LayerChoice], condition: str) -> bool:
    """Whether `condition` is patched but its validation layer choice found no layer that helped."""
    choice = layers.get(condition)
    return choice is not None and not choice.helped


def format_table(
    table: ResultTable, model: str, threshold: float, layers: Mapping[str, LayerChoice] | None = None
) -> str:
    """`layers` (the run's layer choices) marks the columns where no layer helped."""
    ours = f"ours ({model})"
    unhelped = {c.condition for c in table.columns if no_layer_helped(layers or {}, c.condition)}

    def marked(column: TableColumn, cell: str) -> str:
        return f"{cell} {NO_LAYER_MARK}" if column.condition in unhelped else cell

    if table.curve:
        series = list(dict.fromkeys(column.column for column in table.columns))
        xs = sorted({column.x or 0 for column in table.columns})
        body = []
        for name in series:
            by_x = {column.x or 0: column for column in table.series(name)}
            body.append(
                [name, *(marked(by_x[x], _summary_cell(by_x[x].summary)) if x in by_x else "-" for x in xs)]
            )
        grid = _grid(["n", *map(str, xs)], body)
    else:
        names = [column.column for column in table.columns]
        body = [
            [model_name, *(interval_cell(values.get(n)) for n in names)]
            for model_name, values in table.paper.items()
        ]
        cells = []
        for column in table.columns:
            cell = interval_cell(column.summary.mean, column.summary.interval)
            if column.summary.seeds > 1:
                cell += f" ±{column.summary.seed_std:.2f}"
            if column.summary.query_independent(threshold):
                cell += " *"
            cells.append(marked(column, cell))
        body.append([ours, *cells])
        grid = _grid(["model", *names], body)
    lines = [f"{table.title}\n({protocol_line(table.metric, table.max_new_tokens)})", grid]
    if table.floors:
        lines.append(floors_line(table.floors))
    if unhelped:
        lines.append(NO_LAYER_NOTE)
    if any(column.summary.query_independent(threshold) for column in table.columns):
        lines.append(
            f"* at least {threshold:.0%} of the answers are the patched vector's own decoded answer: "
            "they do not depend on the query"
        )
    return "\n".join(lines)


def format_tables(results: RunResults) -> str:
    """The tables with the paper's numbers above ours, then our per-task breakdown."""
    threshold = results.config.query_independent_share
    sections = [
        format_table(table, results.meta.model, threshold, results.layers) for table in results.tables
    ]
    cosine = results.vector_cosine
    if cosine is not None and cosine.at_layer is not None:
        low, high = PAPER_LLM_VLM_COSINE
        sections.append(
            f"cosine of the base LM's and the model's text-ICL vectors at layer {cosine.layer}: "
            f"{cosine.at_layer:.2f} (paper {low}-{high})"
        )
    sections.append(per_task_table(results))
    return "\n\n".join(sections)


def placement(layer: int | None, scale: float | None, choice: LayerChoice | None = None) -> str:
    """Where a condition patches: "-" (unpatched), its layer, a function vector's layer and scale
    ("6 x4"), or "no layer helped" when its layer `choice` found no candidate that beat the
    unpatched queries on validation (its rows then carry no layer)."""
    if choice is not None and not choice.helped:
        return NO_LAYER_HELPED
    if layer is None:
        return "-"
    return layer_and_scale(layer, scale)


def summary_placement(results: RunResults, summary: Summary) -> str:
    """`placement` of a condition's summary, read with the run's layer choice for it."""
    return placement(summary.layer, summary.scale, results.layers.get(summary.condition))


def per_task_table(results: RunResults) -> str:
    body = []
    for summary in results.summaries:
        share = summary.vector_answer_share
        body.append(
            [
                summary.condition,
                summary_placement(results, summary),
                *(interval_cell(summary.per_task.get(task)) for task in results.tasks),
                interval_cell(summary.mean, summary.interval),
                "-" if share is None else f"{share:.2f}",
                interval_cell(summary.vector_answer_accuracy),
            ]
        )
    header = ["condition", "layer", *results.tasks, "mean [95%]", "own share", "own everywhere"]
    return (
        f"Per task ({protocol_line(results.config.metric, results.config.max_new_tokens)}; "
        "ensemble points ignore case; own share = share of answers equal to the vector's decoded token, "
        "own everywhere = accuracy of that token given to every query)\n" + _grid(header, body)
    )
