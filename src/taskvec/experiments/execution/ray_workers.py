"""The run's steps on Ray: actors that each hold one model replica, fed by the driver.

Only this module imports Ray, and only when `taskvec run --ray` asks for it. A worker never sees
the run directory: the driver sends each step its task and the vectors it patches, the worker
returns the step's JSON (or the extracted vector), and the driver writes its own cache and vector
store exactly as a sequential run would. A step already in the driver's cache is never submitted,
so a run interrupted anywhere resumes from the cache, on Ray or in one process. The images of a
task file travel too (once per task, through Ray's object store): a worker on another machine
cannot read the driver's files; built-in tasks' images come with the package every worker has.
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import tempfile
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from types import ModuleType
from typing import Any, TypeVar

import torch

from taskvec.analysis import PAPER_ANALYSES, Analysis, VectorKey, run_analyses
from taskvec.analysis.context import CACHE_KIND
from taskvec.analysis.settings import AnalysisSettings
from taskvec.caching import StepCache, digest
from taskvec.experiments.config import RunConfig
from taskvec.experiments.execution.executors import (
    AnalysisJob,
    EarlyResults,
    EarlySteps,
    SweepJob,
    TestJob,
    VectorJob,
)
from taskvec.experiments.execution.steps import StepRunner, TestStep, VectorWork
from taskvec.experiments.execution.vector_store import VectorStore, run_models
from taskvec.experiments.protocol.recipes import MadeVector, VectorRecipe
from taskvec.experiments.results.step_results import SweepResult, TestAnswers
from taskvec.models import load_model
from taskvec.models.load_options import LoadOptions
from taskvec.progress import progress_counter
from taskvec.tasks import Task

INSTALL = 'pip install -e ".[ray]"'
# A step's record as a worker returns it.
R = TypeVar("R", SweepResult, TestAnswers)


class RayMissingError(LookupError):
    """Ray is an optional extra; a LookupError so the command line prints it as one line."""


class StepsInterrupted(RuntimeError):
    """Raised by the `stop_after` test hook: the run stops as a killed driver would."""


def import_ray() -> ModuleType:
    try:
        import ray
    except ImportError as error:
        raise RayMissingError(f"--ray needs Ray, an optional extra: {INSTALL}") from error
    return ray


@dataclass(frozen=True)
class WorkerSpec:
    """What a worker needs to load its replica: sources and options, never a loaded handle."""

    model: str
    loading: LoadOptions
    config: RunConfig
    llm: str | None = None
    llm_loading: LoadOptions | None = None
    threads: int = 1
    # Test hook: the first worker to create this file exits at once, as a lost node would.
    exit_once: str | None = None


# A task file's images by the driver's path: what a worker writes to its own disk.
ImageFiles = dict[str, bytes]
# Finished analysis steps of a StepCache: (step, key, stored JSON).
AnalysisSteps = list[tuple[str, str, Any]]
# The analyses worth a worker of their own, each over some of the run's tasks: the lens of one
# task, the 2-D map of all, the conflict of one pair. The rest reads their results or is cheap.
AnalysisPart = tuple[str, list[Task]]


def analysis_steps(cache: StepCache) -> AnalysisSteps:
    """Every finished analysis step of `cache` (the step's name may hold '/': lens/<task>)."""
    root = cache.root / CACHE_KIND
    steps = []
    for path in sorted(root.glob("**/*.json")):
        stored = cache.load(CACHE_KIND, str(path.parent.relative_to(root)), path.stem)
        if stored is not None:
            steps.append((str(path.parent.relative_to(root)), path.stem, stored))
    return steps


def analysis_parts(
    tasks: Sequence[Task], analyses: Sequence[Analysis[Any]] = PAPER_ANALYSES
) -> list[AnalysisPart]:
    """One worker step per group of tasks each analysis splits into (`Analysis.worker_steps`)."""
    return [
        (analysis.name, group)
        for analysis in analyses
        if analysis.worker_steps is not None
        for group in analysis.worker_steps(tasks)
    ]


def image_files(task: Task) -> ImageFiles:
    """The task's image files, to send to workers; none for a built-in task (package data)."""
    if task.source == "builtin":
        return {}
    return {str(path): path.read_bytes() for item in task.items for path in item.images.values()}


def with_local_images(task: Task, files: ImageFiles, directory: Path) -> tuple[Task, dict[str, str]]:
    """The task with its images written under `directory`, and each local path's driver path (what
    the results name, so they do not depend on where a step ran)."""
    directory.mkdir(parents=True, exist_ok=True)
    local: dict[str, Path] = {}
    for original, data in files.items():
        target = directory / f"{digest(original)}{Path(original).suffix}"
        if not target.is_file():
            target.write_bytes(data)
        local[original] = target
    items = tuple(
        replace(item, images={style: local.get(str(path), path) for style, path in item.images.items()})
        for item in task.items
    )
    return replace(task, items=items), {str(path): original for original, path in local.items()}


class StepWorker:
    """One model replica (and its base LM) and a private cache; made a Ray actor by RayExecutor."""

    def __init__(self, spec: WorkerSpec) -> None:
        if spec.loading.device_map is None and not torch.cuda.is_available():
            # Workers times threads equals the local run's threads: overhead is compared fairly.
            torch.set_num_threads(spec.threads)
        handle = load_model(spec.model, spec.loading)
        llm = load_model(spec.llm, spec.llm_loading or spec.loading) if spec.llm is not None else None
        self.directory = directory = Path(tempfile.mkdtemp(prefix="taskvec-worker-"))
        cache = StepCache(directory / "cache")
        self.store = VectorStore(directory, spec.config, cache, run_models(handle, llm), progress=False)
        self.steps = StepRunner(handle, llm, spec.config, cache, self.store, progress=False)
        self.exit_once = spec.exit_once
        self._tasks: dict[str, tuple[Task, dict[str, str]]] = {}

    def _local(self, task: Task, files: ImageFiles | None) -> Task:
        if not files:
            return task
        if task.name not in self._tasks:
            self._tasks[task.name] = with_local_images(task, files, self.directory / "images" / task.name)
        return self._tasks[task.name][0]

    def _maybe_exit(self) -> None:
        if self.exit_once is None:
            return
        try:
            os.close(os.open(self.exit_once, os.O_CREAT | os.O_EXCL))
        except FileExistsError:
            return
        os._exit(1)

    def cleanup(self) -> None:
        """The private cache goes with the worker: the driver holds every result."""
        shutil.rmtree(self.directory, ignore_errors=True)

    def vector(self, task: Task, files: ImageFiles | None, recipe: VectorRecipe, seed: int) -> MadeVector:
        self._maybe_exit()
        return self.store.made(recipe, self._local(task, files), seed)

    def analyses(
        self,
        part: AnalysisPart,
        files: dict[str, Any],
        layer: int,
        vectors: dict[VectorKey, torch.Tensor],
        settings: AnalysisSettings,
        known: AnalysisSteps,
        analyses: Sequence[Analysis[Any]] = PAPER_ANALYSES,
    ) -> AnalysisSteps:
        """One part of the analyses in a cache of its own, seeded with the driver's finished steps
        (so a resumed run recomputes nothing); returns the steps it added."""
        self._maybe_exit()
        name, tasks = part
        # Ray resolves references given as arguments, not those inside a dict.
        ray = import_ray()
        images = {task: None if ref is None else ray.get(ref) for task, ref in files.items()}
        cache = StepCache(Path(tempfile.mkdtemp(dir=self.directory, prefix="analysis-")))
        for step, key, stored in known:
            cache.store(CACHE_KIND, step, key, stored)
        before = {(step, key) for step, key, _ in known}
        run_analyses(
            self.steps.handle,
            [self._local(task, images.get(task.name)) for task in tasks],
            layer=layer,
            vectors=vectors,
            cache=cache,
            llm=self.steps.llm,
            settings=settings,
            progress=False,
            only=(name,),
            analyses=analyses,
        )
        added = [step for step in analysis_steps(cache) if (step[0], step[1]) not in before]
        shutil.rmtree(cache.root, ignore_errors=True)
        return added

    def sweeps(
        self,
        task: Task,
        files: ImageFiles | None,
        work: list[tuple[Any, int | None]],
        vectors: dict[VectorWork, tuple[torch.Tensor, str]],
    ) -> list[SweepResult]:
        self._maybe_exit()
        self.steps.supplied = vectors
        return self.steps.sweeps(self._local(task, files), work)

    def tests(
        self,
        task: Task,
        files: ImageFiles | None,
        work: list[TestStep],
        vectors: dict[VectorWork, tuple[torch.Tensor, str]],
    ) -> list[TestAnswers]:
        self._maybe_exit()
        self.steps.supplied = vectors
        results = self.steps.tests(self._local(task, files), work)
        driver_paths = self._tasks[task.name][1] if files else {}
        for result in results:
            result.images = [driver_paths.get(path, path) if path else path for path in result.images]
        return results


Finish = Callable[[Any], "list[_Call] | None"]


@dataclass
class _Call:
    """One submitted step: the actor method, its arguments, and what the driver does with its result
    (which may be to return the steps that result made ready)."""

    method: str
    args: tuple[Any, ...]
    finish: Finish
    size: int = 1  # steps in the call: the largest go first, so none is left to run alone at the end
    rank: int = 2  # vectors (0) before sweeps (1) before the rest: the layer choice waits on sweeps
    task: str = ""

    @property
    def order(self) -> tuple[int, int]:
        return self.rank, -self.size


# The steps of one job (one task) that can share a pass: (job, indices into the job's work).
Group = tuple[int, list[int]]


def _split(groups: list[Group], workers: int) -> list[Group]:
    """Halve the phase's largest group until every worker has one: a smaller group costs one more
    pass over the prompts, an idle worker costs the whole group's time."""
    groups = [(job, list(indices)) for job, indices in groups]
    while len(groups) < workers and max((len(g[1]) for g in groups), default=0) > 1:
        largest = max(groups, key=lambda group: len(group[1]))
        groups.remove(largest)
        job, indices = largest
        half = math.ceil(len(indices) / 2)
        groups += [(job, indices[:half]), (job, indices[half:])]
    return groups


class RayExecutor:
    """Each phase's missing steps spread over `workers` actors; results written by the driver."""

    def __init__(
        self,
        spec: WorkerSpec,
        *,
        address: str | None = None,
        workers: int = 2,
        gpus_per_worker: float = 0.0,
        progress: bool = True,
        stop_after: int | None = None,
        max_deaths: int | None = None,
    ) -> None:
        if workers < 1:
            raise ValueError(f"--workers must be at least 1, got {workers}")
        self.ray = import_ray()
        self.owns_cluster = not self.ray.is_initialized()
        if self.owns_cluster:
            self.ray.init(address=address, include_dashboard=False, log_to_driver=False)
        self.spec = spec
        self.gpus = gpus_per_worker
        self.stop_after = stop_after
        self.max_deaths = max_deaths if max_deaths is not None else 2 * workers
        self.deaths = 0
        self.completed = 0
        self.counts: dict[str, int] = {}
        # ("submit" | "finish", method, task) in the order the driver saw them.
        self.history: list[tuple[str, str, str]] = []
        self._images: dict[str, Any] = {}
        self.actors: list[tuple[str, Any]] = [self._start() for _ in range(workers)]
        self.bar = progress_counter("steps on Ray", enabled=progress, unit="steps")

    def _start(self) -> tuple[str, Any]:
        # Retries are ours (a dead actor's step goes to another actor), so Ray restarts nothing.
        actor_class = self.ray.remote(num_cpus=1, num_gpus=self.gpus, max_restarts=0)(StepWorker)
        name = f"w{len(self.counts)}"
        self.counts[name] = 0
        return name, actor_class.remote(self.spec)

    def stop(self) -> None:
        """End the run from another thread: its workers die and none is replaced, so its current
        step fails at once (a rerun resumes from the cache)."""
        self.max_deaths = 0
        for _, actor in list(self.actors):
            self.ray.kill(actor)

    def close(self) -> None:
        self.bar.close()
        # A dead worker, or one still inside an abandoned step, leaves its temporary directory behind.
        with contextlib.suppress(self.ray.exceptions.RayError, TimeoutError):
            self.ray.get([actor.cleanup.remote() for _, actor in self.actors], timeout=5)
        for _, actor in self.actors:
            self.ray.kill(actor)
        self.actors = []
        if self.owns_cluster:
            self.ray.shutdown()

    def _files(self, task: Task) -> Any:
        """A reference to the task's image files in the object store (put once per task), or None."""
        if task.name not in self._images:
            files = image_files(task)
            self._images[task.name] = self.ray.put(files) if files else None
        return self._images[task.name]

    # ---- dispatch ------------------------------------------------------------------------------
    def _run(self, calls: Sequence[_Call]) -> None:
        """Every call on some actor; a call's `finish` may return further calls (steps whose inputs
        it completed), which join the queue. Vectors go first, then sweeps, then the rest; within
        a rank the largest first, so none is left to run alone at the end."""
        ray = self.ray
        queue = list(calls)
        pending = sorted(range(len(queue)), key=lambda index: queue[index].order)
        idle = deque(self.actors)
        running: dict[Any, tuple[int, tuple[str, Any]]] = {}
        self.bar.total = (self.bar.total or 0) + len(queue)
        self.bar.refresh()
        while pending or running:
            while pending and idle:
                index, actor = pending.pop(0), idle.popleft()
                call = queue[index]
                running[getattr(actor[1], call.method).remote(*call.args)] = (index, actor)
                self.history.append(("submit", call.method, call.task))
            (ref,), _ = ray.wait(list(running), num_returns=1)
            index, actor = running.pop(ref)
            try:
                result = ray.get(ref)
            except ray.exceptions.RayActorError as error:
                self.deaths += 1
                if self.deaths > self.max_deaths:
                    raise RuntimeError(f"{self.deaths} Ray workers died; the last: {error}") from error
                self.actors.remove(actor)
                replacement = self._start()
                self.actors.append(replacement)
                idle.append(replacement)
                pending.insert(0, index)
                continue
            self.history.append(("finish", queue[index].method, queue[index].task))
            follow = queue[index].finish(result) or []
            if follow:
                queue += follow
                pending = sorted(
                    [*pending, *range(len(queue) - len(follow), len(queue))], key=lambda i: queue[i].order
                )
                self.bar.total += len(follow)
            idle.append(actor)
            self.counts[actor[0]] += 1
            self.completed += 1
            self.bar.set_postfix(self.counts, refresh=False)
            self.bar.update()
            if self.stop_after is not None and self.completed >= self.stop_after:
                raise StepsInterrupted(f"stopped after {self.completed} steps (stop_after)")

    # ---- planning ------------------------------------------------------------------------------
    def _vector_calls(self, steps: StepRunner, jobs: Sequence[VectorJob]) -> list[_Call]:
        """One call per missing stored vector, each kept in the driver's store when it returns."""
        wanted: dict[tuple[VectorRecipe, str, int], tuple[Task, VectorRecipe, int]] = {}
        for condition, task, seed in jobs:
            if condition.vector is None:
                continue
            for recipe, recipe_seed in steps.store.missing(condition.vector, task, seed or 0):
                wanted.setdefault((recipe, task.name, recipe_seed), (task, recipe, recipe_seed))
        # Task by task: the first tasks' sweeps can start while the last task's vectors run.
        order = {name: rank for rank, name in enumerate(dict.fromkeys(task.name for _, task, _ in jobs))}
        ranked = sorted(wanted.values(), key=lambda entry: order[entry[0].name])

        def keep(task: Task, recipe: VectorRecipe, seed: int) -> Finish:
            def finish(result: MadeVector) -> None:
                steps.store.add(recipe, task, seed, result)

            return finish

        return [
            _Call(
                "vector",
                (task, self._files(task), recipe, seed),
                keep(task, recipe, seed),
                rank=0,
                task=task.name,
            )
            for task, recipe, seed in ranked
        ]

    def _step_calls(
        self,
        steps: StepRunner,
        kind: str,
        jobs: Sequence[tuple[Task, Sequence[Any]]],
        results: list[list[Any]],
        workers: int,
    ) -> list[_Call]:
        """Calls for the uncached sweeps ("sweeps") or test steps ("test") of `jobs`, whose rows of
        `results` are filled from the cache now and by the calls as they return. Steps asking the
        same prompts share a call (and its pass), split further until `workers` actors have one."""
        groups: dict[tuple[int, str], list[int]] = {}
        for job, (task, work) in enumerate(jobs):
            if kind == "sweeps":
                results[job] = [steps.cached_sweep(condition, task, seed) for condition, seed in work]
            else:
                results[job] = [steps.cached_test(step, task) for step in work]
            for index, step in enumerate(work):
                if results[job][index] is not None:
                    continue
                condition, seed = step[0], step[1]
                patched = condition.vector is not None and (kind == "sweeps" or step[2] is not None)
                # As StepRunner.tests: an unpatched step shares its pass with steps of its own key.
                shared = (
                    steps.prompt_group(condition, task, seed)
                    if patched
                    else f"unpatched {steps.test_key(step, task)[1]}"
                )
                groups.setdefault((job, shared), []).append(index)
        calls = []
        for job, group in _split([(job, group) for (job, _), group in groups.items()], workers):
            task, work = jobs[job]
            chunk = [work[index] for index in group]
            vectors = {(c.name, task.name, s): _vector(steps, c, task, s) for c, s, *_ in chunk if c.vector}
            if kind == "sweeps":
                keys = [steps.sweep_key(c, task, s)[1] for c, s in chunk]
            else:
                keys = [steps.test_key(step, task)[1] for step in chunk]
            keep = _keeper(steps, kind, task, group, keys, results[job])
            method, rank = ("sweeps", 1) if kind == "sweeps" else ("tests", 2)
            args = (task, self._files(task), chunk, vectors)
            calls.append(_Call(method, args, keep, len(chunk), rank, task.name))
        return calls

    # ---- phases --------------------------------------------------------------------------------
    def vectors(self, steps: StepRunner, jobs: Sequence[VectorJob]) -> None:
        self._run(self._vector_calls(steps, jobs))
        for condition, task, seed in jobs:  # read back from the store, as a rerun reads them
            steps.vector_for(condition, task, seed)

    def sweeps(self, steps: StepRunner, jobs: Sequence[SweepJob]) -> list[list[SweepResult]]:
        results: list[list[SweepResult | None]] = [[] for _ in jobs]
        self._run(self._step_calls(steps, "sweeps", jobs, results, len(self.actors)))
        return [_complete(rows) for rows in results]

    def tests(self, steps: StepRunner, jobs: Sequence[TestJob]) -> list[list[TestAnswers]]:
        results: list[list[TestAnswers | None]] = [[] for _ in jobs]
        self._run(self._step_calls(steps, "test", jobs, results, len(self.actors)))
        return [_complete(rows) for rows in results]

    def before_layer_choice(self, steps: StepRunner, early: EarlySteps) -> EarlyResults:
        """The vectors, each task's sweeps as soon as that task's vectors are in, and the tests that
        patch nothing alongside: no worker waits for a phase to end before the layer choice."""
        sweeps: list[list[SweepResult | None]] = [[] for _ in early.sweeps]
        tests: list[list[TestAnswers | None]] = [[] for _ in early.tests]
        vector_calls = self._vector_calls(steps, early.vectors)
        outstanding: dict[str, int] = {}
        for call in vector_calls:
            outstanding[call.task] = outstanding.get(call.task, 0) + 1

        def sweeps_of(task: str, workers: int) -> list[_Call]:
            indices = [i for i, (of_task, _) in enumerate(early.sweeps) if of_task.name == task]
            jobs = [early.sweeps[i] for i in indices]
            rows: list[list[SweepResult | None]] = [[] for _ in jobs]
            calls = self._step_calls(steps, "sweeps", jobs, rows, workers)
            for index, row in zip(indices, rows, strict=True):
                sweeps[index] = row  # the same list the calls fill
            return calls

        def unblock(call: _Call) -> None:
            finish = call.finish

            def then(result: Any) -> list[_Call]:
                finish(result)
                outstanding[call.task] -= 1
                if outstanding[call.task]:
                    return []
                # Splitting a task's sweeps costs passes: only the last task's fill idle workers.
                last = not any(outstanding.values())
                return sweeps_of(call.task, len(self.actors) if last else 1)

            call.finish = then

        for call in vector_calls:
            unblock(call)
        ready = {task.name for task, _ in early.sweeps} - set(outstanding)
        calls = [*vector_calls, *(c for task in sorted(ready) for c in sweeps_of(task, len(self.actors)))]
        calls += self._step_calls(steps, "test", early.tests, tests, len(self.actors))
        self._run(calls)
        for condition, task, seed in early.vectors:
            steps.vector_for(condition, task, seed)
        return [_complete(rows) for rows in sweeps], [_complete(rows) for rows in tests]

    def analyses(self, job: AnalysisJob) -> None:
        """The lens of each task, the 2-D map and the conflict of each task pair, one worker step each,
        into the driver's cache; the driver's own pass then reads them and does the cheap rest."""
        known = self.ray.put(analysis_steps(job.cache))
        parts = analysis_parts(job.tasks, job.analyses)
        self._run([_analysis_call(self, job, part, known) for part in parts])


def _analysis_call(
    executor: RayExecutor, job: AnalysisJob, part: AnalysisPart, known: AnalysisSteps
) -> _Call:
    def keep(added: AnalysisSteps) -> None:
        for step, key, stored in added:
            job.cache.store(CACHE_KIND, step, key, stored)

    files = {task.name: executor._files(task) for task in part[1]}
    vectors = {key: vector.cpu() for key, vector in job.vectors.items()}
    args = (part, files, job.layer, vectors, job.settings, known, list(job.analyses))
    return _Call("analyses", args, keep, len(part[1]))


def _vector(steps: StepRunner, condition: Any, task: Task, seed: int | None) -> tuple[torch.Tensor, str]:
    vector = steps.vector_for(condition, task, seed)
    if vector is None:
        raise ValueError(f"condition {condition.name} patches nothing")
    return vector[0].cpu(), vector[1]


def _keeper(
    steps: StepRunner,
    kind: str,
    task: Task,
    group: list[int],
    keys: list[str],
    rows: list[Any],
) -> Callable[[Any], None]:
    """Write a returned chunk into the driver's cache and its rows, as StepRunner would have."""

    def keep(returned: list[SweepResult] | list[TestAnswers]) -> None:
        for index, key, result in zip(group, keys, returned, strict=True):
            steps.cache.store_typed(kind, task.name, key, result)
            rows[index] = result

    return keep


def _complete(rows: list[R | None]) -> list[R]:
    missing = [index for index, row in enumerate(rows) if row is None]
    if missing:
        raise RuntimeError(f"steps {missing} came back from no worker")
    return [row for row in rows if row is not None]
