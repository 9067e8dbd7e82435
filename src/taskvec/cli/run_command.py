"""`taskvec run`: options -> RunConfig, models loaded, experiments, tables printed, analyses.

Kept out of cli.py so the command line stays a thin parser and this logic is importable and testable;
the command line writes the report afterwards (the report is built on top of the experiments).

`--model A B C` makes independent runs, one per model, in OUT/<name of the model>: one after another,
or with --ray at the same time on one cluster, each with its own workers.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import re
import sys
import threading
import time
import traceback
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from types import ModuleType
from typing import TYPE_CHECKING

import torch

from taskvec.experiments.config import RunConfig
from taskvec.experiments.execution.run_analyses import run_analyses_of_run
from taskvec.experiments.execution.run_lock import run_directory_locks
from taskvec.experiments.execution.runner import check_layer_options, load_run_tasks, run_experiments
from taskvec.experiments.protocol.tables import format_tables
from taskvec.experiments.results.run_results import RunResults
from taskvec.models import ModelHandle, load_model
from taskvec.models.load_options import LoadOptions
from taskvec.models.loading import named_model
from taskvec.options import at_least, option, options_from_args

if TYPE_CHECKING:  # Ray is imported only when --ray is given
    from taskvec.experiments.execution.ray_workers import RayExecutor


@dataclass(frozen=True)
class RunCommandOptions:
    """The options of `taskvec run` that are not part of the `RunConfig`: models, output, runtime."""

    # One model and its LLM per instance: the command line takes several (PER_MODEL_OPTIONS) and
    # gives each model's run an instance of its own.
    model: str = option(
        "default-vlm",
        "'default-vlm', 'default' (LM), a checkpoint directory or a hub id (org/name); "
        "several: one run each, in OUT/NAME",
    )
    llm: str = option(
        "default",
        "base LM for LLM -> VLM: 'default' (the default LM under the default VLM, else none), "
        "'none', a checkpoint directory or a hub id; one for every --model or one each",
    )
    llm_revision: str | None = option(None, "hub revision of --llm: a branch, tag or commit")
    out: str = option("taskvec-run", "run directory (run again to resume)")
    threads: int | None = option(None, "torch CPU threads (default: torch's own choice)", parse=at_least(1))
    no_analyses: bool = option(False, "skip the analyses and the report")
    no_check: bool = option(
        False, "skip the engine checks before the run (`taskvec check`); the report says they did not run"
    )
    quiet: bool = option(False, "no progress bars")
    workers: int = option(
        2, "with --ray: actors per model, each holding one replica of it", parse=at_least(1)
    )
    gpus_per_worker: float = option(0.0, "with --ray: GPUs each actor reserves (a replica may span several)")


def config_from_args(args: argparse.Namespace) -> RunConfig:
    """Options given on the command line override the defaults (or the --quick preset)."""
    overrides = options_from_args(RunConfig, args)
    quick = overrides.pop("quick", False)
    return RunConfig.quick_preset(**overrides) if quick else RunConfig(**overrides)


def llm_source(model: str, llm: str, handle: ModelHandle) -> str | None:
    """--llm default: the base LM a named model registers (the default VLM's is the default LM), else
    none."""
    if llm == "none" or not handle.architecture.is_vision_language:
        return None
    if llm == "default":
        named = named_model(model)
        return named.base_lm if named is not None else None
    return llm


def llm_loading(loading: LoadOptions, llm_revision: str | None) -> LoadOptions:
    """The LLM loads with the VLM's placement options and its own revision."""
    return dataclasses.replace(loading, revision=llm_revision, processor_kwargs=None)


def resolve_llm(
    model: str, llm: str, handle: ModelHandle, loading: LoadOptions, llm_revision: str | None = None
) -> ModelHandle | None:
    source = llm_source(model, llm, handle)
    return load_model(source, llm_loading(loading, llm_revision)) if source is not None else None


def ray_executor(
    options: RunCommandOptions,
    address: str | None,
    config: RunConfig,
    loading: LoadOptions,
    llm: str | None,
    models_at_once: int = 1,
) -> RayExecutor:
    """Workers load the same sources with the same options; together (with the workers of the other
    models running at the same time) they use the local run's threads."""
    from taskvec.experiments.execution.ray_workers import RayExecutor, WorkerSpec

    threads = max(1, (options.threads or torch.get_num_threads()) // (options.workers * models_at_once))
    spec = WorkerSpec(
        options.model,
        loading,
        config,
        llm=llm,
        llm_loading=llm_loading(loading, options.llm_revision) if llm is not None else None,
        threads=threads,
    )
    return RayExecutor(
        spec,
        address=address or None,
        workers=options.workers,
        gpus_per_worker=options.gpus_per_worker,
        progress=not options.quiet,
    )


# ---- several models: --model A B C ----------------------------------------------------------------

# The options that take one value per model on the command line (the parser gives them nargs="+").
PER_MODEL_OPTIONS = ("model", "llm")

_UNSAFE_CHARACTERS = re.compile(r"[^A-Za-z0-9._-]+")


def safe_name(model: str) -> str:
    """A directory name for the model: the last component of its path or hub id (org/name -> name),
    in characters every filesystem takes, never hidden and never `..`."""
    name = _UNSAFE_CHARACTERS.sub("_", PurePosixPath(model.replace("\\", "/").rstrip("/")).name)
    return name.lstrip(".") or "model"


def run_names(pairs: Sequence[tuple[str, str]]) -> list[str]:
    """One directory name per (model, llm), unique among them.

    Names that clash (two checkpoints called `model`, or names differing only in case, which a
    case-insensitive filesystem merges) get a digest of the pair: it does not depend on the order
    of the models, so running the command again resumes every model from its own directory."""
    repeated = [model for (model, _), count in Counter(pairs).items() if count > 1]
    if repeated:
        raise ValueError(f"--model {repeated[0]} is given twice with the same --llm")
    names = [safe_name(model) for model, _ in pairs]
    counts = Counter(name.casefold() for name in names)
    return [
        f"{name}-{_digest(pair)}" if counts[name.casefold()] > 1 else name
        for name, pair in zip(names, pairs, strict=True)
    ]


def _digest(pair: tuple[str, str]) -> str:
    return hashlib.sha1("\0".join(pair).encode()).hexdigest()[:8]


def per_model_options(
    options: RunCommandOptions, models: tuple[str, ...], llms: tuple[str, ...]
) -> list[RunCommandOptions]:
    """Each model's own options: its --llm and its run directory. One model keeps --out itself, as a
    single-model command always did; several get OUT/<name> each."""
    if len(llms) not in (1, len(models)):
        raise ValueError(
            f"--llm takes one value for every model or one per --model: got {len(llms)} for {len(models)}"
        )
    pairs = list(zip(models, llms if len(llms) == len(models) else llms * len(models), strict=True))
    if len(pairs) == 1:
        model, llm = pairs[0]
        return [dataclasses.replace(options, model=model, llm=llm)]
    return [
        dataclasses.replace(options, model=model, llm=llm, out=str(Path(options.out) / name))
        for (model, llm), name in zip(pairs, run_names(pairs), strict=True)
    ]


def _given(value: str | Sequence[str]) -> tuple[str, ...]:
    """nargs="+" gives a list; the default (one value for every model) stays a string."""
    return (value,) if isinstance(value, str) else tuple(value)


@dataclass(frozen=True)
class ModelOutcome:
    """What one model of the command left: its results, or why it failed (results None)."""

    model: str
    out: Path
    results: RunResults | None = None
    error: str | None = None
    report: Path | None = None  # written by the command line, after every model ran


class _Stopped(RuntimeError):
    """A model that had not reached the cluster when the command was interrupted."""


class _LiveExecutors:
    """The Ray executors of the models running, so that an interrupted command ends their runs before
    it stops the cluster: a thread still inside Ray then would make Ray exit the process half-way
    through its shutdown, leaving some of the cluster's processes behind."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._live: list[RayExecutor] = []
        self.stopping = False

    def open(self, make: Callable[[], RayExecutor]) -> RayExecutor:
        with self._lock:  # no executor starts after stop() looked at the list
            if self.stopping:
                raise _Stopped("the command was interrupted")
            executor = make()
            self._live.append(executor)
            return executor

    def stop(self) -> None:
        """Each run fails at its next step (`RayExecutor.stop`)."""
        with self._lock:
            self.stopping = True
            live = list(self._live)
        for executor in live:
            executor.stop()


@dataclass(frozen=True)
class _Shared:
    """What every model of the command runs with."""

    config: RunConfig
    loading: LoadOptions
    address: str | None  # None: no Ray
    models_at_once: int = 1
    several: bool = False  # output of several models is labelled and printed whole
    executors: _LiveExecutors = field(default_factory=_LiveExecutors)


_PRINTING = threading.Lock()
# transformers sets torch's default dtype, process-wide, while it builds a model: two loads at once
# could leave the other's dtype as the default for good.
_LOADING = threading.Lock()


def _load(options: RunCommandOptions, shared: _Shared) -> tuple[ModelHandle, str | None, ModelHandle | None]:
    """The model, the source of its base LM (None: no LLM conditions) and the base LM."""
    loading = shared.loading
    with _LOADING:
        if shared.executors.stopping:  # interrupted while waiting for its turn: the cluster is going
            raise _Stopped("the command was interrupted")
        handle = load_model(options.model, loading)
        source = llm_source(options.model, options.llm, handle)
        llm = None if source is None else load_model(source, llm_loading(loading, options.llm_revision))
    return handle, source, llm


def run_model(options: RunCommandOptions, shared: _Shared) -> RunResults:
    """One model's run (experiments, then analyses) into options.out; prints its tables and notes."""
    handle, source, llm = _load(options, shared)
    check_layer_options(shared.config, handle)  # before any worker starts
    out = Path(options.out)
    executor = None
    if (address := shared.address) is not None:
        # Workers of the models running at once share this machine only on a local cluster.
        share = shared.models_at_once if address == "" else 1
        executor = shared.executors.open(
            lambda: ray_executor(options, address, shared.config, shared.loading, source, share)
        )
    try:
        results = run_experiments(
            handle,
            shared.config,
            out,
            llm=llm,
            progress=not options.quiet,
            executor=executor,
            check=not options.no_check,
        )
        lines = [format_tables(results), *(f"note: {note}" for note in results.meta.notes)]
        if not options.no_analyses:
            document = run_analyses_of_run(
                handle, results, out, llm=llm, progress=not options.quiet, executor=executor
            )
            lines += [f"note: analysis step {step} failed: {text}" for step, text in document.errors.items()]
    finally:
        if executor is not None:
            executor.close()
    lines.append(f"\nwrote {out / 'results.json'} and {out / 'summary.csv'} ({results.meta.seconds:.0f} s)")
    if shared.several:
        lines.insert(0, f"\n==== {options.model} -> {out}")
    # Models running at once would interleave their tables line by line.
    with _PRINTING:
        print("\n".join(lines))
    return results


def _attempt(options: RunCommandOptions, shared: _Shared) -> ModelOutcome:
    """One model of several: its failure is reported and the other models go on."""
    out = Path(options.out)
    try:
        return ModelOutcome(options.model, out, run_model(options, shared))
    except Exception as error:
        # Bad input (an unknown architecture, a missing checkpoint) reads as one line, as the command
        # line prints it for one model; anything else is a bug worth its traceback.
        bad_input = isinstance(error, (ValueError, OSError, LookupError))
        message = str(error) or type(error).__name__
        shown = message if bad_input else "".join(traceback.format_exception(error)).rstrip()
        if not shared.executors.stopping:  # interrupted: the runs were ended on purpose
            with _PRINTING:
                print(f"taskvec: error: model {options.model}: {shown}", file=sys.stderr)
        return ModelOutcome(options.model, out, error=message)


@contextlib.contextmanager
def _ray_cluster(address: str) -> Iterator[ModuleType]:
    """One cluster for every model of the command. RayExecutor shuts down only a cluster it started
    itself, so the executors, finding this one running, leave it up for the models still running."""
    from taskvec.experiments.execution.ray_workers import import_ray

    ray = import_ray()
    if ray.is_initialized():  # a caller's cluster (a test, a notebook): the caller stops it
        yield ray
        return
    ray.init(address=address or None, include_dashboard=False, log_to_driver=False)
    try:
        yield ray
    finally:
        ray.shutdown()


def models_at_once(ray: ModuleType, models: int, options: RunCommandOptions) -> int:
    """As many models at once as the cluster holds all the workers of: a model whose workers are only
    partly placed waits for the missing ones, and two such models would wait on each other forever."""
    resources = ray.cluster_resources()
    fits = int(resources.get("CPU", 0) // options.workers)
    if options.gpus_per_worker > 0:
        fits = min(fits, int(resources.get("GPU", 0) // (options.workers * options.gpus_per_worker)))
    return max(1, min(models, fits))


def _run_all(runs: list[RunCommandOptions], shared: _Shared) -> list[ModelOutcome]:
    if not shared.several:  # one model: its errors reach the command line as they always did
        return [ModelOutcome(runs[0].model, Path(runs[0].out), run_model(runs[0], shared))]
    if shared.address is None:
        return [_attempt(options, shared) for options in runs]
    return _in_threads(runs, shared)


# How long an interrupted command waits for its models' threads to leave Ray.
_STOP_SECONDS = 15.0


def _in_threads(runs: list[RunCommandOptions], shared: _Shared) -> list[ModelOutcome]:
    """Each model in a driver thread (its driver mostly waits on its workers), `models_at_once` at a
    time, in --model's order. Daemon threads: an interrupted command does not wait for a model still
    computing on the driver; each model resumes from its directory next time."""
    outcomes: dict[int, ModelOutcome] = {}
    slots = threading.BoundedSemaphore(shared.models_at_once)

    def run(index: int) -> None:
        try:
            outcomes[index] = _attempt(runs[index], shared)
        finally:
            slots.release()

    threads: list[threading.Thread] = []
    try:
        for index, options in enumerate(runs):
            slots.acquire()
            threads.append(threading.Thread(target=run, args=(index,), name=options.model, daemon=True))
            threads[-1].start()
        for thread in threads:
            thread.join()
    except BaseException:
        shared.executors.stop()
        deadline = time.monotonic() + _STOP_SECONDS
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        raise
    return [outcomes[index] for index in range(len(runs))]


def run_command(args: argparse.Namespace) -> tuple[list[ModelOutcome], bool]:
    """Run the experiments (and analyses) of every --model, print their tables; each model's outcome
    (in --model's order) and whether the reports are wanted.

    Everything that can be checked without a model is checked before the first one loads."""
    given = options_from_args(RunCommandOptions, args)
    models = _given(given.pop("model", RunCommandOptions.model))
    llms = _given(given.pop("llm", RunCommandOptions.llm))
    options = RunCommandOptions(**given)
    runs = per_model_options(options, models, llms)
    if options.threads is not None:
        torch.set_num_threads(options.threads)
    config = config_from_args(args)
    load_run_tasks(config)  # before the models load: a bad task fails in milliseconds
    loading = LoadOptions(**options_from_args(LoadOptions, args))
    address: str | None = getattr(args, "ray", None)
    several = len(runs) > 1
    # Every run directory is taken before the first model loads: a second command into one of them
    # stops at once instead of after minutes of loading.
    with run_directory_locks([Path(run.out) for run in runs]):
        if address is None:
            return _run_all(runs, _Shared(config, loading, None, several=several)), not options.no_analyses
        with _ray_cluster(address) as ray:  # a missing extra fails here, before minutes of loading
            shared = _Shared(config, loading, address, models_at_once(ray, len(runs), options), several)
            return _run_all(runs, shared), not options.no_analyses


def summary_lines(outcomes: Sequence[ModelOutcome]) -> list[str]:
    """A count of the failures, then one line per model: where its run is, or why it failed."""
    failed = sum(outcome.error is not None for outcome in outcomes)
    return [f"{len(outcomes)} models, {failed} failed:", *map(_summary_line, outcomes)]


def _summary_line(outcome: ModelOutcome) -> str:
    where = f"{outcome.model} -> {outcome.out}"
    if outcome.error is not None or outcome.results is None:
        return f"  FAILED  {where}: {outcome.error}"
    report = f", {outcome.report.name}" if outcome.report is not None else ""
    return f"  ok      {where} ({outcome.results.meta.seconds:.0f} s{report})"
