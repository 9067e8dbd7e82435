"""The report's figures, drawn with matplotlib (Agg: no display needed) from results/analysis data.

Each function takes the data of one section (the analyses' typed results, or the run's tables)
and returns a Figure, or None when the data is missing; `save_figure` writes it as PNG. Colours
follow the three phases and the specs consistently across figures so a reader can compare them at
a glance.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # before pyplot: a headless machine has no display
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from taskvec.analysis import PHASES, EmbeddingMap, LensResults, MapPoints, PhaseCurves

PHASE_COLOURS = {"input": "#1f77b4", "task": "#2ca02c", "answer": "#d62728"}
SPEC_MARKERS = {"text-icl": "o", "image-icl": "s", "instruction": "^"}
SPEC_TITLES = {"text-icl": "text ICL", "image-icl": "image ICL", "instruction": "instruction"}


def save_figure(figure: Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="png", dpi=100, bbox_inches="tight")
    plt.close(figure)
    return path


def _integer_layers(axes: Any) -> None:
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))


def layer_sweeps(layers: Mapping[str, Any]) -> Figure | None:
    """Validation accuracy per patched layer for each condition, the chosen layer marked."""
    curves = {name: entry for name, entry in layers.items() if entry and entry.get("validation_mean")}
    if not curves:
        return None
    figure, axes = plt.subplots(figsize=(7, 4))
    for name, entry in curves.items():
        values = entry["validation_mean"]
        (line,) = axes.plot(range(len(values)), values, marker=".", label=name)
        chosen = entry.get("chosen")
        if isinstance(chosen, int) and 0 <= chosen < len(values):
            axes.plot([chosen], [values[chosen]], marker="*", markersize=14, color=line.get_color())
    _integer_layers(axes)
    axes.set_xlabel("patched layer")
    axes.set_ylabel("validation accuracy (mean over tasks)")
    axes.set_title("Layer sweeps (star: chosen layer)")
    axes.set_ylim(-0.02, 1.02)
    axes.legend(fontsize=8)
    return figure


def ensemble_curve(ensemble: Mapping[str, Any]) -> Figure | None:
    examples = ensemble.get("examples") or []
    if not examples:
        return None
    figure, axes = plt.subplots(figsize=(6, 4))
    for key, label in (("exemplar", "exemplar vector"), ("ensemble", "ensemble (exemplar + instruction)")):
        values = ensemble.get(key) or []
        if len(values) == len(examples):
            axes.plot(examples, values, marker="o", label=label)
    axes.set_xlabel("number of examples")
    axes.set_ylabel("test accuracy (mean over tasks)")
    axes.set_title("Instruction + exemplar ensemble")
    axes.set_ylim(-0.02, 1.02)
    axes.legend()
    return figure


def per_layer_lines(
    series: Mapping[str, Sequence[float | None]], *, title: str, ylabel: str, chosen: int | None = None
) -> Figure | None:
    """Lines over layers (e.g. LM vs VLM cosine, within- vs cross-task similarity)."""
    series = {name: values for name, values in series.items() if any(v is not None for v in values)}
    if not series:
        return None
    figure, axes = plt.subplots(figsize=(6, 3.6))
    for name, values in series.items():
        points = [(i, v) for i, v in enumerate(values) if v is not None]
        axes.plot([i for i, _ in points], [v for _, v in points], marker=".", label=name)
    if chosen is not None:
        axes.axvline(chosen, color="grey", linestyle=":", label=f"chosen layer {chosen}")
    _integer_layers(axes)
    axes.set_xlabel("layer")
    axes.set_ylabel(ylabel)
    axes.set_title(title)
    axes.legend(fontsize=8)
    return figure


def _prompts(count: int) -> str:
    return f"{count} prompts"


def lens_phases(
    title: str, curves: Mapping[str, PhaseCurves], counted: Callable[[int], str] = _prompts
) -> Figure | None:
    """One panel per spec: relative probability of input, task and answer tokens over layers;
    `counted` names what each panel's `prompts` counts."""
    if not curves:
        return None
    specs = [spec for spec in SPEC_TITLES if spec in curves] + [s for s in curves if s not in SPEC_TITLES]
    figure, axes_row = plt.subplots(1, len(specs), figsize=(4.2 * len(specs), 3.4), squeeze=False)
    for axes, spec in zip(axes_row[0], specs, strict=True):
        for phase, values in curves[spec].relative.items():
            axes.plot(range(len(values)), values, color=PHASE_COLOURS.get(phase), label=phase)
            peak = curves[spec].peak_layer.get(phase)
            if peak is not None:
                axes.axvline(peak, color=PHASE_COLOURS.get(phase), linestyle=":", alpha=0.6)
        axes.set_title(f"{SPEC_TITLES.get(spec, spec)} ({counted(curves[spec].prompts)})")
        _integer_layers(axes)
        axes.set_xlabel("layer")
        axes.set_ylabel("relative probability")
        axes.legend(fontsize=8)
    figure.suptitle(title)
    figure.tight_layout()
    return figure


def mean_of_tasks(count: int) -> str:
    return f"mean of {count} tasks"


def mean_lens_curves(lens: LensResults) -> dict[str, PhaseCurves]:
    """Per spec, the curves averaged over tasks (peaks of the averaged curves); `prompts` holds the
    number of tasks averaged (label it with `mean_of_tasks`)."""
    collected: dict[str, list[PhaseCurves]] = {}
    for result in lens.per_task.values():
        for spec, curves in result.curves.items():
            collected.setdefault(spec, []).append(curves)
    averaged: dict[str, PhaseCurves] = {}
    for spec, rows in collected.items():
        relative = {
            phase: np.mean([row.relative[phase] for row in rows], axis=0).tolist() for phase in PHASES
        }
        averaged[spec] = PhaseCurves(
            prompts=len(rows),
            probability={
                phase: np.mean([row.probability[phase] for row in rows], axis=0).tolist() for phase in PHASES
            },
            relative=relative,
            peak_layer={phase: int(np.argmax(values)) for phase, values in relative.items()},
        )
    return averaged


def similarity_heatmap(labels: Sequence[str], matrix: Sequence[Sequence[float]], title: str) -> Figure:
    size = max(5.0, 0.38 * len(labels) + 2.5)
    figure, axes = plt.subplots(figsize=(size + 1.2, size))
    values = np.asarray(matrix, dtype=float)
    # Residual-stream cosines are mostly high; starting the scale at the smallest value shows structure.
    lowest = max(-1.0, float(np.floor(values.min() * 10) / 10)) if values.size else 0.0
    image = axes.imshow(values, cmap="viridis", vmin=min(lowest, 0.9), vmax=1)
    axes.set_xticks(range(len(labels)), labels, rotation=90, fontsize=7)
    axes.set_yticks(range(len(labels)), labels, fontsize=7)
    axes.set_title(title)
    figure.colorbar(image, ax=axes, label="cosine similarity")
    return figure


def embedding_maps(embedding_map: EmbeddingMap) -> Figure | None:
    """Side by side: task vectors and raw input embeddings in 2-D; colour = task, marker = spec."""
    tasks, specs = embedding_map.tasks, embedding_map.specs
    if not tasks:
        return None
    names = list(dict.fromkeys(tasks))
    colours = {name: plt.get_cmap("tab10")(index % 10) for index, name in enumerate(names)}
    method = embedding_map.method.upper().replace("TSNE", "t-SNE")
    figure, axes_pair = plt.subplots(1, 2, figsize=(12, 5))
    panels: tuple[tuple[Any, MapPoints, str], ...] = (
        (axes_pair[0], embedding_map.vectors, "task vectors (residual at the last demonstration's ':')"),
        (axes_pair[1], embedding_map.embeddings, "raw inputs (mean input embedding)"),
    )
    for axes, points, title in panels:
        xy = np.asarray(points.xy, dtype=float)
        for task in names:
            for spec in dict.fromkeys(specs):
                rows = [
                    i for i, (t, s) in enumerate(zip(tasks, specs, strict=True)) if t == task and s == spec
                ]
                if rows:
                    axes.scatter(
                        xy[rows, 0],
                        xy[rows, 1],
                        color=colours[task],
                        marker=SPEC_MARKERS.get(spec, "x"),
                        s=28,
                        alpha=0.8,
                        label=f"{task} / {SPEC_TITLES.get(spec, spec)}",
                    )
        axes.set_title(f"{method}: {title}", fontsize=10)
        axes.set_xlabel(f"{method} 1")
        axes.set_ylabel(f"{method} 2")
    handles, labels = axes_pair[0].get_legend_handles_labels()
    figure.legend(handles, labels, loc="lower center", ncol=min(4, len(labels)), fontsize=8)
    figure.tight_layout(rect=(0, 0.08 + 0.03 * (len(labels) // 4), 1, 1))
    return figure


def head_effects(
    effects: Mapping[str, Sequence[Sequence[float]]], top_heads: Mapping[str, Sequence[Sequence[int]]]
) -> Figure | None:
    """Each head's mean indirect effect, [layer][head], one panel per demonstration modality, on one
    colour scale centred at zero; the top-k heads that make the function vector are ringed."""
    panels = {modality: np.asarray(grid, dtype=float) for modality, grid in effects.items() if grid}
    if not panels:
        return None
    limit = max(float(np.abs(grid).max()) for grid in panels.values()) or 1.0
    figure, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels) + 1, 4.5), squeeze=False)
    images = []
    for axis, (modality, grid) in zip(axes[0], panels.items(), strict=True):
        image = axis.imshow(grid, cmap="RdBu_r", vmin=-limit, vmax=limit, aspect="auto", origin="lower")
        ringed = top_heads.get(modality, [])
        axis.scatter(
            [head for _, head in ringed],
            [layer for layer, _ in ringed],
            s=60,
            facecolors="none",
            edgecolors="k",
        )
        axis.set_title(f"{modality} ICL")
        axis.set_xlabel("head")
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
        axis.yaxis.set_major_locator(MaxNLocator(integer=True))
        images.append(image)
    axes[0][0].set_ylabel("layer")
    figure.colorbar(images[0], ax=axes[0].tolist(), label="indirect effect (probability gain)")
    return figure
