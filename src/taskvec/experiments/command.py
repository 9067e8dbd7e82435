"""`taskvec run`: options -> RunConfig, models loaded, experiments, tables printed, analyses, report.

Kept out of cli.py so the command line stays a thin parser and this logic is importable and testable.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch

from taskvec.experiments.config import RunConfig
from taskvec.experiments.runner import load_run_tasks, run_analyses_and_report, run_experiments
from taskvec.experiments.tables import format_tables
from taskvec.models import ModelHandle, load_model
from taskvec.models.loading import DEFAULT_VLM_NAMES


def parse_styles(values: list[str] | None) -> dict[str, str] | None:
    """["country=twemoji", "food-color=noto"] -> {"country": "twemoji", "food-color": "noto"}."""
    if not values:
        return None
    styles = {}
    for value in values:
        name, separator, style = value.partition("=")
        if not separator or not name or not style:
            raise ValueError(f"--style takes TASK_OR_FAMILY=STYLE (e.g. country=twemoji), got {value!r}")
        styles[name] = style
    return styles


def config_from_args(args: argparse.Namespace) -> RunConfig:
    """Options given on the command line override the defaults (or the --quick preset)."""
    overrides: dict[str, Any] = {}
    if args.tasks:
        overrides["tasks"] = tuple(args.tasks)
    if args.seeds is not None:
        overrides["seeds"] = tuple(range(args.seeds))
    if args.ensemble_examples:
        overrides["ensemble_examples"] = tuple(args.ensemble_examples)
    if args.sweep_seeds:
        overrides["layer_sweep_seeds"] = None if args.sweep_seeds == "all" else int(args.sweep_seeds)
    if args.ensemble_layer:
        overrides["ensemble_layer_from"] = args.ensemble_layer
    if args.layer is not None:
        overrides["layer_choice"] = args.layer
    styles = parse_styles(args.style)
    if styles:
        overrides["styles"] = styles
    for option in (
        "shots",
        "val_limit",
        "test_limit",
        "max_new_tokens",
        "batch_size",
        "query_batch_size",
        "metric",
    ):
        value = getattr(args, option)
        if value is not None:
            overrides[option] = value
    return RunConfig.quick_preset(**overrides) if args.quick else RunConfig(**overrides)


def resolve_llm(model: str, llm: str, handle: ModelHandle, device: str, dtype: str) -> ModelHandle | None:
    """--llm default: the default LM under the default VLM (its base model), else no base LM."""
    if llm == "none" or not handle.architecture.is_vision_language:
        return None
    if llm == "default":
        return load_model("default", device=device, dtype=dtype) if model in DEFAULT_VLM_NAMES else None
    return load_model(llm, device=device, dtype=dtype)


def run_command(args: argparse.Namespace) -> int:
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    config = config_from_args(args)
    tasks = load_run_tasks(config)  # before the models load: a bad task fails in milliseconds
    handle = load_model(args.model, device=args.device, dtype=args.dtype)
    llm = resolve_llm(args.model, args.llm, handle, args.device, args.dtype)
    out = Path(args.out)
    results = run_experiments(handle, config, out, llm=llm, progress=not args.quiet)
    print(format_tables(results))
    for note in results["meta"]["notes"]:
        print(f"note: {note}")
    if not args.no_analyses:
        for note in run_analyses_and_report(handle, tasks, out, llm=llm, quick=config.quick):
            print(f"note: {note}")
    print(f"\nwrote {out / 'results.json'} and {out / 'summary.csv'} ({results['meta']['seconds']:.0f} s)")
    return 0
