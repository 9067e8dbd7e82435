"""Benchmark: a validation layer sweep of bare image queries, batched one-pass vs per query vs naive.

On the default VLM, the text-ICL task vector of country-capital (extracted once, all layers) is
patched at every layer of 30 bare image validation queries ("Q:<image>\\nA:"), the sweep a
`taskvec run` makes per patched condition and task. Three ways, each in its own process (so peaks
do not mix), each after one warm-up sweep:

- naive: one full forward per query and layer (`sweep_layers(..., method="naive")`);
- per query: the one-pass sweep of one query at a time (`sweep_layers(..., method="one_pass")`);
- batched: all queries in one prefix pass, queries x layers decode rows (`sweep_first_tokens`).

Prints seconds per sweep of the split, the peak resident memory above the loaded model, the
ratios, and whether the three agree on every (query, layer) top token.

    python bench/sweep_batch.py
    python bench/sweep_batch.py --queries 30 --threads 2 --repeats 2
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

METHODS = ("naive", "per_query", "batched")


def resident_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def sweep_tokens(method: str, handle: Any, prompts: list[Any], vectors: Any) -> list[list[int]]:
    """[query][layer] top-token ids of the sweep by `method`."""
    from taskvec.engine import sweep_layers
    from taskvec.evaluation import LayerPatch, generate_patched_answers
    from taskvec.prompts import encode_prompts

    if method == "batched":
        # What `sweep_first_tokens` runs, keeping the token ids rather than their text.
        patches = [LayerPatch(vectors[layer], layer) for layer in range(handle.num_layers)]
        answers = generate_patched_answers(handle, prompts, patches, max_new_tokens=1)
        return [
            [answers[layer].first_tokens[query] for layer in range(len(patches))]
            for query in range(len(prompts))
        ]
    engine_method = "naive" if method == "naive" else "one_pass"
    return [
        sweep_layers(handle, encode_prompts(handle, [prompt]), vectors, method=engine_method)
        .argmax(-1)
        .tolist()
        for prompt in prompts
    ]


def measure(method: str, queries: int, repeats: int, out: Path) -> dict[str, float]:
    import torch

    from taskvec.engine.lens import logit_lens
    from taskvec.models import load_model
    from taskvec.prompts import build_query_prompt
    from taskvec.tasks import load_task
    from taskvec.vectors import extract_vector

    handle = load_model("default-vlm")
    task = load_task("country-capital")
    vectors = extract_vector(handle, task, "text-icl", limit=16).vector.vectors
    prompts = [build_query_prompt(item, modality="image") for item in task.split("val")[:queries]]
    logit_lens(handle, torch.zeros(1, handle.hidden_size))  # reads the unembedding once
    sweep_tokens(method, handle, prompts[:2], vectors)  # warm-up
    Path("/proc/self/clear_refs").write_text("5")
    baseline = resident_kib("VmRSS")
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        tokens = sweep_tokens(method, handle, prompts, vectors)
        times.append(time.perf_counter() - start)
    out.write_text(json.dumps(tokens))
    return {
        "seconds": min(times),
        "peak_mib_above_model": (resident_kib("VmHWM") - baseline) / 1024,
        "queries": len(prompts),
        "layers": handle.num_layers,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--child", nargs=2, metavar=("METHOD", "OUT"), help=argparse.SUPPRESS)
    parser.add_argument("--queries", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    args = parser.parse_args()
    if args.child:
        import torch

        torch.set_num_threads(args.threads)
        method, out = args.child
        print(json.dumps(measure(method, args.queries, args.repeats, Path(out))))
        return
    results: dict[str, dict[str, float]] = {}
    tokens: dict[str, list[list[int]]] = {}
    environment = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(128 * 1024)}
    with tempfile.TemporaryDirectory() as scratch:
        for method in args.methods:
            out = Path(scratch) / f"{method}.json"
            command = [
                sys.executable,
                __file__,
                "--child",
                method,
                str(out),
                "--queries",
                str(args.queries),
                "--repeats",
                str(args.repeats),
                "--threads",
                str(args.threads),
            ]
            child = subprocess.run(command, check=True, capture_output=True, text=True, env=environment)
            results[method] = json.loads(child.stdout.strip().splitlines()[-1])
            tokens[method] = json.loads(out.read_text())
    first = next(iter(results.values()))
    print(f"{first['queries']:.0f} bare image queries x {first['layers']:.0f} layers, {args.threads} threads")
    for method, figures in results.items():
        print(f"  {method:9s} {figures['seconds']:8.2f} s   peak +{figures['peak_mib_above_model']:.0f} MiB")
    if "batched" in results:
        for method in ("naive", "per_query"):
            if method in results:
                ratio = results[method]["seconds"] / results["batched"]["seconds"]
                print(f"  batched vs {method}: {ratio:.1f}x")
    reference = tokens.get("naive") or next(iter(tokens.values()))
    for method, ids in tokens.items():
        same = sum(
            a == b for row, ref in zip(ids, reference, strict=True) for a, b in zip(row, ref, strict=True)
        )
        total = sum(len(row) for row in reference)
        print(f"  {method:9s} top tokens equal to the reference's: {same} of {total}")


if __name__ == "__main__":
    main()
