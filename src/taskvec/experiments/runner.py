"""run_experiments: the whole reproduction into one run directory (docs/RUN_LAYOUT.md).

Order: vectors, a layer sweep on validation per patched condition, then the test split at the
chosen layer. Every step is cached, so an interrupted run picks up where it stopped.
"""

from __future__ import annotations

import importlib
import time
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

import taskvec
from taskvec.caching import StepCache, write_json_atomically
from taskvec.experiments.baselines import majority_answer_baseline
from taskvec.experiments.conditions import Condition, plan_conditions
from taskvec.experiments.config import RunConfig
from taskvec.experiments.layer_choice import LayerChoice, choose_from_sweeps, fixed_layer
from taskvec.experiments.paper_numbers import paper_numbers
from taskvec.experiments.steps import StepRunner
from taskvec.experiments.tables import build_tables, score_rows, write_summary_csv
from taskvec.experiments.vector_store import VectorStore
from taskvec.models import ModelHandle
from taskvec.tasks import Task, load_task

RESULTS_FORMAT = 1
PACKAGES = ("torch", "transformers", "safetensors", "tokenizers", "numpy", "pillow")


def load_run_tasks(config: RunConfig) -> list[Task]:
    """The configured tasks, checked to have enough validation items and a test split."""
    tasks = [load_task(name) for name in config.tasks]
    names = [task.name for task in tasks]
    if len(set(names)) != len(names):
        raise ValueError(f"tasks repeat a name: {', '.join(names)}")
    for task in tasks:
        validation, test = task.split("val"), task.split("test")
        if len(validation) <= config.shots:
            raise ValueError(
                f"task {task.name!r} has {len(validation)} validation items: {config.shots} "
                "demonstrations plus a query need more"
            )
        if not test:
            raise ValueError(f"task {task.name!r} has an empty test split")
        style = config.style_for(task.name)
        if style is not None and style not in task.styles():
            raise ValueError(
                f"task {task.name!r} has no image style {style!r} for every item; "
                f"it has: {', '.join(task.styles()) or 'no images'}"
            )
        prompts = min(len(validation), config.val_limit or len(validation))
        largest = max(config.ensemble_examples, default=0)
        if largest > prompts * config.shots:
            raise ValueError(
                f"ensemble point {largest} needs {largest // config.shots} validation prompts; "
                f"task {task.name!r} gives {prompts}"
            )
    return tasks


def _package_versions() -> dict[str, str]:
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def _seeds(condition: Condition, config: RunConfig) -> list[int | None]:
    return list(config.seeds) if condition.seeded else [None]


def _layer_metric_ignores_case(condition: Condition, config: RunConfig) -> bool:
    ensemble = condition.examples is not None and config.ensemble_ignore_case
    return ensemble or config.metric == "prefix_ignore_case"


def _cosine_per_layer(steps: StepRunner, tasks: list[Task], config: RunConfig) -> list[float] | None:
    """Cosine per layer of the base LM's and the model's text-ICL vectors, mean over tasks and seeds."""
    if steps.llm is None:
        return None
    curves = []
    for task in tasks:
        for seed in config.seeds:
            vlm, _ = steps.store.get("vlm", steps.handle, task, "text-icl", seed)
            llm, _ = steps.store.get("llm", steps.llm, task, "text-icl", seed)
            curves.append(torch.nn.functional.cosine_similarity(vlm.vectors, llm.vectors, dim=-1))
    return torch.stack(curves).mean(dim=0).tolist()


def _borrowed_layer_choices(patched: list[Condition], config: RunConfig) -> dict[str, str]:
    """Ensemble-curve conditions that take their layer from the largest n of their kind (see
    `RunConfig.ensemble_layer_from`): {condition: condition whose sweep decides}."""
    if config.ensemble_layer_from == "each":
        return {}
    borrowed: dict[str, str] = {}
    for kind in ("exemplar", "ensemble"):
        curve = [c for c in patched if c.vector == kind and c.examples]
        if curve:
            largest = max(curve, key=lambda c: c.examples or 0)
            borrowed.update({c.name: largest.name for c in curve if c is not largest})
    return borrowed


def run_experiments(
    handle: ModelHandle,
    config: RunConfig,
    out_dir: str | Path,
    *,
    llm: ModelHandle | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Run every condition the model supports; write results.json and summary.csv; return the results."""
    started, clock = datetime.now(UTC).isoformat(timespec="seconds"), time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tasks = load_run_tasks(config)
    conditions, notes = plan_conditions(handle, tasks, config, llm)
    cache = StepCache(out / "cache")
    store = VectorStore(out, config, cache, progress)
    steps = StepRunner(
        handle,
        llm if any(c.vector == "llm-text-icl" for c in conditions) else None,
        config,
        cache,
        store,
        progress,
    )

    work = [(c, t, s) for c in conditions for t in tasks for s in _seeds(c, config)]
    for condition, task, seed in tqdm(
        [w for w in work if w[0].patched], desc="vectors", disable=not progress
    ):
        steps.vector_for(condition, task, seed)

    layers: dict[str, LayerChoice] = {}
    patched = [c for c in conditions if c.patched]
    if isinstance(config.layer_choice, int):
        layers = {c.name: fixed_layer(config.layer_choice, handle.num_layers) for c in patched}
    else:
        borrowed = _borrowed_layer_choices(patched, config)
        swept = [c for c in patched if c.name not in borrowed]
        sweeps: dict[str, dict[str, list[dict[str, Any]]]] = {c.name: {} for c in swept}
        sweep_seeds = config.seeds[: config.layer_sweep_seeds]
        for condition, task, seed in tqdm(
            [w for w in work if w[0] in swept and (w[2] is None or w[2] in sweep_seeds)],
            desc="layer sweeps (validation)",
            disable=not progress,
        ):
            sweeps[condition.name].setdefault(task.name, []).append(steps.sweep(condition, task, seed))
        for condition in swept:
            ignore_case = _layer_metric_ignores_case(condition, config)
            layers[condition.name] = choose_from_sweeps(sweeps[condition.name], ignore_case=ignore_case)
        for name, source in borrowed.items():
            layers[name] = LayerChoice(layers[source].chosen, [], {}, shared_from=source)

    rows: list[dict[str, Any]] = []
    examples: list[dict[str, Any]] = []
    for condition, task, seed in tqdm(work, desc="test", disable=not progress):
        layer = layers[condition.name].chosen if condition.patched else None
        test = steps.test(condition, task, seed, layer)
        rows.extend(score_rows(condition, task.name, seed, layer, test))
        if task is tasks[0] and seed in (None, config.seeds[0]):
            for index in range(min(config.examples_per_condition, len(test["generated"]))):
                examples.append(
                    {
                        "task": task.name,
                        "condition": condition.name,
                        "seed": seed,
                        "layer": layer,
                        "input": test["inputs"][index],
                        "image": test["images"][index],
                        "expected": test["expected"][index][0],
                        "generated": test["generated"][index],
                    }
                )

    cosine = _cosine_per_layer(steps, tasks, config)
    llm_layer = layers["llm-xpatch"].chosen if "llm-xpatch" in layers else None
    ensemble_metric = "prefix_ignore_case" if config.ensemble_ignore_case else config.metric
    results: dict[str, Any] = {
        "format": RESULTS_FORMAT,
        "meta": {
            "model": handle.name,
            "llm": steps.llm.name if steps.llm is not None else None,
            "taskvec": taskvec.__version__,
            "packages": _package_versions(),
            "started": started,
            "seconds": round(time.perf_counter() - clock, 2),
            "quick": config.quick,
            "config": config.as_dict(),
            "num_layers": handle.num_layers,
            "conditions": [c.name for c in conditions],
            "notes": notes,
            "steps": {"cached": cache.hits, "computed": cache.misses, "vectors_extracted": store.extracted},
        },
        "tasks": [task.name for task in tasks],
        "layers": {name: choice.as_dict() for name, choice in layers.items()},
        "results": rows,
        "tables": build_tables(
            rows,
            metric=config.metric,
            ensemble_metric=ensemble_metric,
            ensemble_examples=config.ensemble_examples,
            cosine_per_layer=cosine,
            llm_layer=llm_layer,
        ),
        "examples": examples,
        "paper_numbers": paper_numbers(),
    }
    results["tables"]["baselines"] = {
        "majority_answer": majority_answer_baseline(tasks, metric=config.metric, test_limit=config.test_limit)
    }
    write_json_atomically(out / "results.json", results)
    write_summary_csv(rows, out / "summary.csv")
    return results


def _optional(module_name: str, attribute: str) -> tuple[Any, str | None]:
    """A function of an optional module, or None and why (the modules of issue 6 may be absent)."""
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        return None, f"{module_name} cannot be imported ({error})"
    function = getattr(module, attribute, None)
    return function, None if function is not None else f"{module_name} has no {attribute}"


def run_analyses_and_report(
    handle: ModelHandle, tasks: list[Task], out_dir: Path, *, llm: ModelHandle | None, quick: bool
) -> list[str]:
    """The analyses (issue 6), then the HTML report, when those modules provide them; returns notes."""
    notes = []
    run_analyses, missing = _optional("taskvec.analysis", "run_analyses")
    if run_analyses is None:
        notes.append(f"analyses skipped: {missing}")
    else:
        run_analyses(handle, tasks, out_dir, llm=llm, quick=quick, progress=True)
    write_report, missing = _optional("taskvec.report", "write_report")
    if write_report is None:
        notes.append(f"report skipped: {missing}")
    else:
        write_report(out_dir)
    return notes
