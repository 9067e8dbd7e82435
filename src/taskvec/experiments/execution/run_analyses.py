"""The analyses of a run: at the run's layer, with the run's own vectors, cached with its steps."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

import torch

from taskvec.analysis import AnalysisDocument, VectorKey, run_analyses
from taskvec.analysis.settings import QUICK, AnalysisSettings
from taskvec.caching import StepCache
from taskvec.experiments.execution.executors import AnalysisJob, StepExecutor
from taskvec.experiments.execution.runner import load_run_tasks
from taskvec.experiments.execution.vector_store import VectorStore
from taskvec.experiments.protocol.conditions import Condition, plan_conditions
from taskvec.experiments.results.run_results import RunResults
from taskvec.models import ModelHandle
from taskvec.tasks import Task
from taskvec.vectors import VectorSpec


def run_vectors(
    store: VectorStore,
    handle: ModelHandle,
    llm: ModelHandle | None,
    tasks: Sequence[Task],
    conditions: Sequence[Condition],
    seeds: Sequence[int],
) -> dict[VectorKey, torch.Tensor]:
    """The run's extracted vectors by (model, task, spec), each the mean over the run's seeds."""
    specs = {
        c.vector.source
        for c in conditions
        if c.vector is not None and c.model_role == "vlm" and not c.function_vector
    }
    vectors: dict[VectorKey, torch.Tensor] = {}
    for task in tasks:
        for spec in sorted(specs):
            seeded = [0] if spec is VectorSpec.INSTRUCTION else list(seeds)
            stacked = torch.stack([store.get("vlm", handle, task, spec, seed)[0].vectors for seed in seeded])
            vectors[VectorKey("vlm", task.name, spec)] = stacked.float().mean(dim=0)
        if llm is not None and any(c.model_role == "llm" and not c.function_vector for c in conditions):
            stacked = torch.stack(
                [store.get("llm", llm, task, VectorSpec.TEXT_ICL, seed)[0].vectors for seed in seeds]
            )
            vectors[VectorKey("llm", task.name, VectorSpec.TEXT_ICL)] = stacked.float().mean(dim=0)
    return vectors


def run_analyses_of_run(
    handle: ModelHandle,
    results: RunResults,
    out_dir: str | Path,
    *,
    llm: ModelHandle | None = None,
    progress: bool = True,
    executor: StepExecutor | None = None,
) -> AnalysisDocument:
    """The analyses at the run's layer with the run's own vectors, cached with the run's steps.

    `executor` may compute their expensive steps elsewhere first (Ray workers); this process then
    reads them from the cache and computes the rest, so the document is the same either way."""
    out = Path(out_dir)
    config = results.config
    tasks = load_run_tasks(config)
    conditions, _ = plan_conditions(handle, tasks, config, llm)
    cache = StepCache(out / "cache")
    store = VectorStore(out, config, cache, progress)
    vectors = run_vectors(store, handle, llm, tasks, conditions, config.seeds)
    settings = dataclasses.replace(QUICK if config.quick else AnalysisSettings(), template=config.template)
    if executor is not None:
        executor.analyses(AnalysisJob(tasks, results.analysis_layer, vectors, settings, cache))
    document = run_analyses(
        handle,
        tasks,
        layer=results.analysis_layer,
        layer_source=results.analysis_layer_source,
        vectors=vectors,
        cache=cache,
        llm=llm,
        settings=settings,
        progress=progress,
    )
    document.write(out / "analysis.json")
    return document
