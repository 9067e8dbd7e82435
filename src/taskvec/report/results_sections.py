"""Report sections from results.json: result tables beside the paper's numbers, layer sweeps,
LLM -> VLM, instruction and ensemble results, example generations with their images."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from taskvec.report import figures
from taskvec.report.html import escape, figure_tag, mean_std, missing, note, number, table, thumbnail_uri


class FigureWriter:
    """Saves figures under figures/ and returns their <img> tags (empty when there is no figure)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.written: list[Path] = []

    def add(self, name: str, figure: Figure | None, alt: str) -> str:
        if figure is None:
            return ""
        path = figures.save_figure(figure, self.directory / f"{name}.png")
        self.written.append(path)
        return figure_tag(path, alt)


def _numeric_rows(
    value: Any, columns: set[str], path: tuple[str, ...] = ()
) -> Iterator[tuple[str, dict[str, Any]]]:
    """Every mapping inside `value` keyed by some of `columns`, labelled by its path.

    The paper's numbers are matched by column name wherever results.json nests them, so a table
    shows each of the paper's rows (one per model) that speaks of the same columns as ours.
    """
    if not isinstance(value, Mapping):
        return
    shared = columns & set(value)
    if shared and all(isinstance(value[key], int | float) or value[key] is None for key in shared):
        label = path[-1] if path else "paper"
        model = value.get("model")  # {"model": "Idefics2-8B", "text->text": 0.65, ...}
        yield (f"{label} ({model})" if isinstance(model, str) else label), dict(value)
        return
    for key, child in value.items():
        yield from _numeric_rows(child, columns, (*path, str(key)))


def comparison_table(ours: Mapping[str, Any], paper_numbers: Any, label: str) -> str:
    """Our means (± std over seeds) beside every matching row of the paper's numbers."""
    columns = list(ours)
    rows = [[escape(label), *(mean_std(ours[c]) for c in columns)]]
    classes = [""]
    for name, values in _numeric_rows(paper_numbers, set(columns)):
        rows.append([f"paper: {escape(name)}", *(number(values.get(c)) for c in columns)])
        classes.append("paper")
    return table(["", *columns], rows, row_classes=classes)


def per_task_table(ours: Mapping[str, Any]) -> str:
    columns = [c for c in ours if isinstance(ours[c], Mapping) and ours[c].get("per_task")]
    tasks = list(dict.fromkeys(task for c in columns for task in ours[c]["per_task"]))
    if not tasks:
        return ""
    rows = [[escape(task), *(number(ours[c]["per_task"].get(task)) for c in columns)] for task in tasks]
    return "<details><summary>per task</summary>" + table(["task", *columns], rows) + "</details>"


def overview(results: Mapping[str, Any]) -> str:
    meta = results.get("meta") or {}
    rows = [
        [escape(key), escape(meta[key])]
        for key in ("model", "llm", "taskvec", "started", "seconds", "quick")
        if key in meta
    ]
    rows.append(["tasks", escape(", ".join(results.get("tasks") or [])) or "–"])
    packages = meta.get("packages") or {}
    text = table(["", "value"], rows, text_columns=2)
    if packages:
        listed = ", ".join(f"{name} {version}" for name, version in packages.items())
        text += note(f"packages: {listed}")
    if meta.get("config"):
        text += (
            "<details><summary>configuration</summary><pre>"
            + escape(_pretty(meta["config"]))
            + "</pre></details>"
        )
    return text


def _pretty(value: Any) -> str:
    import json

    return json.dumps(value, indent=1, default=str)


def majority_floor_note(tables: Mapping[str, Any]) -> str:
    """The no-model floor: a patched vector that only writes a frequent answer scores this much."""
    majority = (tables.get("baselines") or {}).get("majority_answer")
    if not majority:
        return ""
    per_task = ", ".join(
        f"{task} {number(value)} ({majority['answers'].get(task, '?')!r})"
        for task, value in majority["per_task"].items()
    )
    return note(
        f"Floor without a model: answering every query with the validation majority answer scores "
        f"{number(majority['mean'])} ({per_task})."
    )


def result_tables(results: Mapping[str, Any]) -> str:
    tables = results.get("tables") or {}
    paper_numbers = results.get("paper_numbers") or {}
    model = (results.get("meta") or {}).get("model", "ours")
    parts = []
    titles = (
        ("paper", "Main table: test accuracy, mean over tasks (paper's table 1)"),
        ("directions", "Transfer directions (vector source -> query)"),
    )
    for key, title in titles:
        ours = tables.get(key)
        parts.append(f"<h3>{escape(title)}</h3>")
        if not ours:
            parts.append(missing(f"tables.{key} in results.json"))
            continue
        parts.append(comparison_table(ours, paper_numbers, f"ours ({model})"))
        if key == "paper":
            parts.append(majority_floor_note(tables))
        parts.append(per_task_table(ours))
    instruction = tables.get("instruction")
    parts.append("<h3>Instruction vectors</h3>")
    if instruction:
        parts.append(comparison_table(instruction, paper_numbers, f"ours ({model})"))
        parts.append(per_task_table(instruction))
    else:
        parts.append(missing("tables.instruction in results.json"))
    if not any(tables.get(key) for key in ("paper", "directions")) and paper_numbers:
        parts.append(
            note("The paper's numbers, for reference:") + "<pre>" + escape(_pretty(paper_numbers)) + "</pre>"
        )
    return "\n".join(parts)


def layer_section(results: Mapping[str, Any], writer: FigureWriter) -> str:
    layers = results.get("layers") or {}
    if not layers:
        return missing("layers (validation sweeps) in results.json")
    rows = [
        [
            escape(name),
            number(entry.get("chosen")),
            number(_at(entry.get("validation_mean"), entry.get("chosen"))),
        ]
        for name, entry in layers.items()
        if isinstance(entry, Mapping)
    ]
    figure = writer.add("layer_sweeps", figures.layer_sweeps(layers), "validation accuracy per patched layer")
    return figure + table(["condition", "chosen layer", "validation accuracy there"], rows)


def _at(values: Sequence[float] | None, index: Any) -> float | None:
    if not values or not isinstance(index, int) or not 0 <= index < len(values):
        return None
    return values[index]


def llm_to_vlm_section(results: Mapping[str, Any], writer: FigureWriter) -> str:
    block = (results.get("tables") or {}).get("llm_to_vlm")
    if not block:
        return missing("tables.llm_to_vlm in results.json (no base language model in this run)")
    means = {key: block[key] for key in ("vlm_vectors", "llm_vectors") if key in block}
    text = comparison_table(means, results.get("paper_numbers") or {}, "ours") if means else ""
    text += note(
        f"cosine of LM and VLM vectors at the chosen layer: {number(block.get('cosine_at_chosen_layer'))}"
    )
    cosines = block.get("cosine_per_layer") or []
    text += writer.add(
        "llm_vlm_cosine",
        figures.per_layer_lines(
            {"LM vs VLM text-ICL vector": cosines},
            title="LLM -> VLM vector cosine",
            ylabel="cosine similarity",
        ),
        "cosine of LM and VLM vectors per layer",
    )
    return text


def ensemble_section(results: Mapping[str, Any], writer: FigureWriter) -> str:
    ensemble = (results.get("tables") or {}).get("ensemble")
    if not ensemble or not ensemble.get("examples"):
        return missing("tables.ensemble in results.json")
    examples = ensemble["examples"]
    rows = [
        [number(n), number(_at(ensemble.get("exemplar"), i)), number(_at(ensemble.get("ensemble"), i))]
        for i, n in enumerate(examples)
    ]
    figure = writer.add("ensemble", figures.ensemble_curve(ensemble), "ensemble curve")
    return figure + table(["examples", "exemplar vector", "ensemble"], rows, text_columns=0)


def examples_section(results: Mapping[str, Any], run_dir: Path) -> str:
    examples = results.get("examples") or []
    if not examples:
        return missing("examples in results.json")
    rows = []
    for example in examples:
        rows.append(
            [
                escape(example.get("task", "")),
                escape(example.get("condition", "")),
                _image_cell(example.get("image"), run_dir),
                escape(example.get("input", "")),
                escape(example.get("expected", "")),
                escape(repr(example.get("generated", ""))),
            ]
        )
    headers = ["task", "condition", "image", "input", "expected", "generated"]
    return table(headers, rows, text_columns=6)


def _image_cell(image: Any, run_dir: Path) -> str:
    if not image:
        return ""
    path = Path(str(image))
    candidates = [path] if path.is_absolute() else [run_dir / path, Path.cwd() / path]
    for candidate in candidates:
        if candidate.is_file() and (uri := thumbnail_uri(candidate)) is not None:
            return f'<img class="thumb" src="{uri}" alt="{escape(path.name)}">'
    return f'<span class="note">image not found: {escape(path.name)}</span>'
