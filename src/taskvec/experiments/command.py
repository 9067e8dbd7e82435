"""`taskvec run`: options -> RunConfig, models loaded, experiments, tables printed, analyses.

Kept out of cli.py so the command line stays a thin parser and this logic is importable and testable;
the command line writes the report afterwards (the report is built on top of the experiments).
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from taskvec.experiments.config import RunConfig
from taskvec.experiments.results import RunResults
from taskvec.experiments.runner import load_run_tasks, run_analyses_of_run, run_experiments
from taskvec.experiments.tables import format_tables
from taskvec.models import ModelHandle, load_model
from taskvec.models.load_options import LoadOptions
from taskvec.models.loading import named_model
from taskvec.options import option, options_from_args

if TYPE_CHECKING:  # Ray is imported only when --ray is given
    from taskvec.experiments.ray_workers import RayExecutor


@dataclass(frozen=True)
class RunCommandOptions:
    """The options of `taskvec run` that are not part of the `RunConfig`: models, output, runtime."""

    model: str = option(
        "default-vlm", "'default-vlm', 'default' (LM), a checkpoint directory or a hub id (org/name)"
    )
    llm: str = option(
        "default",
        "base LM for LLM -> VLM: 'default' (the default LM under the default VLM, else none), "
        "'none', a checkpoint directory or a hub id",
    )
    llm_revision: str | None = option(None, "hub revision of --llm: a branch, tag or commit")
    out: str = option("taskvec-run", "run directory (run again to resume)")
    threads: int | None = option(None, "torch CPU threads (default: torch's own choice)")
    no_analyses: bool = option(False, "skip the analyses and the report")
    quiet: bool = option(False, "no progress bars")
    workers: int = option(2, "with --ray: actors, each holding one model replica")
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
    options: RunCommandOptions, address: str | None, config: RunConfig, loading: LoadOptions, llm: str | None
) -> RayExecutor:
    """Workers load the same sources with the same options; together they use the local run's threads."""
    from taskvec.experiments.ray_workers import RayExecutor, WorkerSpec

    threads = max(1, (options.threads or torch.get_num_threads()) // options.workers)
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


def run_command(args: argparse.Namespace) -> tuple[RunResults, Path, bool]:
    """Run the experiments (and analyses), print the tables; the results, run directory and whether
    the report is wanted."""
    options = RunCommandOptions(**options_from_args(RunCommandOptions, args))
    if options.threads is not None:
        torch.set_num_threads(options.threads)
    config = config_from_args(args)
    load_run_tasks(config)  # before the models load: a bad task fails in milliseconds
    address: str | None = getattr(args, "ray", None)
    if address is not None:
        from taskvec.experiments.ray_workers import import_ray

        import_ray()  # a missing extra fails before minutes of loading
    loading = LoadOptions(**options_from_args(LoadOptions, args))
    handle = load_model(options.model, loading)
    source = llm_source(options.model, options.llm, handle)
    llm = load_model(source, llm_loading(loading, options.llm_revision)) if source is not None else None
    out = Path(options.out)
    executor = ray_executor(options, address, config, loading, source) if address is not None else None
    try:
        results = run_experiments(handle, config, out, llm=llm, progress=not options.quiet, executor=executor)
    finally:
        if executor is not None:
            executor.close()
    print(format_tables(results))
    for note in results.meta.notes:
        print(f"note: {note}")
    if not options.no_analyses:
        document = run_analyses_of_run(handle, results, out, llm=llm, progress=not options.quiet)
        for step, message in document.errors.items():
            print(f"note: analysis step {step} failed: {message}")
    print(f"\nwrote {out / 'results.json'} and {out / 'summary.csv'} ({results.meta.seconds:.0f} s)")
    return results, out, not options.no_analyses
