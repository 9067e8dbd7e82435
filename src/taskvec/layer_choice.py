"""Layer choice on validation: one layer per patched condition, shared by every task (the paper's rule).

The reference sweeps every layer on the validation split, averages accuracy over tasks and picks the
best layer (np.argmax: the lowest on ties), then reports every test task at that layer. The choice
here is restricted to a candidate range: replacing the last layer's output at the last position
leaves only the final norm and the unembedding, so there the answer is the vector's own decoded
token whatever the query, and a task with one dominant answer would pick that layer for nothing.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from taskvec.evaluation import layer_accuracy


def candidate_layers(first: int, last: int, num_layers: int) -> list[int]:
    """Layers first..last inclusive; negative indices count from the top as in Python."""
    for value in (first, last):
        if not -num_layers <= value < num_layers:
            raise ValueError(f"candidate layer {value} is out of range for a model of {num_layers} layers")
    low, high = first % num_layers, last % num_layers
    if low > high:
        raise ValueError(
            f"no candidate layers: the first ({first} = {low}) is above the last ({last} = {high}) "
            f"of a model of {num_layers} layers"
        )
    return list(range(low, high + 1))


def choose_layer(mean_per_layer: Sequence[float], candidates: Sequence[int] | None = None) -> int:
    """Index of the best mean accuracy among the candidates (all layers by default); ties: the lowest."""
    if not mean_per_layer:
        raise ValueError("no layers to choose from")
    layers = list(range(len(mean_per_layer))) if candidates is None else list(candidates)
    return max(layers, key=lambda layer: (mean_per_layer[layer], -layer))


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
    candidates: list[int] = field(default_factory=list)  # the layers the choice could take
    shared_from: str | None = None  # the condition whose sweep chose this layer, if not this one's
    fixed: bool = False  # given by the user (--layer), not chosen
    # A function vector's: the scale it is added with, and the mean curve at each scale tried.
    scale: float | None = None
    validation_per_scale: dict[str, list[float]] = field(default_factory=dict)

    @property
    def validation_at_chosen(self) -> float | None:
        """The validation accuracy at the chosen layer (None when the layer was not swept)."""
        return self.validation_mean[self.chosen] if self.validation_mean else None


def choose_from_sweeps(
    sweeps: Mapping[str, Sequence[Mapping[str, object]]],
    candidates: Sequence[int],
    *,
    ignore_case: bool = False,
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
    return LayerChoice(choose_layer(overall, candidates), overall, per_task, list(candidates))


def choose_scale_and_layer(
    sweeps: Mapping[str, Sequence[Mapping[str, object]]],
    candidates: Sequence[int],
    *,
    ignore_case: bool = False,
) -> LayerChoice:
    """As `choose_from_sweeps` over every (scale, layer) of function-vector sweeps ("scales" and
    "tokens_per_scale" [scale][query][layer]); ties: the lowest layer, then the smallest scale."""
    first = next(run for runs in sweeps.values() for run in runs)
    scales = [float(scale) for scale in first["scales"]]  # type: ignore[attr-defined]
    per_scale = [
        choose_from_sweeps(
            {
                task: [{**run, "tokens": run["tokens_per_scale"][index]} for run in runs]  # type: ignore[index]
                for task, runs in sweeps.items()
            },
            candidates,
            ignore_case=ignore_case,
        )
        for index in range(len(scales))
    ]
    index, layer = max(
        ((index, layer) for index in range(len(scales)) for layer in candidates),
        key=lambda pair: (per_scale[pair[0]].validation_mean[pair[1]], -pair[1], -scales[pair[0]]),
    )
    chosen = per_scale[index]
    return LayerChoice(
        layer,
        chosen.validation_mean,
        chosen.validation_per_task,
        list(candidates),
        scale=scales[index],
        validation_per_scale={str(s): c.validation_mean for s, c in zip(scales, per_scale, strict=True)},
    )


def fixed_layer(layer: int, num_layers: int) -> LayerChoice:
    """A layer given by the user instead of chosen (negative counts from the top, as in Python)."""
    if not -num_layers <= layer < num_layers:
        raise ValueError(
            f"layer {layer} (--layer) is out of range for a model of {num_layers} layers "
            f"(0 to {num_layers - 1}, or {-num_layers} to -1)"
        )
    return LayerChoice(layer % num_layers, [], {}, [layer % num_layers], fixed=True)
