"""The analyses `run_analyses` runs, in order: the built-in ones, then any `register_analysis` adds.

Built-in results (the sections of analysis.json's `results`):

- `lens`: {task: LensPhases.as_dict()}, the three-phase logit lens of each task (one cached step
  per task; a failed task is recorded under errors["lens/<task>"] and the others kept);
- `lens_peaks`: per spec and phase, the mean peak layer over the tasks of `lens`;
- `similarity`: cosine matrices of the given vectors at the chosen layer and per layer;
- `decoded_tokens`: {"vlm" | "llm": {vector label: top tokens per layer}}, each vector decoded by the
  model it was read from;
- `embedding_map`: 2-D maps of per-prompt vectors and raw input embeddings at the chosen layer;
- `conflict`: ConflictCounts rows, one per ordered pair of tasks sharing inputs and per way of
  giving task A (text ICL, and its instruction when it has one);
- `conflict_totals`: those counts summed per way of giving task A.
"""

from __future__ import annotations

from functools import partial
from typing import Any

from taskvec.analysis.conflict import CONFLICT_CONTEXTS, conflict_totals, shared_input_pairs, task_conflict
from taskvec.analysis.context import Analysis, AnalysisContext
from taskvec.analysis.embedding_map import PromptPoints, collect_prompt_points, embedding_map
from taskvec.analysis.lens_phases import lens_phases, mean_peak_layers
from taskvec.analysis.prompt_sets import unsupported_reason
from taskvec.analysis.similarity import VectorKey, similarity_analysis
from taskvec.analysis.vector_tokens import decode_vectors
from taskvec.prompts import as_template
from taskvec.tasks import Task
from taskvec.vectors import VectorSpec


def _lens_of(context: AnalysisContext, task: Task) -> dict[str, Any]:
    settings = context.settings
    return lens_phases(
        context.handle,
        task,
        max_prompts=settings.lens_prompts,
        shots=settings.shots,
        seed=settings.seed,
        batch_size=settings.batch_size,
        template=settings.template,
    ).as_dict()


def _lens(context: AnalysisContext) -> dict[str, Any]:
    lens: dict[str, Any] = {}
    for task in context.tasks:
        result = context.attempt(
            f"lens/{task.name}",
            partial(_lens_of, context, task),
            tasks=[task],
            layer=False,  # the lens reads every layer
            vectors=(),
            llm=False,
        )
        if result is not None:
            lens[task.name] = result
    if context.tasks and not lens:
        raise RuntimeError("the lens failed on every task (see errors['lens/<task>'])")
    return lens


def _earlier(context: AnalysisContext, name: str) -> Any:
    if name not in context.results:
        raise LookupError(f"needs the {name!r} analysis, which did not finish")
    return context.results[name]


def _lens_peaks(context: AnalysisContext) -> dict[str, Any]:
    return mean_peak_layers(_earlier(context, "lens"))


def _similarity(context: AnalysisContext) -> dict[str, Any]:
    return context.cached(
        "similarity",
        lambda: similarity_analysis(context.vectors, context.layer),
        layer=True,
        llm=False,
    )


def _decode(context: AnalysisContext) -> dict[str, Any]:
    decoded: dict[str, Any] = {}
    for model, owner in (("vlm", context.handle), ("llm", context.llm)):
        mine = {key.label: vector for key, vector in context.vectors_of(model).items()}
        if owner is not None and mine:
            decoded[model] = decode_vectors(owner, mine, context.settings.top_k)
    return decoded


def _decoded_tokens(context: AnalysisContext) -> dict[str, Any]:
    """Top tokens per layer of every vector, each decoded by the model it came from."""
    return context.cached("decoded_tokens", partial(_decode, context), layer=False, llm=True)


def _map_specs(context: AnalysisContext) -> list[VectorSpec]:
    # A spec enters the map only if every task has it, so the clusters compare like with like.
    return [
        spec
        for spec in (VectorSpec.TEXT_ICL, VectorSpec.IMAGE_ICL)
        if all(unsupported_reason(context.handle, task, spec) is None for task in context.tasks)
    ]


def _embedding_map(context: AnalysisContext) -> dict[str, Any]:
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
                shots=settings.shots,
                seed=settings.seed,
                batch_size=settings.batch_size,
                template=as_template(settings.template),
            ).as_tensors(),
            usable=PromptPoints.readable,
            **scope,
        )
        return PromptPoints.from_tensors(*stored)

    return context.cached(
        "embedding_map", lambda: embedding_map(points(), settings.projection, settings.seed), **scope
    )


def _conflict_of(
    context: AnalysisContext, task_a: Task, task_b: Task, way: VectorSpec, key: VectorKey
) -> dict[str, Any]:
    settings = context.settings
    return task_conflict(
        context.handle,
        task_a,
        task_b,
        context.vector(key),
        context.layer,
        context=way,
        max_items=settings.conflict_items,
        shots=settings.shots,
        seed=settings.seed,
        max_new_tokens=settings.conflict_max_new_tokens,
        metric=settings.conflict_metric,
        template=settings.template,
    ).as_dict()


def _conflict(context: AnalysisContext) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
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
                tasks=[task_a, task_b],
                layer=True,
                vectors=[vector_key],
                llm=False,
            )
            if row is not None:
                rows.append(row)
    if parts and not rows:
        raise RuntimeError("the conflict failed on every pair (see errors['conflict/...'])")
    return rows


def _conflict_totals(context: AnalysisContext) -> dict[str, Any]:
    return conflict_totals(_earlier(context, "conflict"))


ANALYSES: list[Analysis] = [
    Analysis("lens", _lens, "three-phase logit lens (input, task, answer) per task and spec"),
    Analysis("lens_peaks", _lens_peaks, "mean peak layer of each lens phase over tasks"),
    Analysis("similarity", _similarity, "cosine similarity of the vectors across tasks and specs"),
    Analysis("decoded_tokens", _decoded_tokens, "top tokens of each vector per layer"),
    Analysis("embedding_map", _embedding_map, "2-D map of per-prompt vectors and input embeddings"),
    Analysis("conflict", _conflict, "task A's prompt with task B's vector patched in"),
    Analysis("conflict_totals", _conflict_totals, "conflict outcomes summed over task pairs"),
]


def register_analysis(analysis: Analysis, *, replace: bool = False) -> Analysis:
    """Add an analysis after the registered ones (or, with `replace`, swap the one of that name).

    Its result lands in `AnalysisDocument.results[analysis.name]`; a failure under `errors`.
    """
    names = [registered.name for registered in ANALYSES]
    if analysis.name in names:
        if not replace:
            raise ValueError(f"an analysis named {analysis.name!r} is registered; pass replace=True")
        ANALYSES[names.index(analysis.name)] = analysis
    else:
        ANALYSES.append(analysis)
    return analysis


def unregister_analysis(name: str) -> None:
    """Remove the analysis of that name (nothing happens when none is registered)."""
    ANALYSES[:] = [analysis for analysis in ANALYSES if analysis.name != name]


def registered_analyses() -> tuple[Analysis, ...]:
    return tuple(ANALYSES)
