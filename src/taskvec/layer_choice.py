"""Layer choice on validation: one layer per patched condition, shared by every task (the paper's rule).

The reference sweeps every layer on the validation split, averages accuracy over tasks and picks the
best layer (np.argmax: the lowest on ties), then reports every test task at that layer. Every command
that chooses a layer (`taskvec run`, `demo`, `heads --across-modalities`, `sweep`) chooses it here,
by one rule:

- candidates: layers `DEFAULT_FIRST_CANDIDATE_LAYER`..`DEFAULT_LAST_CANDIDATE_LAYER` unless the run
  is told otherwise. The last layer is left out: replacing its output at the last position leaves
  only the final norm and the unembedding, so there the answer is the vector's own decoded token
  whatever the query, and a task with one dominant answer would pick that layer for nothing;
- the highest mean validation accuracy over tasks; ties: the lowest layer, then the smallest scale;
- "no layer helped": when no candidate at any scale is strictly above the unpatched queries'
  validation accuracy, the choice has no layer (`LayerChoice.chosen` None).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

DEFAULT_FIRST_CANDIDATE_LAYER = 0
DEFAULT_LAST_CANDIDATE_LAYER = -2  # the last layer's replaced output cannot depend on the query
NO_LAYER_HELPED = "no layer helped"
# Accuracies are ratios of counts, so real differences are at least 1 / (items x seeds x tasks),
# far above this; equal accuracies may differ by rounding alone (sweep curves are float32 sums,
# means over seeds and tasks round again).
_ROUNDING = 1e-6


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


def default_candidates(num_layers: int) -> list[int]:
    """The candidate layers every command uses unless told otherwise (all but the last layer)."""
    return candidate_layers(DEFAULT_FIRST_CANDIDATE_LAYER, DEFAULT_LAST_CANDIDATE_LAYER, num_layers)


def choose_layer(mean_per_layer: Sequence[float], candidates: Sequence[int] | None = None) -> int:
    """Index of the best mean accuracy among the candidates (the default candidates when None);
    ties: the lowest. No unpatched reference: see `choose_on_validation` for "no layer helped"."""
    if not mean_per_layer:
        raise ValueError("no layers to choose from")
    layers = default_candidates(len(mean_per_layer)) if candidates is None else list(candidates)
    return max(layers, key=lambda layer: (mean_per_layer[layer], -layer))


def mean_curve(curves: Sequence[Sequence[float]]) -> list[float]:
    if not curves:
        raise ValueError("no curves to average")
    width = len(curves[0])
    if any(len(curve) != width for curve in curves):
        raise ValueError("curves differ in length (models with different layer counts?)")
    return [sum(curve[layer] for curve in curves) / len(curves) for layer in range(width)]


def layer_and_scale(layer: int, scale: float | None) -> str:
    """A patched layer as a table cell: "6", or a function vector's layer and scale "6 x4"."""
    return str(layer) if scale is None else f"{layer} x{scale:g}"


def placement_text(layer: int | None, scale: float | None = None, *, fixed: bool = False) -> str:
    """A layer choice in words: "layer 6", "layer 6 x4" (a function vector added at scale 4),
    "layer 6 (given)" (by the user, not chosen), or "no layer helped" (layer None)."""
    if layer is None:
        return NO_LAYER_HELPED
    text = f"layer {layer_and_scale(layer, scale)}"
    return f"{text} (given)" if fixed else text


@dataclass
class LayerChoice:
    chosen: int | None  # None: no candidate beat the unpatched queries on validation
    validation_mean: list[float]  # per layer, mean over tasks of the per-task (mean over seeds) curve
    validation_per_task: dict[str, list[float]]
    candidates: list[int] = field(default_factory=list)  # the layers the choice could take
    shared_from: str | None = None  # the condition whose sweep chose this layer, if not this one's
    fixed: bool = False  # given by the user (--layer), not chosen
    # A function vector's: the scale it is added with, and the mean curve at each scale tried.
    scale: float | None = None
    validation_per_scale: dict[str, list[float]] = field(default_factory=dict)
    # Mean over tasks of the unpatched validation queries' accuracy; None when not measured.
    unpatched_validation: float | None = None

    @property
    def helped(self) -> bool:
        """Whether a layer was chosen (or given): False when no candidate beat the unpatched queries."""
        return self.chosen is not None

    @property
    def validation_at_chosen(self) -> float | None:
        """The validation accuracy at the chosen layer (None when no layer, or the layer was not swept)."""
        if self.chosen is None or not self.validation_mean:
            return None
        return self.validation_mean[self.chosen]

    @property
    def text(self) -> str:
        """How the choice reads in tables and the report (see `placement_text`)."""
        return placement_text(self.chosen, self.scale, fixed=self.fixed)


def choose_on_validation(
    curves_per_scale: Mapping[float, Mapping[str, Sequence[Sequence[float]]]],
    candidates: Sequence[int],
    *,
    unpatched: Mapping[str, float] | None,
    scaled: bool,
) -> LayerChoice:
    """The layer (and scale) of one patched condition, chosen on validation by the module's rule.

    `curves_per_scale[scale][task]` holds one validation accuracy-per-layer curve per seed of that
    task, the vector patched at `scale`; every scale covers the same tasks and every curve the same
    layers. `candidates` are the layers the choice may take (`default_candidates` or the run's
    `candidate_layers`). `unpatched[task]` is the accuracy of the same validation queries without a
    patch, scored as the curves are (first generated token); None when not measured, then only
    curves at 0 on every candidate count as no help (an unpatched accuracy is never below 0).

    Each curve is averaged over seeds, then over tasks. The choice is the (scale, layer) of the
    highest mean over the candidates; ties: the lowest layer, then the smallest scale. When that
    mean is not strictly above the unpatched mean over tasks, `chosen` is None ("no layer helped").

    `scaled` False: a residual task vector, one scale (1.0, replaced), `scale` left None on the
    result. `scaled` True: a function vector added at each scale; the result carries the chosen
    scale (None with no layer) and `validation_per_scale` {str(scale): mean curve}. Either way
    `validation_mean` and `validation_per_task` are the curves at the best scale.
    """
    if not curves_per_scale:
        raise ValueError("no validation curves to choose a layer from")
    if not scaled and len(curves_per_scale) != 1:
        raise ValueError(f"a vector that is not scaled has one curve set, got {len(curves_per_scale)} scales")
    if not candidates:
        raise ValueError("no candidate layers to choose from")
    scales = sorted(curves_per_scale)
    tasks = list(curves_per_scale[scales[0]])
    if not tasks:
        raise ValueError("no tasks in the validation curves")
    per_scale: dict[float, dict[str, list[float]]] = {}
    for scale in scales:
        of_scale = curves_per_scale[scale]
        if sorted(of_scale) != sorted(tasks):
            raise ValueError(
                f"the curves at scale {scale:g} cover tasks {sorted(of_scale)}, not {sorted(tasks)}"
            )
        per_scale[scale] = {task: mean_curve(of_scale[task]) for task in tasks}
    means = {scale: mean_curve(list(per_task.values())) for scale, per_task in per_scale.items()}
    width = len(means[scales[0]])
    if any(len(curve) != width for curve in means.values()):
        raise ValueError("the curves at different scales differ in length")
    outside = [layer for layer in candidates if not 0 <= layer < width]
    if outside:
        raise ValueError(f"candidate layers {outside} are outside the curves' {width} layers")
    scale, layer = max(
        ((scale, layer) for scale in scales for layer in candidates),
        key=lambda pair: (means[pair[0]][pair[1]], -pair[1], -pair[0]),
    )
    reference = 0.0
    unpatched_mean = None
    if unpatched is not None:
        if sorted(unpatched) != sorted(tasks):
            raise ValueError(
                f"unpatched accuracies cover tasks {sorted(unpatched)}, the curves {sorted(tasks)}"
            )
        unpatched_mean = reference = sum(unpatched[task] for task in tasks) / len(tasks)
    helped = means[scale][layer] > reference + _ROUNDING
    return LayerChoice(
        layer if helped else None,
        means[scale],
        per_scale[scale],
        list(candidates),
        scale=scale if scaled and helped else None,
        validation_per_scale={str(s): means[s] for s in scales} if scaled else {},
        unpatched_validation=unpatched_mean,
    )


def fixed_layer(layer: int, num_layers: int) -> LayerChoice:
    """A layer given by the user instead of chosen (negative counts from the top, as in Python)."""
    if not -num_layers <= layer < num_layers:
        raise ValueError(
            f"layer {layer} (--layer) is out of range for a model of {num_layers} layers "
            f"(0 to {num_layers - 1}, or {-num_layers} to -1)"
        )
    return LayerChoice(layer % num_layers, [], {}, [layer % num_layers], fixed=True)
