"""`taskvec run`: options -> RunConfig, models loaded, experiments, tables printed, analyses.

Kept out of cli.py so the command line stays a thin parser and this logic is importable and testable;
the command line writes the report afterwards (the report is built on top of the experiments).
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch

from taskvec.experiments.config import RunConfig
from taskvec.experiments.results import RunResults
from taskvec.experiments.runner import load_run_tasks, run_analyses_of_run, run_experiments
from taskvec.experiments.tables import format_tables
from taskvec.models import ModelHandle, load_model
from taskvec.models.load_options import LoadOptions
from taskvec.models.loading import named_model
from taskvec.options import option, options_from_args


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


def config_from_args(args: argparse.Namespace) -> RunConfig:
    """Options given on the command line override the defaults (or the --quick preset)."""
    overrides = options_from_args(RunConfig, args)
    quick = overrides.pop("quick", False)
    return RunConfig.quick_preset(**overrides) if quick else RunConfig(**overrides)


def resolve_llm(
    model: str, llm: str, handle: ModelHandle, loading: LoadOptions, llm_revision: str | None = None
) -> ModelHandle | None:
    """--llm default: the base LM a named model registers (the default VLM's is the default LM), else
    none. The LLM loads with the VLM's placement options and its own revision."""
    if llm == "none" or not handle.architecture.is_vision_language:
        return None
    llm_loading = dataclasses.replace(loading, revision=llm_revision, processor_kwargs=None)
    if llm == "default":
        named = named_model(model)
        base = named.base_lm if named is not None else None
        return load_model(base, llm_loading) if base is not None else None
    return load_model(llm, llm_loading)


def run_command(args: argparse.Namespace) -> tuple[RunResults, Path, bool]:
    """Run the experiments (and analyses), print the tables; the results, run directory and whether
    the report is wanted."""
    options = RunCommandOptions(**options_from_args(RunCommandOptions, args))
    if options.threads is not None:
        torch.set_num_threads(options.threads)
    config = config_from_args(args)
    load_run_tasks(config)  # before the models load: a bad task fails in milliseconds
    loading = LoadOptions(**options_from_args(LoadOptions, args))
    handle = load_model(options.model, loading)
    llm = resolve_llm(options.model, options.llm, handle, loading, options.llm_revision)
    out = Path(options.out)
    results = run_experiments(handle, config, out, llm=llm, progress=not options.quiet)
    print(format_tables(results))
    for note in results.meta.notes:
        print(f"note: {note}")
    if not options.no_analyses:
        document = run_analyses_of_run(handle, results, out, llm=llm, progress=not options.quiet)
        for step, message in document.errors.items():
            print(f"note: analysis step {step} failed: {message}")
    print(f"\nwrote {out / 'results.json'} and {out / 'summary.csv'} ({results.meta.seconds:.0f} s)")
    return results, out, not options.no_analyses
