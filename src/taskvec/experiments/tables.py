"""Scores -> results.json rows, summary.csv, the "tables" block and the printed paper-layout tables."""

from __future__ import annotations

import csv
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from taskvec.evaluation import is_correct_by
from taskvec.experiments.conditions import Condition
from taskvec.experiments.config import METRICS
from taskvec.experiments.paper_numbers import (
    PAPER_COLUMNS,
    PAPER_DIRECTIONS,
    PAPER_DIRECTIONS_MODEL,
    PAPER_LLM_TO_VLM,
    PAPER_TABLE,
)

Row = dict[str, Any]
# Directions table entry -> the condition that measures it (two are the paper table's columns).
DIRECTIONS = {
    "text->text": "text->text",
    "text->image": "text-icl-xpatch",
    "image->image": "image-icl-patch",
    "image->text": "image->text",
}
SUMMARY_FIELDS = ("model", "condition", "task", "seed", "metric", "accuracy", "n", "layer")


def score_rows(
    condition: Condition, task: str, seed: int | None, layer: int | None, test: Mapping[str, Any]
) -> list[Row]:
    """One row per metric for a finished test step."""
    generated, expected = test["generated"], test["expected"]
    rows = []
    for metric in METRICS:
        hits = sum(is_correct_by(g, e, metric) for g, e in zip(generated, expected, strict=True))
        rows.append(
            {
                "model": condition.model_role,
                "condition": condition.name,
                "task": task,
                "seed": seed,
                "layer": layer,
                "metric": metric,
                "accuracy": hits / len(generated),
                "n": len(generated),
            }
        )
    return rows


def summarise(rows: Sequence[Row], condition: str, metric: str) -> dict[str, Any] | None:
    """Mean over tasks; std over seeds of that mean (0 for one seed or a seed-free condition)."""
    chosen = [r for r in rows if r["condition"] == condition and r["metric"] == metric]
    if not chosen:
        return None
    per_task: dict[str, list[float]] = {}
    per_seed: dict[int | None, dict[str, float]] = {}
    for row in chosen:
        per_task.setdefault(row["task"], []).append(row["accuracy"])
        per_seed.setdefault(row["seed"], {})[row["task"]] = row["accuracy"]
    seed_means = [statistics.fmean(values.values()) for values in per_seed.values()]
    return {
        "mean": statistics.fmean(seed_means),
        "std": statistics.pstdev(seed_means) if len(seed_means) > 1 else 0.0,
        "per_task": {task: statistics.fmean(values) for task, values in per_task.items()},
        "seeds": len(seed_means),
    }


def _present(entries: Mapping[str, dict[str, Any] | None]) -> dict[str, dict[str, Any]]:
    return {name: entry for name, entry in entries.items() if entry is not None}


def build_tables(
    rows: Sequence[Row],
    *,
    metric: str,
    ensemble_metric: str,
    ensemble_examples: Sequence[int],
    cosine_per_layer: list[float] | None,
    llm_layer: int | None,
) -> dict[str, Any]:
    """results.json's "tables"; a condition that did not run is absent from its table."""
    tables: dict[str, Any] = {
        "metric": metric,
        "paper": _present({column: summarise(rows, column, metric) for column in PAPER_COLUMNS}),
        "directions": _present({name: summarise(rows, cond, metric) for name, cond in DIRECTIONS.items()}),
        "instruction": _present(
            {
                "instruction_patch": summarise(rows, "instruction-patch", metric),
                "instruction_prompt": summarise(rows, "instruction-prompt", metric),
            }
        ),
    }
    llm_vectors = summarise(rows, "llm-xpatch", metric)
    if llm_vectors is not None:
        tables["llm_to_vlm"] = {
            "vlm_vectors": summarise(rows, "text-icl-xpatch", metric),
            "llm_vectors": llm_vectors,
            "cosine_per_layer": cosine_per_layer or [],
            "cosine_at_chosen_layer": (
                cosine_per_layer[llm_layer] if cosine_per_layer and llm_layer is not None else None
            ),
        }
    curve: dict[str, Any] = {"metric": ensemble_metric, "examples": [], "exemplar": [], "ensemble": []}
    curve.update({"exemplar_std": [], "ensemble_std": []})
    for n in ensemble_examples:
        exemplar = summarise(rows, f"exemplar-{n}", ensemble_metric)
        ensemble = summarise(rows, f"ensemble-{n}", ensemble_metric)
        if exemplar is None or ensemble is None:
            continue
        curve["examples"].append(n)
        for name, entry in (("exemplar", exemplar), ("ensemble", ensemble)):
            curve[name].append(entry["mean"])
            curve[f"{name}_std"].append(entry["std"])
    if curve["examples"]:
        tables["ensemble"] = curve
    return tables


def write_summary_csv(rows: Sequence[Row], path: Path) -> None:
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=SUMMARY_FIELDS)
        writer.writeheader()
        for row in rows:
            writer.writerow({key: "" if row[key] is None else row[key] for key in SUMMARY_FIELDS})


def _cell(value: float | None, std: float | None = None) -> str:
    if value is None:
        return "-"
    return f"{value:.2f}" if not std else f"{value:.2f}±{std:.2f}"


def _grid(header: Sequence[str], body: Sequence[Sequence[str]]) -> str:
    widths = [max(len(str(row[i])) for row in [header, *body]) for i in range(len(header))]
    lines = [
        "  ".join(
            str(cell).ljust(widths[i]) if i == 0 else str(cell).rjust(widths[i]) for i, cell in enumerate(row)
        )
        for row in [header, *body]
    ]
    return "\n".join(lines)


def format_tables(results: Mapping[str, Any]) -> str:
    """The paper's tables with its numbers above ours, then our per-task breakdown."""
    tables, model = results["tables"], results["meta"]["model"]
    ours = f"ours ({model})"
    sections = []
    paper = tables["paper"]
    body = [[name, *(_cell(values[c]) for c in PAPER_COLUMNS)] for name, values in PAPER_TABLE.items()]
    body.append(
        [ours, *(_cell(paper[c]["mean"], paper[c]["std"]) if c in paper else "-" for c in PAPER_COLUMNS)]
    )
    majority = tables.get("baselines", {}).get("majority_answer")
    floor = (
        f"\nfloor: the validation majority answer for every query (no model) scores {_cell(majority['mean'])}"
        if majority
        else ""
    )
    sections.append(
        f"Table 1: test accuracy, mean over tasks ({tables['metric']})\n"
        + _grid(["model", *PAPER_COLUMNS], body)
        + floor
    )
    directions = tables["directions"]
    names = list(DIRECTIONS)
    body = [[PAPER_DIRECTIONS_MODEL, *(_cell(PAPER_DIRECTIONS[n]) for n in names)]]
    body.append(
        [
            ours,
            *(_cell(directions[n]["mean"], directions[n]["std"]) if n in directions else "-" for n in names),
        ]
    )
    sections.append("Directions (vector source -> query)\n" + _grid(["model", *names], body))
    if "llm_to_vlm" in tables:
        entry = tables["llm_to_vlm"]
        body = [
            [name, _cell(v["vlm_vectors"]), _cell(v["llm_vectors"])]
            for name, v in PAPER_LLM_TO_VLM.items()
            if isinstance(v, dict)
        ]
        vlm = entry["vlm_vectors"]
        body.append([ours, _cell(vlm and vlm["mean"]), _cell(entry["llm_vectors"]["mean"])])
        cosine = entry["cosine_at_chosen_layer"]
        sections.append(
            "LLM -> VLM (text-ICL vectors into image queries)\n"
            + _grid(["model", "VLM vectors", "LLM vectors"], body)
            + f"\ncosine LLM/VLM vectors at the chosen layer: {_cell(cosine)} (paper 0.89-0.95)"
        )
    if tables["instruction"]:
        entry = tables["instruction"]
        body = [
            [
                ours,
                *(
                    _cell(entry[k]["mean"]) if k in entry else "-"
                    for k in ("instruction_patch", "instruction_prompt")
                ),
            ]
        ]
        sections.append("Instruction\n" + _grid(["model", "instruction-patch", "instruction-prompt"], body))
    if "ensemble" in tables:
        curve = tables["ensemble"]
        body = [["exemplar", *map(_cell, curve["exemplar"])], ["ensemble", *map(_cell, curve["ensemble"])]]
        sections.append(
            f"Ensemble curve ({curve['metric']}; n = examples behind the exemplar vector)\n"
            + _grid(["n", *map(str, curve["examples"])], body)
        )
    sections.append(per_task_table(results))
    return "\n\n".join(sections)


def per_task_table(results: Mapping[str, Any]) -> str:
    metric, tasks = results["tables"]["metric"], results["tasks"]
    conditions = list(dict.fromkeys(r["condition"] for r in results["results"]))
    body = []
    for condition in conditions:
        entry = summarise(results["results"], condition, metric)
        if entry is None:
            continue
        layer = results["layers"].get(condition, {}).get("chosen")
        body.append(
            [
                condition,
                "-" if layer is None else str(layer),
                *(_cell(entry["per_task"].get(t)) for t in tasks),
                _cell(entry["mean"], entry["std"]),
            ]
        )
    return f"Per task ({metric})\n" + _grid(["condition", "layer", *tasks, "mean"], body)
