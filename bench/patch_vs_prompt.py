"""Benchmark: answering test queries by patching a cached task vector vs prompting with N examples.

The paper's efficiency claim (ICML version): patching costs 0.20 s / 8.21 GB per query against
2.20 s / 20.02 GB for prompting with N=30 examples (Idefics2-8B, GPU). Here, on CPU: seconds per
query (greedy, one new token as in the reference) and peak resident memory, each method in its own
process so peaks don't mix. On a VLM the prompt is N image demonstrations + the image query; on a
language model, text. The vector is extracted once beforehand (a third process) and loaded from disk,
as a user of a cached vector would.

    python bench/patch_vs_prompt.py                       # default VLM (or the default LM if absent)
    python bench/patch_vs_prompt.py --model DIR --queries 3 --shots 5   # a short setting

Memory: VmHWM of /proc/self/status is reset (clear_refs) once the model is loaded, so "peak above
model" is what answering the queries adds beyond one bare query (activations, KV cache, images);
"peak total" includes the weights, like the paper's GPU figures.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any


def status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def reset_peak_memory() -> bool:
    """Make VmHWM start again from the current RSS (Linux >= 4.0); False where not allowed."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def load(model: str, threads: int) -> Any:
    import torch

    from taskvec.models import load_model

    torch.set_num_threads(threads)
    try:
        return load_model(model)
    except (FileNotFoundError, ValueError, LookupError) as error:
        if model != "default-vlm":
            raise
        print(f"default-vlm unavailable ({error}); using the default LM", file=sys.stderr)
        return load_model("default")


def modality_of(handle: Any) -> str:
    return "image" if handle.architecture.is_vision_language else "text"


def extract(args: argparse.Namespace) -> dict[str, Any]:
    from taskvec.tasks import load_task
    from taskvec.vectors import exemplar_vector, save_task_vector

    handle = load(args.model, args.threads)
    task = load_task(args.task)
    # The vector the paper would cache: 5-shot prompts on validation, in the query's modality.
    vector = exemplar_vector(handle, task, shots=5, modality=modality_of(handle))
    save_task_vector(vector, args.vector)
    return {"model": handle.name, "layers": handle.num_layers}


def answer(args: argparse.Namespace, method: str) -> dict[str, Any]:
    import random

    from taskvec.evaluation import accuracy, generate_answers
    from taskvec.prompts import build_icl_prompt, build_query_prompt, encode_prompts
    from taskvec.tasks import load_task
    from taskvec.vectors import load_task_vector, sample_demonstrations

    handle = load(args.model, args.threads)
    modality = modality_of(handle)
    task = load_task(args.task)
    queries = task.split("test")[: args.queries]
    pool = task.split("val") + (task.split("train") if "train" in task.splits else [])
    rng = random.Random(0)
    layer = args.layer if args.layer is not None else handle.num_layers // 2
    vector = load_task_vector(args.vector).at(layer) if method == "patch" else None
    if method == "patch":
        prompts = [build_query_prompt(q, modality=modality) for q in queries]
    else:
        prompts = [
            build_icl_prompt(
                sample_demonstrations(pool, q, args.shots, rng),
                q,
                demo_modality=modality,
                query_modality=modality,
            )
            for q in queries
        ]
    lengths = [int(encode_prompts(handle, [p])["input_ids"].shape[1]) for p in prompts]

    def run(prompt_list: list[Any]) -> list[str]:
        return generate_answers(
            handle, prompt_list, vector=vector, layer=layer, max_new_tokens=1, batch_size=1
        )

    # Weights are memory-mapped and paged in by the first forward pass, so one bare query (no
    # vector, no examples) runs first and the memory baseline is taken after it. The warm-up of the
    # method itself comes after the baseline: the allocator keeps what a first pass takes, so a
    # baseline taken after it would hide the method's activations. Time is counted after both.
    generate_answers(handle, [build_query_prompt(queries[0], modality=modality)], max_new_tokens=1)
    model_kib = status_kib("VmRSS")
    peak_reset = reset_peak_memory()
    run(prompts[:1])  # warm-up: first calls allocate caches and pick kernels
    start = time.perf_counter()
    generated = run(prompts)
    seconds = time.perf_counter() - start
    peak_kib = status_kib("VmHWM")
    answers = [q.answers() for q in queries]
    return {
        "method": method,
        "model": handle.name,
        "modality": modality,
        "queries": len(queries),
        "tokens_per_prompt": sum(lengths) / len(lengths),
        "seconds_per_query": seconds / len(queries),
        "peak_mib_total": peak_kib / 1024,
        "peak_mib_above_model": (peak_kib - model_kib) / 1024 if peak_reset else None,
        "accuracy": accuracy(generated, answers),
        "layer": layer if method == "patch" else None,
    }


def child(argv: list[str]) -> dict[str, Any]:
    output = subprocess.run([sys.executable, __file__, *argv], check=True, capture_output=True, text=True)
    return json.loads(output.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--model", default="default-vlm", help="default-vlm (falls back to default), default, DIR"
    )
    parser.add_argument("--task", default="country-capital")
    parser.add_argument("--queries", type=int, default=20, help="test queries timed per method")
    parser.add_argument(
        "--shots", type=int, default=30, help="examples in the prompting baseline (paper: 30)"
    )
    parser.add_argument("--layer", type=int, default=None, help="patched layer (default: the middle one)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--vector", default=None, help="cached vector file (default: a temporary file)")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--child", choices=["extract", "patch", "prompt"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        result = extract(args) if args.child == "extract" else answer(args, args.child)
        print(json.dumps(result))
        return
    with tempfile.TemporaryDirectory() as scratch:
        vector = args.vector or str(Path(scratch) / "vector.safetensors")
        common = ["--model", args.model, "--task", args.task, "--queries", str(args.queries)]
        common += ["--shots", str(args.shots), "--threads", str(args.threads), "--vector", vector]
        if args.layer is not None:
            common += ["--layer", str(args.layer)]
        if not Path(vector).is_file():
            child([*common, "--child", "extract"])
        results = {method: child([*common, "--child", method]) for method in ("patch", "prompt")}
    if args.json:
        print(json.dumps(results, indent=1))
        return
    patch, prompt = results["patch"], results["prompt"]
    print(
        f"{patch['model']}, {args.task}, {patch['queries']} {patch['modality']} queries, 1 new token, "
        f"{args.threads} thread(s)"
    )
    for name, figures in (("patch (cached vector)", patch), (f"prompt ({args.shots} examples)", prompt)):
        above = figures["peak_mib_above_model"]
        extra = f"+{above:.0f} MiB above model" if above is not None else "above model: n/a"
        print(
            f"  {name:24s} {figures['seconds_per_query']:7.3f} s/query  "
            f"{figures['tokens_per_prompt']:6.0f} tokens  peak {figures['peak_mib_total']:6.0f} MiB "
            f"({extra})  accuracy {figures['accuracy']:.2f}"
        )
    ratio = prompt["seconds_per_query"] / patch["seconds_per_query"]
    memory = prompt["peak_mib_total"] / patch["peak_mib_total"]
    print(
        f"  prompting / patching: {ratio:.1f}x time, {memory:.2f}x peak memory (paper: 11x time, 2.4x memory)"
    )


if __name__ == "__main__":
    main()
