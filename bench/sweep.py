"""Benchmark: the naive per-layer loop against the one-pass and batched layer sweeps.

On the embedded default model, for a short (~20 token) and a long (~600 token, the size of a LLaVA
image query) prompt, prints seconds per sweep, the speed-up ratios and each method's peak resident
memory above the loaded model. Each method runs in its own process so peaks don't mix.

    python bench/sweep.py            # all methods, both lengths
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

PAIRS = [
    ("France", "Paris"),
    ("Japan", "Tokyo"),
    ("Italy", "Rome"),
    ("Egypt", "Cairo"),
    ("Peru", "Lima"),
    ("Spain", "Madrid"),
    ("Kenya", "Nairobi"),
    ("Canada", "Ottawa"),
    ("Chile", "Santiago"),
    ("Norway", "Oslo"),
    ("Greece", "Athens"),
    ("Cuba", "Havana"),
]
METHODS = ("naive", "batched", "one_pass")


def build_prompt(target_tokens: int, tokenizer: object) -> str:
    demonstrations = ""
    index = 0
    while True:
        country, capital = PAIRS[index % len(PAIRS)]
        candidate = demonstrations + f"Q:{country}\nA:{capital}\n\n"
        if len(tokenizer(candidate + "Q:Germany\nA:").input_ids) > target_tokens:  # type: ignore[operator]
            break
        demonstrations, index = candidate, index + 1
    return demonstrations + "Q:Germany\nA:"


def measure(method: str, target_tokens: int, repeats: int) -> dict[str, float]:
    import torch

    from taskvec.engine import sweep_layers
    from taskvec.models import load_model

    torch.manual_seed(0)
    handle = load_model("default")
    inputs = handle.build_inputs([build_prompt(target_tokens, handle.tokenizer)])
    vectors = torch.randn(handle.num_layers, handle.hidden_size)
    baseline_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    sweep_layers(handle, inputs, vectors, method=method)  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        sweep_layers(handle, inputs, vectors, method=method)
        times.append(time.perf_counter() - start)
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {
        "seconds": min(times),
        "tokens": int(inputs["input_ids"].shape[1]),
        "peak_mib_above_model": (peak_kib - baseline_kib) / 1024,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--child", nargs=2, metavar=("METHOD", "TOKENS"), help=argparse.SUPPRESS)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--lengths", type=int, nargs="+", default=[20, 600])
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.child[0], int(args.child[1]), args.repeats)))
        return
    for length in args.lengths:
        results = {}
        for method in METHODS:
            repeats = 1 if method == "naive" and length > 100 else args.repeats
            child = subprocess.run(
                [sys.executable, __file__, "--child", method, str(length), "--repeats", str(repeats)],
                check=True,
                capture_output=True,
                text=True,
            )
            results[method] = json.loads(child.stdout.strip().splitlines()[-1])
        tokens = results["naive"]["tokens"]
        print(f"prompt of {tokens} tokens, 18 layers swept")
        for method, figures in results.items():
            ratio = results["naive"]["seconds"] / figures["seconds"]
            print(
                f"  {method:9s} {figures['seconds']:8.3f} s  {ratio:6.1f}x vs naive   "
                f"peak +{figures['peak_mib_above_model']:.0f} MiB"
            )


if __name__ == "__main__":
    main()
