"""Layer choice on validation: one layer per patched condition, shared by every task (the paper's rule).

The reference sweeps every layer on the validation split, averages accuracy over tasks and picks the
best layer (np.argmax: the lowest on ties), then reports every test task at that layer.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from taskvec.evaluation import layer_accuracy


def choose_layer(mean_per_layer: Sequence[float]) -> int:
    """Index of the best mean accuracy; ties go to the lowest layer."""
    if not mean_per_layer:
        raise ValueError("no layers to choose from")
    return max(range(len(mean_per_layer)), key=lambda layer: (mean_per_layer[layer], -layer))


def mean_curve(curves: Sequence[Sequence[float]]) -> list[float]:
    if not curves:
        raise ValueError("no curves to average")
    width = len(curves[0])
    if any(len(curve) != width for curve in curves):
        raise ValueError("curves differ in length (models with different layer counts?)")
    return [sum(curve[layer] for curve in curves) / len(curves) for layer in range(width)]


@dataclass
class LayerChoice:
    chosen: int
    validation_mean: list[float]  # per layer, mean over tasks of the per-task (mean over seeds) curve
    validation_per_task: dict[str, list[float]]
    shared_from: str | None = None  # the condition whose sweep chose this layer, if not this one's

    def as_dict(self) -> dict[str, object]:
        choice: dict[str, object] = {
            "chosen": self.chosen,
            "validation_mean": self.validation_mean,
            "validation_per_task": self.validation_per_task,
        }
        if self.shared_from is not None:
            choice["shared_from"] = self.shared_from
        return choice


def choose_from_sweeps(
    sweeps: Mapping[str, Sequence[Mapping[str, object]]], *, ignore_case: bool = False
) -> LayerChoice:
    """`sweeps[task]` holds that task's cached sweeps (one per seed): tokens [query][layer], expected."""
    per_task: dict[str, list[float]] = {}
    for task, runs in sweeps.items():
        curves = [
            layer_accuracy(run["tokens"], run["expected"], ignore_case=ignore_case)  # type: ignore[arg-type]
            for run in runs
        ]
        per_task[task] = mean_curve(curves)
    overall = mean_curve(list(per_task.values()))
    return LayerChoice(choose_layer(overall), overall, per_task)


def fixed_layer(layer: int, num_layers: int) -> LayerChoice:
    """A layer given by the user instead of chosen (negative counts from the top, as in Python)."""
    if not -num_layers <= layer < num_layers:
        raise ValueError(f"layer {layer} is out of range for a model of {num_layers} layers")
    return LayerChoice(layer % num_layers, [], {})
