"""The paper's analyses, in the order `run_analyses` runs them: `PAPER_ANALYSES`.

Each result is a dataclass stored in analysis.json's `results` under the analysis's name:

- `lens` (LensResults): the three-phase logit lens of each task (one cached step per task; a failed
  task is recorded under errors["lens/<task>"] and the others kept);
- `lens_peaks` (LensPeaks): per spec and phase, the mean peak layer over the tasks of `lens`;
- `similarity` (Similarity): cosine matrices of the given vectors at the chosen layer and per layer;
- `decoded_tokens` (DecodedVectors): top tokens per layer of each vector, decoded by the model it
  was read from;
- `embedding_map` (EmbeddingMap): 2-D maps of per-prompt vectors and raw input embeddings at the
  chosen layer;
- `conflict` (ConflictResults): ConflictCounts rows, one per ordered pair of tasks sharing inputs and
  per way of giving task A (text ICL, and its instruction when it has one);
- `conflict_totals` (ConflictTotals): those counts summed per way of giving task A.

Every prompt they build follows `settings.prompts` (shots, seed, style, template, batch size).
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from typing import Any

from taskvec.analysis.conflict import (
    CONFLICT_CONTEXTS,
    ConflictCounts,
    ConflictResults,
    ConflictTotals,
    conflict_totals,
    shared_input_pairs,
    task_conflict,
)
from taskvec.analysis.context import Analysis, AnalysisContext
from taskvec.analysis.embedding_map import EmbeddingMap, PromptPoints, collect_prompt_points, embedding_map
from taskvec.analysis.lens_phases import LensPeaks, LensPhases, LensResults, lens_phases, mean_peak_layers
from taskvec.analysis.prompt_sets import unsupported_reason
from taskvec.analysis.similarity import Similarity, VectorKey, similarity_analysis
from taskvec.analysis.vector_tokens import DecodedVectors, decode_vectors
from taskvec.tasks import Task
from taskvec.vectors import VectorSpec


def _lens_of(context: AnalysisContext, task: Task) -> LensPhases:
    settings = context.settings
    return lens_phases(
        context.handle,
        task,
        max_prompts=settings.lens_prompts,
        prompts=settings.prompts,
    )


def _lens(context: AnalysisContext) -> LensResults:
    lens: dict[str, LensPhases] = {}
    for task in context.tasks:
        result = context.attempt(
            f"lens/{task.name}",
            partial(_lens_of, context, task),
            LensPhases,
            tasks=[task],
            layer=False,  # the lens reads every layer
            vectors=(),
            llm=False,
        )
        if result is not None:
            lens[task.name] = result
    if context.tasks and not lens:
        raise RuntimeError("the lens failed on every task (see errors['lens/<task>'])")
    return LensResults(lens)


def _one_step_per_task(tasks: Sequence[Task]) -> list[list[Task]]:
    return [[task] for task in tasks]


def _one_step(tasks: Sequence[Task]) -> list[list[Task]]:
    return [list(tasks)]


def _one_step_per_pair(tasks: Sequence[Task]) -> list[list[Task]]:
    """Each unordered pair of tasks sharing inputs (a step computes both orders of the pair)."""
    pairs: list[list[Task]] = []
    for a, b in shared_input_pairs(tasks):
        if not any({a.name, b.name} == {t.name for t in pair} for pair in pairs):
            pairs.append([a, b])
    return pairs


LENS = Analysis(
    "lens",
    _lens,
    LensResults,
    "three-phase logit lens (input, task, answer) per task and spec",
    worker_steps=_one_step_per_task,
)
LENS_PEAKS = Analysis(
    "lens_peaks",
    lambda context: mean_peak_layers(context.earlier(LENS)),
    LensPeaks,
    "mean peak layer of each lens phase over tasks",
)


def _similarity(context: AnalysisContext) -> Similarity:
    return context.cached(
        "similarity",
        lambda: similarity_analysis(context.vectors, context.layer),
        Similarity,
        layer=True,
        llm=False,
    )


SIMILARITY = Analysis(
    "similarity", _similarity, Similarity, "cosine similarity of the vectors across tasks and specs"
)


def _decode(context: AnalysisContext) -> DecodedVectors:
    decoded = {}
    for model, owner in (("vlm", context.handle), ("llm", context.llm)):
        mine = {key.label: vector for key, vector in context.vectors_of(model).items()}
        if owner is not None and mine:
            decoded[model] = decode_vectors(owner, mine, context.settings.top_k)
    return DecodedVectors(decoded)


def _decoded_tokens(context: AnalysisContext) -> DecodedVectors:
    """Top tokens per layer of every vector, each decoded by the model it came from."""
    return context.cached("decoded_tokens", partial(_decode, context), DecodedVectors, layer=False, llm=True)


DECODED_TOKENS = Analysis(
    "decoded_tokens", _decoded_tokens, DecodedVectors, "top tokens of each vector per layer"
)


def _map_specs(context: AnalysisContext) -> list[VectorSpec]:
    # A spec enters the map only if every task has it, so the clusters compare like with like.
    return [
        spec
        for spec in (VectorSpec.TEXT_ICL, VectorSpec.IMAGE_ICL)
        if all(unsupported_reason(context.handle, task, spec) is None for task in context.tasks)
    ]


def _embedding_map(context: AnalysisContext) -> EmbeddingMap:
    """The map is computed from prompt points cached on their own: t-SNE turns a difference in the
    last bits of its input (another process's kernels) into a different picture, so a map made
    after a resume reads the very points the interrupted run stored."""
    settings = context.settings
    scope: dict[str, Any] = {"layer": True, "vectors": (), "llm": False}

    def points() -> PromptPoints:
        stored = context.cached_tensors(
            "embedding_map/points",
            lambda: collect_prompt_points(
                context.handle,
                context.tasks,
                context.layer,
                specs=_map_specs(context),
                prompts_per_task=settings.map_prompts_per_task,
                prompts=settings.prompts,
            ).as_tensors(),
            usable=PromptPoints.readable,
            **scope,
        )
        return PromptPoints.from_tensors(*stored)

    return context.cached(
        "embedding_map",
        lambda: embedding_map(points(), settings.projection, settings.prompts.seed),
        EmbeddingMap,
        **scope,
    )


EMBEDDING_MAP = Analysis(
    "embedding_map",
    _embedding_map,
    EmbeddingMap,
    "2-D map of per-prompt vectors and input embeddings",
    worker_steps=_one_step,
)


def _conflict_of(
    context: AnalysisContext, task_a: Task, task_b: Task, way: VectorSpec, key: VectorKey
) -> ConflictCounts:
    settings = context.settings
    return task_conflict(
        context.handle,
        task_a,
        task_b,
        context.vector(key),
        context.layer,
        context=way,
        max_items=settings.conflict_items,
        prompts=settings.prompts,
        max_new_tokens=settings.conflict_max_new_tokens,
        metric=settings.conflict_metric,
    )


def _conflict(context: AnalysisContext) -> ConflictResults:
    rows: list[ConflictCounts] = []
    parts = 0
    for task_a, task_b in shared_input_pairs(context.tasks):
        vector_key = VectorKey("vlm", task_b.name, VectorSpec.TEXT_ICL)
        for way in CONFLICT_CONTEXTS:
            if way is VectorSpec.INSTRUCTION and not task_a.instruction:
                continue
            parts += 1
            row = context.attempt(
                f"conflict/{way.value}/{task_a.name}--{task_b.name}",
                partial(_conflict_of, context, task_a, task_b, way, vector_key),
                ConflictCounts,
                tasks=[task_a, task_b],
                layer=True,
                vectors=[vector_key],
                llm=False,
            )
            if row is not None:
                rows.append(row)
    if parts and not rows:
        raise RuntimeError("the conflict failed on every pair (see errors['conflict/...'])")
    return ConflictResults(rows)


CONFLICT = Analysis(
    "conflict",
    _conflict,
    ConflictResults,
    "task A's prompt with task B's vector patched in",
    worker_steps=_one_step_per_pair,
)
CONFLICT_TOTALS = Analysis(
    "conflict_totals",
    lambda context: conflict_totals(context.earlier(CONFLICT).rows),
    ConflictTotals,
    "conflict outcomes summed over task pairs",
)

PAPER_ANALYSES: tuple[Analysis[Any], ...] = (
    LENS,
    LENS_PEAKS,
    SIMILARITY,
    DECODED_TOKENS,
    EMBEDDING_MAP,
    CONFLICT,
    CONFLICT_TOTALS,
)
