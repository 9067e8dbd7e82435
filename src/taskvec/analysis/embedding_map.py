"""Per-prompt task vectors and raw input embeddings, mapped to 2-D (t-SNE or PCA).

The paper's picture: residuals at the last demonstration's ':' cluster by task whatever the
modality, while the raw inputs (the embeddings the language model receives) cluster by modality.
Besides the 2-D points, `neighbour_agreement` gives that in numbers computed in the full space: the
share of points whose nearest neighbour (cosine) has the same task, and the same specification.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from taskvec.analysis.prompt_sets import (
    ANALYSIS_PROMPT_SETTINGS,
    demonstration_pool,
    seeded_sample,
    task_icl_prompts,
)
from taskvec.engine.devices import to_cpu_float32
from taskvec.models import ModelHandle
from taskvec.progress import with_progress
from taskvec.prompts import DEFAULT_TEMPLATE, Prompt, QATemplate, as_template
from taskvec.prompts.settings import PromptSettings
from taskvec.tasks import Task
from taskvec.vectors import VectorSpec, parse_spec, residuals_at_marker

ProjectionMethod = Literal["tsne", "pca"]


@dataclass
class PromptPoints:
    """One row per prompt: its task and spec, the residual at the chosen layer, the mean embedding."""

    tasks: list[str]
    specs: list[str]
    vectors: np.ndarray  # [n, hidden], float32
    embeddings: np.ndarray  # [n, hidden], float32

    def as_tensors(self) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        """The points as a safetensors file holds them: tensors, and the columns as JSON metadata."""
        tensors = {"vectors": torch.from_numpy(self.vectors), "embeddings": torch.from_numpy(self.embeddings)}
        return tensors, {"tasks": json.dumps(self.tasks), "specs": json.dumps(self.specs)}

    @classmethod
    def from_tensors(cls, tensors: Mapping[str, torch.Tensor], columns: Mapping[str, str]) -> PromptPoints:
        """The points of `as_tensors`; a ValueError when they do not fit together."""
        tasks, specs = json.loads(columns["tasks"]), json.loads(columns["specs"])
        vectors, embeddings = tensors["vectors"].numpy(), tensors["embeddings"].numpy()
        if not len(tasks) == len(specs) == len(vectors) == len(embeddings):
            raise ValueError(
                f"prompt points of {len(tasks)} tasks, {len(specs)} specs, {len(vectors)} vectors "
                f"and {len(embeddings)} embeddings"
            )
        return cls(tasks, specs, vectors, embeddings)

    @classmethod
    def readable(cls, stored: tuple[Mapping[str, torch.Tensor], Mapping[str, str]]) -> bool:
        try:
            cls.from_tensors(*stored)
        except (KeyError, ValueError, TypeError):
            return False
        return True


@dataclass
class MapPoints:
    """One 2-D map, and how often a point's nearest neighbour in the full space shares its label."""

    xy: list[list[float]]  # one [x, y] per prompt
    same_task_neighbour: float | None
    same_spec_neighbour: float | None


@dataclass
class EmbeddingMap:
    """The `embedding_map` analysis: 2-D maps of per-prompt task vectors and of raw input embeddings,
    one row per prompt in `tasks` / `specs` order."""

    method: ProjectionMethod
    tasks: list[str]
    specs: list[str]
    vectors: MapPoints
    embeddings: MapPoints


def prompt_points(
    handle: ModelHandle,
    prompts: Sequence[Prompt],
    layer: int,
    *,
    occurrence: int = -2,
    template: QATemplate = DEFAULT_TEMPLATE,
    batch_size: int = 4,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Residual at the answer marker `occurrence` (-2: the last demonstration's ':') at `layer`, and
    the mean input embedding, of each prompt: two [n, hidden] tensors."""
    read = residuals_at_marker(
        handle,
        prompts,
        occurrence=occurrence,
        layers=[layer],
        batch_size=batch_size,
        input_embeddings=True,
        template=template,
    )
    assert read.input_embeddings is not None
    return read.residuals[:, 0], read.input_embeddings


def collect_prompt_points(
    handle: ModelHandle,
    tasks: Sequence[Task],
    layer: int,
    *,
    specs: Sequence[VectorSpec | str] = (VectorSpec.TEXT_ICL, VectorSpec.IMAGE_ICL),
    prompts_per_task: int = 30,
    prompts: PromptSettings = ANALYSIS_PROMPT_SETTINGS,
    progress: bool = False,
) -> PromptPoints:
    """Individual ICL prompts of each task (validation queries, as for vector extraction), each spec,
    built and read by `prompts` (the seed draws the queries and their demonstrations)."""
    template = as_template(prompts.template)
    tasks_column: list[str] = []
    specs_column: list[str] = []
    vectors, embeddings = [], []
    jobs = [(task, parse_spec(spec)) for task in tasks for spec in specs]
    for task, spec in with_progress(jobs, "prompt points", enabled=progress, leave=False):
        if spec.demo_modality is None:
            raise ValueError(f"the embedding map reads ICL prompts; {spec.value!r} has no demonstrations")
        queries = seeded_sample(demonstration_pool(task), prompts_per_task, prompts.seed)
        built_prompts = task_icl_prompts(task, queries, modality=spec.demo_modality, settings=prompts)
        residual, embedding = prompt_points(
            handle, built_prompts, layer, template=template, batch_size=prompts.batch_size
        )
        vectors.append(residual)
        embeddings.append(embedding)
        tasks_column += [task.name] * len(built_prompts)
        specs_column += [spec.value] * len(built_prompts)
    return PromptPoints(
        tasks_column,
        specs_column,
        to_cpu_float32(torch.cat(vectors)).numpy(),
        to_cpu_float32(torch.cat(embeddings)).numpy(),
    )


def project_2d(points: np.ndarray, method: ProjectionMethod = "tsne", seed: int = 0) -> np.ndarray:
    """[n, d] -> [n, 2]. Rows are scaled to unit length first, so distances follow cosine similarity.

    t-SNE needs more points than its perplexity; with fewer than 5 points PCA is used instead.
    """
    from sklearn.decomposition import PCA
    from sklearn.manifold import TSNE

    unit = points / np.maximum(np.linalg.norm(points, axis=1, keepdims=True), 1e-12)
    n = len(unit)
    if n < 2:
        return np.zeros((n, 2))
    if method == "tsne" and n >= 5:
        perplexity = float(min(30.0, (n - 1) / 3))
        tsne = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed)
        return np.asarray(tsne.fit_transform(unit))
    components = min(2, n, unit.shape[1])
    projected = PCA(n_components=components, random_state=seed).fit_transform(unit)
    return np.pad(projected, ((0, 0), (0, 2 - components)))


def neighbour_agreement(points: np.ndarray, labels: Sequence[str]) -> float | None:
    """Share of points whose nearest other point (by cosine) carries the same label."""
    if len(points) < 2:
        return None
    unit = points / np.maximum(np.linalg.norm(points, axis=1, keepdims=True), 1e-12)
    similarity = unit @ unit.T
    np.fill_diagonal(similarity, -np.inf)
    nearest = similarity.argmax(axis=1)
    return float(np.mean([labels[i] == labels[j] for i, j in enumerate(nearest)]))


def embedding_map(points: PromptPoints, method: ProjectionMethod = "tsne", seed: int = 0) -> EmbeddingMap:
    """2-D maps of the task vectors and of the raw input embeddings, with neighbour agreements."""

    def mapped(matrix: np.ndarray) -> MapPoints:
        return MapPoints(
            xy=np.round(project_2d(matrix, method, seed), 4).tolist(),
            same_task_neighbour=neighbour_agreement(matrix, points.tasks),
            same_spec_neighbour=neighbour_agreement(matrix, points.specs),
        )

    return EmbeddingMap(method, points.tasks, points.specs, mapped(points.vectors), mapped(points.embeddings))
