"""Cosine similarity of task vectors across tasks and specifications, at one layer and per layer.

The paper's claim 2: vectors of one task given different ways (text examples, image examples,
instruction) are closer to each other than to other tasks' vectors. The summary puts that in two
numbers: the mean within-task cosine across specifications against the mean cross-task cosine.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from itertools import combinations
from typing import Any

import torch

from taskvec.engine.devices import to_cpu_float32
from taskvec.vectors import VectorSpec, parse_spec

VECTOR_MODELS = ("vlm", "llm")


@dataclass(frozen=True, order=True)
class VectorKey:
    """Which vector: model ("vlm" = the model analysed, "llm" = its base language model), task, spec.

    `spec` is the extractable spec the vector was read with (a base-LM vector is ("llm", task,
    text-icl)); a spec's string value is accepted and stored as the VectorSpec.
    """

    model: str
    task: str
    spec: VectorSpec

    def __post_init__(self) -> None:
        if self.model not in VECTOR_MODELS:
            raise ValueError(f"vector model must be 'vlm' or 'llm', not {self.model!r}")
        object.__setattr__(self, "spec", parse_spec(self.spec))

    @property
    def label(self) -> str:
        prefix = "" if self.model == "vlm" else f"{self.model}:"
        return f"{prefix}{self.task} / {self.spec.value}"


@dataclass
class PairSummary:
    """Mean cosine over pairs of VLM vectors (None when no pair of that kind exists)."""

    within_task_cross_spec: float | None  # same task, different specification
    within_task_text_image: float | None  # same task, text ICL vs image ICL
    cross_task: float | None  # different tasks
    cross_task_same_spec: float | None  # different tasks, same specification


@dataclass
class LlmVsVlm:
    """Per task, the cosine of the base LM's and the VLM's text-ICL vectors at each layer."""

    per_task: dict[str, list[float]]
    mean_per_layer: list[float]
    mean_at_layer: float


@dataclass
class Similarity:
    """The `similarity` analysis: cosine matrices of every vector (rows and columns in `keys` order)
    at `layer` and per layer, and the VLM's pair summaries, raw and mean-centred."""

    layer: int
    labels: list[str]
    keys: list[VectorKey]
    matrix: list[list[float]]
    matrix_per_layer: list[list[list[float]]]
    summary: PairSummary
    summary_per_layer: list[PairSummary]
    summary_centered: PairSummary
    llm_vs_vlm: LlmVsVlm | None


def _rounded(matrix: torch.Tensor) -> list[Any]:
    # Four decimals keep analysis.json small and are far below any difference worth plotting.
    return torch.round(matrix * 1e4).div(1e4).tolist()


def cosine_per_layer(vectors: torch.Tensor) -> torch.Tensor:
    """[n, layers, hidden] -> [layers, n, n] cosine similarities."""
    unit = torch.nn.functional.normalize(to_cpu_float32(vectors), dim=-1)
    return torch.einsum("ilh,jlh->lij", unit, unit)


def centered_cosine(vectors: torch.Tensor) -> torch.Tensor:
    """[n, hidden] -> [n, n] cosine after subtracting the vectors' mean."""
    values = to_cpu_float32(vectors)
    unit = torch.nn.functional.normalize(values - values.mean(0), dim=-1)
    return unit @ unit.T


def pair_summary(keys: list[VectorKey], matrix: torch.Tensor) -> PairSummary:
    """Mean cosine over pairs of the same task across specs, and over pairs of different tasks."""
    within, text_image, cross, cross_same = [], [], [], []
    for i, j in combinations(range(len(keys)), 2):
        a, b = keys[i], keys[j]
        value = float(matrix[i, j])
        if a.task == b.task and a.spec != b.spec:
            within.append(value)
            if {a.spec, b.spec} == {VectorSpec.TEXT_ICL, VectorSpec.IMAGE_ICL}:
                text_image.append(value)
        elif a.task != b.task:
            cross.append(value)
            if a.spec == b.spec:
                cross_same.append(value)
    return PairSummary(_mean(within), _mean(text_image), _mean(cross), _mean(cross_same))


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def similarity_analysis(vectors: Mapping[VectorKey, torch.Tensor], layer: int) -> Similarity:
    """Cosine matrices of all vectors (VLM and base-LM), at `layer` and per layer, with summaries.

    The summaries use the VLM's vectors only (the cross-modal claim); the base-LM comparison is
    `llm_vs_vlm`: per task, the cosine of the two models' text-ICL vectors at each layer.
    """
    if not vectors:
        raise ValueError("no vectors to compare")
    keys = sorted(vectors)
    # Vectors may come from models on different devices and in different dtypes.
    stacked = torch.stack([to_cpu_float32(vectors[key]) for key in keys])
    per_layer = cosine_per_layer(stacked)
    vlm_rows = [index for index, key in enumerate(keys) if key.model == "vlm"]
    vlm_keys = [keys[index] for index in vlm_rows]
    vlm_per_layer = per_layer[:, vlm_rows][:, :, vlm_rows]
    return Similarity(
        layer=layer,
        labels=[key.label for key in keys],
        keys=keys,
        matrix=_rounded(per_layer[layer]),
        matrix_per_layer=_rounded(per_layer),
        summary=pair_summary(vlm_keys, vlm_per_layer[layer]),
        summary_per_layer=[pair_summary(vlm_keys, matrix) for matrix in vlm_per_layer],
        # Residual streams share a large common direction (raw cosines near 1 for any two vectors of
        # a small model), so the same summary after subtracting the mean of the VLM's vectors.
        summary_centered=pair_summary(vlm_keys, centered_cosine(stacked[vlm_rows, layer])),
        llm_vs_vlm=llm_vs_vlm_cosine(vectors, layer),
    )


def llm_vs_vlm_cosine(vectors: Mapping[VectorKey, torch.Tensor], layer: int) -> LlmVsVlm | None:
    """Per task, cosine of base-LM and VLM text-ICL vectors at each layer (None without LM vectors)."""
    per_task: dict[str, list[float]] = {}
    for key, vector in vectors.items():
        partner = VectorKey("llm", key.task, key.spec)
        if key.model != "vlm" or key.spec is not VectorSpec.TEXT_ICL or partner not in vectors:
            continue
        other = vectors[partner]
        if other.shape != vector.shape:
            continue  # a base LM of another width has no comparable residual stream
        cosine = torch.nn.functional.cosine_similarity(to_cpu_float32(vector), to_cpu_float32(other), dim=-1)
        per_task[key.task] = [round(float(v), 4) for v in cosine]
    if not per_task:
        return None
    layers = len(next(iter(per_task.values())))
    mean = [sum(curve[i] for curve in per_task.values()) / len(per_task) for i in range(layers)]
    return LlmVsVlm(per_task=per_task, mean_per_layer=mean, mean_at_layer=mean[layer])
