"""run_experiments: the whole reproduction into one run directory (docs/RUN_LAYOUT.md).

Order: vectors, a layer sweep on validation per patched condition, the test split at the chosen
layer, then the analyses at the run's layer with the run's vectors. Every step is cached under a
key of what it depends on, so an interrupted run picks up where it stopped.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path

import torch

from taskvec.caching import StepCache
from taskvec.checks import checks_before_run
from taskvec.evaluation import first_line
from taskvec.experiments.config import RunConfig
from taskvec.experiments.execution.executors import (
    EarlySteps,
    SequentialExecutor,
    StepExecutor,
    SweepJob,
    TestJob,
)
from taskvec.experiments.execution.function_vector_heads import head_overlaps, heads_of_run
from taskvec.experiments.execution.steps import StepRunner, TestStep
from taskvec.experiments.execution.vector_store import VectorStore, run_models
from taskvec.experiments.protocol.conditions import Condition, plan_conditions
from taskvec.experiments.protocol.paper_numbers import paper_numbers
from taskvec.experiments.protocol.recipes import LLM_TEXT_ICL, TEXT_ICL
from taskvec.experiments.protocol.scoring import AnsweredStep, score_run, validation_curves
from taskvec.experiments.results.run_results import RESULTS_FORMAT, RunMeta, RunResults, VectorCosine
from taskvec.experiments.results.step_results import SweepResult, TestAnswers
from taskvec.layer_choice import LayerChoice, candidate_layers, choose_on_validation, fixed_layer
from taskvec.models import ModelHandle
from taskvec.prompts import chat_template_of
from taskvec.tasks import Task, load_task
from taskvec.version import __version__

PACKAGES = ("torch", "transformers", "safetensors", "tokenizers", "numpy", "pillow")
Work = tuple[Condition, Task, int | None]


def load_run_tasks(config: RunConfig) -> list[Task]:
    """The configured tasks, checked to have enough validation items and a test split."""
    tasks = [load_task(name, strict=config.strict) for name in config.tasks]
    names = [task.name for task in tasks]
    if len(set(names)) != len(names):
        raise ValueError(f"tasks repeat a name: {', '.join(names)}")
    for task in tasks:
        validation, test = task.split("val"), task.split("test")
        if len(validation) <= config.prompts.shots:
            raise ValueError(
                f"task {task.name!r} has {len(validation)} validation items: {config.prompts.shots} "
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
        if config.function_vectors and len(validation) <= config.function_vector.shots:
            raise ValueError(
                f"task {task.name!r} has {len(validation)} validation items: function vectors of "
                f"{config.function_vector.shots} demonstrations plus a query need more (--fv-shots, or "
                "--no-function-vectors)"
            )
        prompts = min(len(validation), config.val_limit or len(validation))
        largest = max(config.ensemble_examples, default=0)
        if largest > prompts * config.prompts.shots:
            raise ValueError(
                f"ensemble point {largest} needs {largest // config.prompts.shots} validation prompts; "
                f"task {task.name!r} gives {prompts}"
            )
    return tasks


def check_layer_options(config: RunConfig, handle: ModelHandle) -> None:
    """The layer given (--layer), or the layer choice's candidate range, against the model's depth:
    a layer out of range is refused before any step runs, not after the steps that precede the choice."""
    if isinstance(config.layer_choice, int):
        fixed_layer(config.layer_choice, handle.num_layers)
    else:
        candidate_layers(config.first_candidate_layer, config.last_candidate_layer, handle.num_layers)


def _package_versions() -> dict[str, str]:
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def _borrowed_layer_choices(patched: list[Condition], config: RunConfig) -> dict[str, str]:
    """Ensemble-curve conditions that take their layer from the largest n of their kind (see
    `RunConfig.ensemble_layer_from`): {condition: condition whose sweep decides}."""
    if config.ensemble_layer_from == "each":
        return {}
    curves: dict[type, list[Condition]] = {}
    for condition in patched:
        if condition.examples and condition.vector is not None:
            curves.setdefault(type(condition.vector), []).append(condition)
    borrowed: dict[str, str] = {}
    for curve in curves.values():
        largest = max(curve, key=lambda c: c.examples or 0)
        borrowed.update({c.name: largest.name for c in curve if c is not largest})
    return borrowed


def _tasks_of(work: Sequence[Work]) -> list[Task]:
    """The tasks of `work`, each once, in order."""
    tasks: dict[str, Task] = {}
    for _, task, _ in work:
        tasks.setdefault(task.name, task)
    return list(tasks.values())


def _test_jobs(work: list[Work], indices: Sequence[int], layers: dict[str, LayerChoice]) -> list[TestJob]:
    """The test steps of `work[indices]`, one job per task, so patched conditions share their passes."""
    jobs: list[TestJob] = []
    for task in _tasks_of([work[index] for index in indices]):
        task_work = []
        for index in indices:
            condition, of_task, seed = work[index]
            if of_task is not task:
                continue
            if not condition.patched:
                task_work.append(TestStep(condition, seed))
                continue
            choice = layers[condition.name]
            task_work.append(TestStep(condition, seed, choice.chosen, choice.scale or 1.0))
        jobs.append((task, task_work))
    return jobs


def _answers_in_order(
    work: list[Work], indices: Sequence[int], jobs: list[TestJob], results: list[list[TestAnswers]]
) -> dict[int, TestAnswers]:
    """{index into work: its test answers}, from jobs made by `_test_jobs(work, indices, ...)`."""
    answers: dict[int, TestAnswers] = {}
    for (task, _), rows in zip(jobs, results, strict=True):
        of_task = [index for index in indices if work[index][1] is task]
        answers.update(zip(of_task, rows, strict=True))
    return answers


@dataclass(frozen=True)
class _SweepPlan:
    jobs: list[SweepJob]
    swept: list[Condition]
    borrowed: dict[str, str]  # condition -> the condition whose sweep decides its layer
    candidates: list[int]


def _plan_sweeps(
    handle: ModelHandle, conditions: list[Condition], work: list[Work], config: RunConfig
) -> _SweepPlan | None:
    """The validation sweeps the layer choice reads; None when the layer is given (--layer)."""
    if isinstance(config.layer_choice, int):
        return None
    patched = [c for c in conditions if c.patched]
    candidates = candidate_layers(
        config.first_candidate_layer, config.last_candidate_layer, handle.num_layers
    )
    borrowed = _borrowed_layer_choices(patched, config)
    swept = [c for c in patched if c.name not in borrowed]
    sweep_seeds = config.seeds[: config.layer_sweep_seeds]
    sweep_work = [w for w in work if w[0] in swept and (w[2] is None or w[2] in sweep_seeds)]
    jobs: list[SweepJob] = [
        (task, [(condition, seed) for condition, of_task, seed in sweep_work if of_task is task])
        for task in _tasks_of(sweep_work)
    ]
    return _SweepPlan(jobs, swept, borrowed, candidates)


def _choose_layers(
    handle: ModelHandle,
    conditions: list[Condition],
    config: RunConfig,
    plan: _SweepPlan | None,
    results: list[list[SweepResult]],
) -> dict[str, LayerChoice]:
    if plan is None:
        assert isinstance(config.layer_choice, int)
        fixed = fixed_layer(config.layer_choice, handle.num_layers)
        # A scaled vector at a given layer is patched at the first of its scales.
        return {
            c.name: dataclasses.replace(fixed, scale=c.vector.scales(config)[0]) if c.vector.scaled else fixed
            for c in conditions
            if c.vector is not None
        }
    sweeps: dict[str, dict[str, list[SweepResult]]] = {c.name: {} for c in plan.swept}
    for (task, task_work), rows in zip(plan.jobs, results, strict=True):
        for (condition, _), result in zip(task_work, rows, strict=True):
            sweeps[condition.name].setdefault(task.name, []).append(result)
    layers: dict[str, LayerChoice] = {}
    for condition in plan.swept:
        assert condition.vector is not None  # only patched conditions are swept
        ignore_case = condition.ignores_case and config.ensemble_ignore_case
        ignore_case = ignore_case or config.metric == "prefix_ignore_case"
        curves, unpatched = validation_curves(sweeps[condition.name], ignore_case=ignore_case)
        layers[condition.name] = choose_on_validation(
            curves, plan.candidates, unpatched=unpatched, scaled=condition.vector.scaled
        )
    for name, source in plan.borrowed.items():
        chosen = layers[source]
        layers[name] = LayerChoice(
            chosen.chosen,
            [],
            {},
            chosen.candidates,
            shared_from=source,
            unpatched_validation=chosen.unpatched_validation,
        )
    return layers


def _vector_cosine(
    steps: StepRunner, tasks: list[Task], config: RunConfig, layer: int | None
) -> VectorCosine | None:
    """Cosine per layer of the base LM's and the model's text-ICL vectors, mean over tasks and seeds."""
    if steps.llm is None:
        return None
    curves = []
    for task in tasks:
        for seed in config.seeds:
            vlm, _ = steps.store.get(TEXT_ICL, task, seed)
            llm, _ = steps.store.get(LLM_TEXT_ICL, task, seed)
            curves.append(torch.nn.functional.cosine_similarity(vlm.vectors, llm.vectors, dim=-1))
    per_layer = [round(float(v), 4) for v in torch.stack(curves).mean(dim=0)]
    return VectorCosine(per_layer, layer, per_layer[layer] if layer is not None else None)


def _analysis_layer(
    conditions: list[Condition], layers: dict[str, LayerChoice], num_layers: int
) -> tuple[int, str]:
    ranked = sorted(
        (c for c in conditions if c.analysis_layer_rank is not None and c.name in layers),
        key=lambda c: c.analysis_layer_rank or 0,
    )
    for condition in ranked:
        layer = layers[condition.name].chosen
        if layer is not None:
            return layer, f"the layer chosen for {condition.name}"
    if ranked:
        return num_layers // 2, "the middle layer (no layer helped any ranked condition)"
    return num_layers // 2, "the middle layer (the run patched nothing)"


def _answered(
    steps: StepRunner,
    condition: Condition,
    task: Task,
    seed: int | None,
    choice: LayerChoice | None,
    answers: TestAnswers,
) -> AnsweredStep:
    """A test step's answers with where it was patched and the patched vector's own answer."""
    layer = choice.chosen if choice is not None else None
    if layer is None:
        return AnsweredStep(condition, task.name, seed, None, None, answers)
    token = steps.vector_token(condition, task, seed, layer)
    # Decoded as the answers are (special tokens dropped, first line).
    text = (
        None
        if token is None
        else first_line(steps.handle.tokenizer.decode([token], skip_special_tokens=True))
    )
    return AnsweredStep(
        condition, task.name, seed, layer, choice.scale if choice else None, answers, token, text
    )


def run_experiments(
    handle: ModelHandle,
    config: RunConfig,
    out_dir: str | Path,
    *,
    llm: ModelHandle | None = None,
    progress: bool = True,
    executor: StepExecutor | None = None,
    check: bool = True,
    conditions: Sequence[Condition] | None = None,
) -> RunResults:
    """Run every condition the model supports; write results.json and summary.csv; return the results.

    `conditions`: the run's list (default: `paper_conditions(config)`, the paper's and the ensemble
    curve of `config`); a condition holds the recipe of the vector it patches. `executor` runs the
    expensive steps (default: here, one after another; see executors.py).
    `check`: the engine's invariants are measured on every model of the run before any step, and a
    failing one stops the run (taskvec.checks); False records that they were not run."""
    executor = executor if executor is not None else SequentialExecutor()
    started, clock = datetime.now(UTC).isoformat(timespec="seconds"), time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tasks = load_run_tasks(config)
    check_layer_options(config, handle)
    conditions, notes = plan_conditions(handle, tasks, config, llm, conditions)
    uses_llm = any(c.model_role == "llm" for c in conditions)
    if config.prompts.template == "chat":  # before any step, not at the first prompt of the model lacking one
        for model in (handle, llm if uses_llm else None):
            if model is not None:
                chat_template_of(model)
    checked = [model for model in (handle, llm if uses_llm else None) if model is not None]
    engine_checks = checks_before_run(checked, config.prompts.template, enabled=check)
    cache = StepCache(out / "cache")
    models = run_models(handle, llm if uses_llm else None)
    store = VectorStore(out, config, cache, models, progress)
    steps = StepRunner(handle, llm if uses_llm else None, config, cache, store, progress)

    work: list[Work] = [(c, t, s) for c in conditions for t in tasks for s in c.seeds(config)]
    unpatched = [index for index, (condition, _, _) in enumerate(work) if not condition.patched]
    patched = [index for index, (condition, _, _) in enumerate(work) if condition.patched]
    plan = _plan_sweeps(handle, conditions, work, config)
    early_tests = _test_jobs(work, unpatched, {})
    sweep_results, early_answers = executor.before_layer_choice(
        steps, EarlySteps([work[index] for index in patched], plan.jobs if plan else [], early_tests)
    )
    layers = _choose_layers(handle, conditions, config, plan, sweep_results)
    late_tests = _test_jobs(work, patched, layers)
    answers = _answers_in_order(work, unpatched, early_tests, early_answers)
    answers.update(_answers_in_order(work, patched, late_tests, executor.tests(steps, late_tests)))
    answered = [
        _answered(steps, condition, task, seed, layers.get(condition.name), answers[index])
        for index, (condition, task, seed) in enumerate(work)
    ]
    scores = score_run(conditions, answered, tasks, config)
    llm_condition = next((c for c in conditions if c.model_role == "llm"), None)
    analysis_layer, analysis_source = _analysis_layer(conditions, layers, handle.num_layers)
    heads = heads_of_run(steps, conditions, tasks, config.seeds[: config.fv_seeds])
    results = RunResults(
        format=RESULTS_FORMAT,
        meta=RunMeta(
            model=handle.name,
            llm=steps.llm.name if steps.llm is not None else None,
            model_fingerprint=store.fingerprint(handle),
            taskvec=__version__,
            packages=_package_versions(),
            started=started,
            seconds=round(time.perf_counter() - clock, 2),
            quick=config.quick,
            num_layers=handle.num_layers,
            conditions=[c.name for c in conditions],
            notes=notes,
            steps={"cached": cache.hits, "computed": cache.misses, "vectors_extracted": store.extracted},
            model_settings=handle.settings_record(),
            llm_settings=steps.llm.settings_record() if steps.llm is not None else None,
        ),
        config=config,
        tasks=[task.name for task in tasks],
        layers=layers,
        results=scores.rows,
        summaries=scores.summaries,
        tables=scores.tables,
        floors=scores.floors,
        examples=scores.examples,
        analysis_layer=analysis_layer,
        analysis_layer_source=analysis_source,
        vector_cosine=_vector_cosine(
            steps, tasks, config, layers[llm_condition.name].chosen if llm_condition else None
        ),
        paper_numbers=paper_numbers(),
        function_vectors=heads,
        head_overlaps=head_overlaps(heads),
        engine_checks=engine_checks,
    )
    results.write(out)
    return results
