"""The analyses of a run: at the run's layer, with the run's own vectors, cached with its steps."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from taskvec.analysis import PAPER_ANALYSES, Analysis, AnalysisDocument, VectorKey, run_analyses
from taskvec.analysis.settings import QUICK, AnalysisSettings
from taskvec.caching import StepCache
from taskvec.experiments.execution.executors import AnalysisJob, StepExecutor
from taskvec.experiments.execution.runner import load_run_tasks
from taskvec.experiments.execution.vector_store import VectorStore, run_models
from taskvec.experiments.protocol.conditions import Condition, plan_conditions
from taskvec.experiments.protocol.recipes import ResidualVector, VectorRecipe
from taskvec.experiments.results.run_results import RunResults
from taskvec.models import ModelHandle
from taskvec.tasks import Task


def run_vectors(
    store: VectorStore, tasks: Sequence[Task], conditions: Sequence[Condition], seeds: Sequence[int]
) -> dict[VectorKey, torch.Tensor]:
    """The run's residual task vectors by (model, task, spec), each the mean over the run's seeds:
    those the conditions patch and those their vectors are made from."""
    recipes: dict[str, ResidualVector] = {}
    for condition in conditions:
        if condition.vector is not None:
            recipes.update({recipe.id: recipe for recipe in residual_sources(condition.vector)})
    vectors: dict[VectorKey, torch.Tensor] = {}
    for task in tasks:
        for recipe in sorted(
            recipes.values(), key=lambda recipe: (recipe.role != "vlm", recipe.role, recipe.spec)
        ):
            seeded = sorted({recipe.seed_of(seed) for seed in seeds})
            stacked = torch.stack([store.get(recipe, task, seed)[0].vectors for seed in seeded])
            vectors[VectorKey(recipe.role, task.name, recipe.spec)] = stacked.float().mean(dim=0)
    return vectors


def residual_sources(recipe: VectorRecipe) -> list[ResidualVector]:
    """The residual task vectors a recipe is or is made from."""
    if isinstance(recipe, ResidualVector):
        return [recipe]
    return [found for source, _ in recipe.inputs(0) for found in residual_sources(source)]


def run_analyses_of_run(
    handle: ModelHandle,
    results: RunResults,
    out_dir: str | Path,
    *,
    llm: ModelHandle | None = None,
    progress: bool = True,
    executor: StepExecutor | None = None,
    analyses: Sequence[Analysis[Any]] = PAPER_ANALYSES,
) -> AnalysisDocument:
    """`analyses` (the paper's by default) at the run's layer with the run's own vectors, cached with
    the run's steps. Their prompts follow the run's template (`config.prompts.template`); the prompt counts
    are the analyses' own (QUICK for a quick run), as are their shots, seed and batch size
    (`AnalysisSettings.prompts`).

    `executor` may compute the paper analyses' expensive steps elsewhere first (Ray workers); this
    process then reads them from the cache and computes the rest, so the document is the same
    either way."""
    out = Path(out_dir)
    config = results.config
    tasks = load_run_tasks(config)
    conditions, _ = plan_conditions(handle, tasks, config, llm)
    cache = StepCache(out / "cache")
    store = VectorStore(out, config, cache, run_models(handle, llm), progress)
    vectors = run_vectors(store, tasks, conditions, config.seeds)
    analysis_settings = QUICK if config.quick else AnalysisSettings()
    settings = dataclasses.replace(
        analysis_settings,
        prompts=dataclasses.replace(analysis_settings.prompts, template=config.prompts.template),
    )
    if executor is not None:
        executor.analyses(AnalysisJob(tasks, results.analysis_layer, vectors, settings, cache, analyses))
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
        analyses=analyses,
    )
    document.write(out / "analysis.json")
    return document
