"""Report sections from the typed run results: claims, result tables beside the paper's numbers with
intervals and floors, layer sweeps, LLM -> VLM cosine, the ensemble curve, example generations."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from taskvec.atomic_files import temporary_beside
from taskvec.experiments.protocol.tables import (
    NO_LAYER_MARK,
    NO_LAYER_NOTE,
    no_layer_helped,
    protocol_line,
    summary_placement,
)
from taskvec.experiments.results.run_results import Floor, ResultTable, RunResults
from taskvec.intervals import Interval
from taskvec.layer_choice import NO_LAYER_HELPED, placement_text
from taskvec.report import figures
from taskvec.report.claims import Claim
from taskvec.report.html import escape, figure_tag, note, number, table, thumbnail_uri
from taskvec.typed_json import to_json


class FigureWriter:
    """Saves figures for figures/ and returns their <img> tags (empty when there is no figure).

    Each figure goes to a temporary file beside its place; `commit` moves them all into place (once
    the whole report is built), `discard` removes them: a report that fails leaves the figures of
    the last report that did not."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.pending: list[tuple[Path, Path]] = []  # (temporary, final)
        self.written: list[Path] = []

    def add(self, name: str, figure: Figure | None, alt: str) -> str:
        if figure is None:
            return ""
        final = self.directory / f"{name}.png"
        temporary = figures.save_figure(figure, temporary_beside(final))
        self.pending.append((temporary, final))
        return figure_tag(temporary, alt)

    def commit(self) -> None:
        for temporary, final in self.pending:
            os.replace(temporary, final)
            self.written.append(final)
        self.pending.clear()

    def discard(self) -> None:
        for temporary, _ in self.pending:
            temporary.unlink(missing_ok=True)
        self.pending.clear()


def with_interval(value: float | None, interval: Interval | None) -> str:
    if value is None:
        return "–"
    if interval is None:
        return number(value)
    return f"{number(value)} <span class='interval'>[{number(interval.low)}, {number(interval.high)}]</span>"


def overview(results: RunResults) -> str:
    meta = results.meta
    rows = [
        ["model", escape(meta.model)],
        ["base LM", escape(meta.llm or "–")],
        ["model fingerprint", escape(meta.model_fingerprint)],
        ["loaded as", escape(loaded_as(meta.model_settings))],
        ["taskvec", escape(meta.taskvec)],
        ["started", escape(meta.started)],
        ["seconds", number(meta.seconds, 0)],
        ["tasks", escape(", ".join(results.tasks))],
        ["seeds", escape(", ".join(map(str, results.config.seeds)))],
        ["protocol", escape(protocol_line(results.config.metric, results.config.max_new_tokens))],
    ]
    text = table(["", "value"], rows, text_columns=2)
    if meta.packages:
        text += note("packages: " + ", ".join(f"{name} {version}" for name, version in meta.packages.items()))
    for message in meta.notes:
        text += note(message)
    config = json.dumps(to_json(results.config), indent=1)
    text += f"<details><summary>configuration</summary><pre>{escape(config)}</pre></details>"
    models = json.dumps({"model": meta.model_settings, "base LM": meta.llm_settings}, indent=1)
    return text + f"<details><summary>model loading</summary><pre>{escape(models)}</pre></details>"


def loaded_as(settings: dict[str, Any]) -> str:
    """One line: which snapshot, on what, in which dtype, how images were prepared."""
    if not settings:
        return "–"
    source = settings.get("source", {})
    where = f"{source['repo_id']} @ {source['commit'][:12]}" if "commit" in source else source.get("path", "")
    loading = settings.get("loading", {})
    parts = [where, settings.get("family", ""), loading.get("device", ""), loading.get("dtype", "")]
    if loading.get("quantization"):
        parts.append(loading["quantization"])
    if loading.get("device_map"):
        parts.append(f"device map {loading['device_map']}")
    images = settings.get("images", {})
    if images.get("width"):
        parts.append(f"images width {images['width']}")
    if images.get("processor_kwargs"):
        parts.append(f"processor {json.dumps(images['processor_kwargs'])}")
    return ", ".join(part for part in parts if part)


def claims_section(claims: Sequence[Claim]) -> str:
    rows = [
        [
            number(claim.number),
            escape(claim.statement),
            f'<span class="verdict {claim.verdict.replace(" ", "-")}">{escape(claim.verdict)}</span>',
            "<br>".join(escape(line) for line in claim.evidence),
        ]
        for claim in claims
    ]
    return table(
        ["", "claim of the paper", "verdict", "the numbers that bear on it"], rows, text_columns=4
    ) + note(
        "A result counts as above a reference only when its 95% bootstrap interval lies above the "
        "reference's interval; a patched condition whose answers are mostly the vector's own decoded "
        "token does not depend on the query and counts as no transfer."
    )


def _floors_note(floors: Sequence[Floor]) -> str:
    parts = []
    for floor in floors:
        per_task = ", ".join(f"{task} {number(value)}" for task, value in floor.per_task.items())
        answers = f"; answers {floor.answers}" if floor.answers else ""
        parts.append(
            f"{floor.label}: {floor.mean:.2f} [{floor.interval.low:.2f}, {floor.interval.high:.2f}] "
            f"({per_task}{answers})"
        )
    return note("Floors without a model (" + floors[0].metric + "): " + " · ".join(parts)) if floors else ""


def result_table(results: RunResults, result: ResultTable) -> str:
    threshold = results.config.query_independent_share
    parts = [note(f"{protocol_line(result.metric, result.max_new_tokens)}.")]
    if result.curve:
        parts.append(_curve_table(result))
    else:
        columns = result.columns
        names = [column.column for column in columns]
        cells = []
        for column in columns:
            summary = column.summary
            cell = with_interval(summary.mean, summary.interval)
            if summary.seeds > 1:
                cell += f" ± {number(summary.seed_std)}"
            if summary.query_independent(threshold):
                cell += " *"
            if no_layer_helped(results.layers, column.condition):
                cell += f" {NO_LAYER_MARK}"
            cells.append(cell)
        rows = [[escape(f"ours ({results.meta.model})"), *cells]]
        classes = [""]
        for model, values in result.paper.items():
            rows.append([f"paper: {escape(model)}", *(number(values.get(name)) for name in names)])
            classes.append("paper")
        parts.append(table(["", *names], rows, row_classes=classes))
        shares = [
            [
                escape(c.column),
                escape(summary_placement(results, c.summary)),
                number(c.summary.vector_answer_share),
                number(c.summary.vector_answer_accuracy),
            ]
            for c in columns
            if c.summary.vector_answer_share is not None
        ]
        if shares:
            parts.append(
                "<details><summary>patched layer and the share of answers that are the vector's own "
                "decoded token</summary>"
                + table(["column", "layer", "own-answer share", "own answer for every query"], shares)
                + "</details>"
            )
        if any(no_layer_helped(results.layers, c.condition) for c in columns):
            parts.append(note(NO_LAYER_NOTE + "."))
        if any(c.summary.query_independent(threshold) for c in result.columns):
            parts.append(
                note(
                    f"* at least {threshold:.0%} of the answers are the patched vector's own decoded "
                    "token: they do not depend on the query."
                )
            )
        per_task = [
            [escape(task), *(number(c.summary.per_task.get(task)) for c in columns)] for task in results.tasks
        ]
        parts.append(
            "<details><summary>per task</summary>" + table(["task", *names], per_task) + "</details>"
        )
    parts.append(_floors_note(result.floors))
    return "\n".join(parts)


def _curve_table(result: ResultTable) -> str:
    series = list(dict.fromkeys(column.column for column in result.columns))
    xs = sorted({column.x or 0 for column in result.columns})
    rows = []
    for x in xs:
        row = [number(x)]
        for name in series:
            point = next((c for c in result.series(name) if (c.x or 0) == x), None)
            row.append(with_interval(point.summary.mean, point.summary.interval) if point else "–")
        rows.append(row)
    return table(["examples", *series], rows, text_columns=0)


def tables_section(results: RunResults) -> str:
    parts = []
    for result in results.tables:
        if result.curve:
            continue
        parts.append(f"<h3 id='table-{escape(result.id)}'>{escape(result.title)}</h3>")
        parts.append(result_table(results, result))
    return "\n".join(parts)


def all_conditions_section(results: RunResults) -> str:
    rows = [
        [
            escape(s.condition),
            escape(s.label),
            escape(s.metric),
            escape(summary_placement(results, s)),
            with_interval(s.mean, s.interval),
            number(s.seed_std),
            number(s.vector_answer_share),
            number(s.vector_answer_accuracy),
            *(number(s.per_task.get(task)) for task in results.tasks),
        ]
        for s in results.summaries
    ]
    headers = [
        "condition",
        "what",
        "metric",
        "layer",
        "mean [95%]",
        "std over seeds",
        "own-answer share",
        "own answer for every query",
        *results.tasks,
    ]
    return table(headers, rows, text_columns=3)


def layer_section(results: RunResults, writer: FigureWriter) -> str:
    layers: Mapping[str, Any] = {
        name: {"chosen": choice.chosen, "validation_mean": choice.validation_mean}
        for name, choice in results.layers.items()
    }
    rows = []
    for name, choice in results.layers.items():
        how = (
            "given (--layer)"
            if choice.fixed
            else f"as {choice.shared_from}"
            if choice.shared_from
            else "swept"
        )
        span = f"{choice.candidates[0]}-{choice.candidates[-1]}" if choice.candidates else "–"
        rows.append(
            [
                escape(name),
                escape(placement_text(choice.chosen, choice.scale)),
                number(choice.validation_at_chosen),
                number(choice.unpatched_validation),
                escape(span),
                escape(how),
            ]
        )
    figure = writer.add("layer_sweeps", figures.layer_sweeps(layers), "validation accuracy per patched layer")
    headers = ["condition", "chosen layer", "validation accuracy there", "unpatched", "candidates", "how"]
    return (
        figure
        + table(headers, rows, text_columns=2)
        + note(
            "A layer is chosen only when it beats the unpatched validation queries (mean over tasks); "
            f"otherwise the condition reads “{NO_LAYER_HELPED}” and its test queries run unpatched."
        )
        + note(f"The analyses use layer {results.analysis_layer} ({results.analysis_layer_source}).")
    )


def llm_to_vlm_section(results: RunResults, writer: FigureWriter) -> str:
    result = results.table("llm_to_vlm")
    cosine = results.vector_cosine
    if result is None or cosine is None:
        return note("No base language model in this run: LLM -> VLM not measured.")
    text = result_table(results, result)
    if cosine.layer is None:
        text += note(
            f"Cosine of the base LM's and the model's text-ICL vectors: {NO_LAYER_HELPED} for the base "
            "LM's vectors, so no chosen layer to read it at (the figure shows every layer)."
        )
    else:
        text += note(f"Cosine of the base LM's and the model's text-ICL vectors at layer {cosine.layer}: "
                     f"{number(cosine.at_layer)}.")  # fmt: skip
    return text + writer.add(
        "llm_vlm_cosine",
        figures.per_layer_lines(
            {"LM vs VLM text-ICL vector": cosine.per_layer},
            title="LLM -> VLM vector cosine",
            ylabel="cosine similarity",
            chosen=cosine.layer,
        ),
        "cosine of LM and VLM vectors per layer",
    )


def ensemble_section(results: RunResults, writer: FigureWriter) -> str:
    result = results.table("ensemble")
    if result is None:
        return note("The ensemble curve did not run (no instruction, or no ensemble points).")
    curve = {
        "examples": [c.x for c in result.series("exemplar")],
        "exemplar": [c.summary.mean for c in result.series("exemplar")],
        "ensemble": [c.summary.mean for c in result.series("ensemble")],
    }
    figure = writer.add("ensemble", figures.ensemble_curve(curve), "ensemble curve")
    return figure + result_table(results, result)


def examples_section(results: RunResults, run_dir: Path) -> str:
    rows = [
        [
            escape(example.task),
            escape(example.condition),
            _image_cell(example.image, run_dir),
            escape(example.input),
            escape(example.expected),
            escape(repr(example.generated)),
        ]
        for example in results.examples
    ]
    return table(["task", "condition", "image", "input", "expected", "generated"], rows, text_columns=6)


def _image_cell(image: str | None, run_dir: Path) -> str:
    if not image:
        return ""
    path = Path(image)
    candidates = [path] if path.is_absolute() else [run_dir / path, Path.cwd() / path]
    for candidate in candidates:
        if candidate.is_file() and (uri := thumbnail_uri(candidate)) is not None:
            return f'<img class="thumb" src="{uri}" alt="{escape(path.name)}">'
    return f'<span class="note">image not found: {escape(path.name)}</span>'
