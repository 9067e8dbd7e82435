"""Benchmark: taskvec's layer sweeps against nnsight, the library our users would otherwise write them in.

On the embedded default model (Gemma-3-270M, 18 layers, fp32) and one country-capital text-ICL task
vector (extracted with taskvec, 30 validation prompts of 5 shots), patched by replacement at the last
position of each layer in turn:

1. a many-shot prompt of ~600 tokens (bench/sweep_memory.py's): nnsight's natural per-layer loop
   (one `model.trace` per layer, setting the layer's output at the last position and saving the
   last position's logits), the same loop under `torch.no_grad()`, nnsight's one trace with 18
   invokes (one batch of 18 rows), and taskvec's naive loop and one-pass sweep;
2. the same on a ~15-token prompt;
3. 30 bare validation queries (`Q:France\\nA:`), all 18 layers: nnsight's per-query loop of 18 traces
   (timed on --loop-queries queries and scaled to 30, said so in the table), nnsight's one trace of
   18 invokes per query, taskvec's `sweep_first_tokens` (the whole split) and its per-query loop of
   `sweep_layers`.

Each measurement runs in its own process (2 torch threads), so peaks don't mix: peak RSS is /proc's
VmHWM after the weights were read once and the peak restarted (as bench/sweep_memory.py does), shown
whole and above the resident set before the sweeps. Logits are compared with taskvec's naive loop
(max |difference|); on the split, the first tokens with taskvec's.

nnsight is a benchmark-only dependency, never a runtime one. `pip install --dry-run nnsight==0.8.1`
in the project's environment would add only nnsight, greenlet, httpx, httpcore, websocket-client and
zstandard (no change to torch or transformers), but to leave that environment exactly as it is
the bench runs from a venv that sees the project's packages:

    python -m venv --system-site-packages /tmp/nnsight-venv
    /tmp/nnsight-venv/bin/pip install -c constraints/lock.txt nnsight==0.8.1
    /tmp/nnsight-venv/bin/python bench/nnsight_compare.py

(or `pip install -c constraints/lock.txt -e ".[bench]"`). Without nnsight it prints why and exits 0.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sweep import build_prompt as build_short_prompt
from sweep_memory import build_prompt, reset_peak_resident, resident_kib, touch_weights

THREADS = 2
SPLIT_SIZE = 30
VECTOR_PROMPTS = 30
# Each (prompt, method) is one child process. nnsight runs the model as it is, and loaded weights
# require grad, so a plain trace records autograd graphs, and a saved logits row keeps its trace's
# graph alive: the long prompt's per-layer loop peaked at 18 GB (the figure). Its 18 invokes
# under grad (that graph for 18 rows, plus logits for all 18 x 600 positions, 11 GiB) would not fit
# in this machine's 24 GiB, so the long prompt times the batched form under no_grad only.
METHODS = {
    "long": (
        "taskvec-naive",
        "taskvec-one-pass",
        "nnsight-loop",
        "nnsight-loop-no-grad",
        "nnsight-invokes-no-grad",
    ),
    "short": (
        "taskvec-naive",
        "taskvec-one-pass",
        "nnsight-loop",
        "nnsight-loop-no-grad",
        "nnsight-invokes",
        "nnsight-invokes-no-grad",
    ),
    "split": ("taskvec-split", "taskvec-per-query", "nnsight-split-invokes", "nnsight-split-loop"),
}
# bench/sweep_memory.py's ~600-token prompt of the task's own pairs, and bench/sweep.py's 15-token one
# (its 20-token target: one demonstration fits, two do not).
PROMPT_BUILDERS: dict[str, tuple[Callable[[int, Any], str], int]] = {
    "long": (build_prompt, 600),
    "short": (build_short_prompt, 20),
}
# What a child needs free before it starts (GiB of MemAvailable), where it is large. A saved row of
# logits is a view of the whole [tokens, vocab] logits tensor and keeps it alive (594 x 262k floats,
# 0.6 GiB per layer on the long prompt), and under grad its trace's graph too: the long prompt's
# natural loop over all 18 layers was OOM-killed at 24 GB resident on this machine, so it is timed on
# its first --long-loop-layers layers and scaled (time and the growth of its peak are linear in layers).
MEMORY_NEEDED_GIB = {
    ("long", "nnsight-loop"): 12.0,
    ("long", "nnsight-loop-no-grad"): 16.0,
    ("long", "nnsight-invokes-no-grad"): 16.0,
}


def load_average() -> float:
    return float(Path("/proc/loadavg").read_text().split()[0])


def timed(run: Callable[[], Any], repeats: int) -> tuple[float, Any]:
    """The fastest of `repeats` runs and the last result."""
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = run()
        times.append(time.perf_counter() - start)
    return min(times), result


# ------------------------------------------------------------------------------- the two libraries


def layer_envoy(model: Any, layers_path: str, layer: int) -> Any:
    envoy = model
    for name in layers_path.split("."):
        envoy = getattr(envoy, name)
    return envoy[layer]


def nnsight_loop(model: Any, layers_path: str, inputs: dict[str, Any], vectors: Any) -> Any:
    """What an nnsight user writes: one trace per layer."""
    import torch

    rows = []
    for layer in range(vectors.shape[0]):
        with model.trace(dict(inputs)):
            layer_envoy(model, layers_path, layer).output[:, -1, :] = vectors[layer]
            rows.append(model.lm_head.output[0, -1].save())
    return torch.stack(rows).detach()


def nnsight_invokes(model: Any, layers_path: str, inputs: dict[str, Any], vectors: Any) -> Any:
    """nnsight's batched form: one trace, one invoke (one batch row) per layer."""
    import torch

    rows = []
    with model.trace() as tracer:
        for layer in range(vectors.shape[0]):
            with tracer.invoke(dict(inputs)):
                layer_envoy(model, layers_path, layer).output[:, -1, :] = vectors[layer]
                rows.append(model.lm_head.output[0, -1].save())
    return torch.stack(rows).detach()


def first_tokens(handle: Any, logits: Any) -> list[str]:
    return list(handle.tokenizer.batch_decode(logits.argmax(dim=-1)[:, None]))


def measure(
    method: str, prompt_kind: str, vectors_path: Path, out_path: Path, args: argparse.Namespace
) -> dict[str, Any]:
    import torch
    from safetensors.torch import load_file, save_file

    from taskvec.engine import sweep_layers
    from taskvec.evaluation import sweep_first_tokens
    from taskvec.models import load_model
    from taskvec.prompts import build_query_prompt, encode_prompts
    from taskvec.tasks import load_task

    torch.set_num_threads(THREADS)
    handle = load_model("default")
    vectors = load_file(str(vectors_path))["vectors"]
    layers_path = handle.architecture.layers_path
    model: Any = None
    if method.startswith("nnsight"):
        from nnsight import TransformersModel

        model = TransformersModel(handle.model, task="text-generation", tokenizer=handle.tokenizer)
    touch_weights(handle)
    load_before = load_average()
    result: dict[str, Any] = {"method": method, "prompt": prompt_kind}

    if prompt_kind == "split":
        queries = [
            build_query_prompt(item) for item in load_task("country-capital").split("val")[:SPLIT_SIZE]
        ]
        encoded = [encode_prompts(handle, [query]) for query in queries]
        timed_queries = args.loop_queries if method == "nnsight-split-loop" else len(queries)
        per_query: dict[str, Callable[[dict[str, Any]], Any]] = {
            "taskvec-per-query": lambda inputs: sweep_layers(handle, inputs, vectors),
            "nnsight-split-invokes": lambda inputs: nnsight_invokes(model, layers_path, inputs, vectors),
            "nnsight-split-loop": lambda inputs: nnsight_loop(model, layers_path, inputs, vectors),
        }

        def run() -> list[list[str]]:
            if method == "taskvec-split":
                return sweep_first_tokens(handle, queries, vectors)
            return [first_tokens(handle, per_query[method](inputs)) for inputs in encoded[:timed_queries]]

        # A warm-up on one query pays the first call's costs (allocator, nnsight's code capture).
        if method == "taskvec-split":
            sweep_first_tokens(handle, queries[:1], vectors)
        else:
            per_query[method](encoded[0])
        reset_peak_resident()
        baseline = resident_kib("VmRSS")
        seconds, tokens = timed(run, 1)
        result.update(
            seconds=seconds * len(queries) / timed_queries,
            timed_queries=timed_queries,
            queries=len(queries),
            tokens=tokens,
        )
    else:
        builder, target_tokens = PROMPT_BUILDERS[prompt_kind]
        inputs = handle.build_inputs([builder(target_tokens, handle.tokenizer)])
        sweeps: dict[str, Callable[[], Any]] = {
            "taskvec-naive": lambda: sweep_layers(handle, inputs, vectors, method="naive"),
            "taskvec-one-pass": lambda: sweep_layers(handle, inputs, vectors, method="one_pass"),
            "nnsight-loop": lambda: nnsight_loop(model, layers_path, inputs, vectors),
            "nnsight-loop-no-grad": lambda: without_grad(nnsight_loop, model, layers_path, inputs, vectors),
            "nnsight-invokes": lambda: nnsight_invokes(model, layers_path, inputs, vectors),
            "nnsight-invokes-no-grad": lambda: without_grad(
                nnsight_invokes, model, layers_path, inputs, vectors
            ),
        }
        slow = prompt_kind == "long" and method != "taskvec-one-pass"
        layers = vectors.shape[0]
        if (prompt_kind, method) == ("long", "nnsight-loop"):
            layers = args.long_loop_layers
            sweeps[method] = lambda: nnsight_loop(model, layers_path, inputs, vectors[:layers])
        # Slow sweeps (tens of seconds) run once after a warm-up on a 2-token prompt, which pays the
        # first call's costs without a second full sweep; fast ones warm up on themselves.
        if slow:
            warm = handle.build_inputs(["Q:"])
            if method.startswith("nnsight"):
                nnsight_loop(model, layers_path, warm, vectors[:1])
            else:
                sweep_layers(handle, warm, vectors, method="naive", layers=[0])
        else:
            sweeps[method]()
        reset_peak_resident()
        baseline = resident_kib("VmRSS")
        seconds, logits = timed(sweeps[method], 1 if slow else args.repeats)
        save_file({"logits": logits.float().contiguous()}, str(out_path))
        scale = vectors.shape[0] / layers
        result.update(seconds=seconds * scale, tokens=int(inputs["input_ids"].shape[1]), timed_layers=layers)
    peak = resident_kib("VmHWM")
    result.update(peak_mib=peak / 1024, peak_mib_above_model=(peak - baseline) / 1024)
    if result.get("timed_layers", 18) != 18:
        result["peak_mib"] = (baseline + (peak - baseline) * scale) / 1024
        result["peak_mib_above_model"] *= scale
        result["measured_peak_mib"] = peak / 1024
    result["load"] = [load_before, load_average()]
    return result


def without_grad(sweep: Callable[..., Any], *args: Any) -> Any:
    """A sweep as a user who knows to switch autograd off writes it (see METHODS)."""
    import torch

    with torch.no_grad():
        return sweep(*args)


def extract(vectors_path: Path) -> None:
    import torch
    from safetensors.torch import save_file

    from taskvec.models import load_model
    from taskvec.tasks import load_task
    from taskvec.vectors import extract_vector

    torch.set_num_threads(THREADS)
    handle = load_model("default")
    extraction = extract_vector(handle, load_task("country-capital"), "text-icl", limit=VECTOR_PROMPTS)
    save_file({"vectors": extraction.vector.vectors.float().contiguous()}, str(vectors_path))


# ---------------------------------------------------------------------------------------- the parent


def run_child(*child_args: str) -> dict[str, Any] | None:
    """The child's figures, or None (with the reason printed) if it failed or was killed."""
    command = [sys.executable, __file__, *child_args]
    child = subprocess.run(command, check=False, capture_output=True, text=True)
    if child.returncode < 0:
        print(f"  {' '.join(child_args[1:3])}: killed by signal {-child.returncode} (the OOM killer, if 9)")
        return None
    if child.returncode != 0:
        print(f"  {' '.join(child_args[1:3])} failed:\n{child.stderr[-3000:]}")
        return None
    figures: dict[str, Any] = json.loads(child.stdout.strip().splitlines()[-1])
    return figures


def memory_available_gib() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 2**20
    raise RuntimeError("/proc/meminfo has no MemAvailable")


def report(results: dict[tuple[str, str], dict[str, Any]], logits: dict[tuple[str, str], Any]) -> None:
    columns = [
        "prompt",
        "method",
        "s",
        "vs taskvec fastest",
        "peak RSS (MiB)",
        "peak above model (MiB)",
        "max abs logit diff vs taskvec naive",
        "load 1 min (before / after)",
    ]
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    for prompt_kind in ("long", "short", "split"):
        rows = {method: figures for (kind, method), figures in results.items() if kind == prompt_kind}
        if not rows:
            continue
        fastest_name = "taskvec-split" if prompt_kind == "split" else "taskvec-one-pass"
        fastest = rows.get(fastest_name, {}).get("seconds", float("nan"))
        reference = logits.get((prompt_kind, "taskvec-naive"))
        tokens_reference = rows.get("taskvec-split", {}).get("tokens")
        for method, figures in rows.items():
            if prompt_kind == "split":
                label = f"{figures['queries']} queries"
                agreement = "-"
                if tokens_reference is not None:
                    compared = tokens_reference[: len(figures["tokens"])]
                    same = sum(
                        a == b
                        for row_a, row_b in zip(compared, figures["tokens"], strict=True)
                        for a, b in zip(row_a, row_b, strict=True)
                    )
                    total = sum(len(row) for row in compared)
                    agreement = f"first tokens {same}/{total} equal"
                if figures["timed_queries"] != figures["queries"]:
                    label += f" (timed on {figures['timed_queries']}, scaled)"
            else:
                label = f"{figures['tokens']} tokens"
                rows_here = logits[(prompt_kind, method)]
                agreement = (
                    f"{float((rows_here - reference[: len(rows_here)]).abs().max()):.1e}"
                    if reference is not None
                    else "-"
                )
                if "measured_peak_mib" in figures:
                    label += (
                        f" (timed on {figures['timed_layers']} of 18 layers, scaled; peak extrapolated "
                        f"from {figures['measured_peak_mib']:.0f} MiB)"
                    )
            print(
                f"| {label} | {method} | {figures['seconds']:.2f} | {figures['seconds'] / fastest:.1f}x | "
                f"{figures['peak_mib']:.0f} | {figures['peak_mib_above_model']:+.0f} | {agreement} | "
                f"{figures['load'][0]:.2f} / {figures['load'][1]:.2f} |"
            )
    split = {method: figures for (kind, method), figures in results.items() if kind == "split"}
    if "taskvec-split" in split and "taskvec-per-query" in split:
        ratio = split["taskvec-per-query"]["seconds"] / split["taskvec-split"]["seconds"]
        print(f"\ntaskvec per-query loop / sweep_first_tokens: {ratio:.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--child", nargs=4, metavar=("METHOD", "PROMPT", "VECTORS", "OUT"), help=argparse.SUPPRESS
    )
    parser.add_argument("--extract", metavar="VECTORS", help=argparse.SUPPRESS)
    parser.add_argument(
        "--repeats", type=int, default=3, help="timed runs of the fast sweeps (the fastest counts)"
    )
    parser.add_argument(
        "--long-loop-layers",
        type=int,
        default=6,
        help="layers nnsight's natural loop is timed on for the long prompt, scaled to 18",
    )
    parser.add_argument(
        "--loop-queries",
        type=int,
        default=5,
        help="queries nnsight's per-query loop is timed on, scaled to 30",
    )
    parser.add_argument(
        "--prompts", nargs="+", default=["long", "short", "split"], choices=["long", "short", "split"]
    )
    parser.add_argument("--methods", nargs="+", help="only these methods (default: all)")
    args = parser.parse_args()
    if args.extract:
        extract(Path(args.extract))
        print("{}")
        return
    if args.child:
        method, prompt_kind, vectors_path, out_path = args.child
        print(json.dumps(measure(method, prompt_kind, Path(vectors_path), Path(out_path), args)))
        return
    if importlib.util.find_spec("nnsight") is None:
        print(
            "nnsight is not installed here, so there is nothing to compare against: install it in a venv "
            "(see this script's docstring: python bench/nnsight_compare.py --help) and run it from there."
        )
        return

    import nnsight
    import torch
    from safetensors.torch import load_file

    print(
        f"nnsight {nnsight.__version__}, torch {torch.__version__}, {THREADS} threads; load {os.getloadavg()}"
    )
    with tempfile.TemporaryDirectory() as scratch:
        vectors_path = Path(scratch) / "vectors.safetensors"
        if run_child("--extract", str(vectors_path)) is None:
            return
        results: dict[tuple[str, str], dict[str, Any]] = {}
        logits: dict[tuple[str, str], Any] = {}
        for prompt_kind in args.prompts:
            for method in METHODS[prompt_kind]:
                if args.methods and method not in args.methods:
                    continue
                needed = MEMORY_NEEDED_GIB.get((prompt_kind, method), 0.0)
                if memory_available_gib() < needed:
                    print(
                        f"  {prompt_kind:5s} {method:22s} skipped: needs {needed:.0f} GiB free, "
                        f"{memory_available_gib():.1f} GiB available"
                    )
                    continue
                out_path = Path(scratch) / f"{prompt_kind}-{method}.safetensors"
                extra = ["--repeats", str(args.repeats), "--loop-queries", str(args.loop_queries)]
                extra += ["--long-loop-layers", str(args.long_loop_layers)]
                figures = run_child("--child", method, prompt_kind, str(vectors_path), str(out_path), *extra)
                if figures is None:
                    continue
                results[(prompt_kind, method)] = figures
                if out_path.exists():
                    logits[(prompt_kind, method)] = load_file(str(out_path))["logits"]
                print(
                    f"  {prompt_kind:5s} {method:24s} {figures['seconds']:8.2f} s  "
                    f"peak {figures['peak_mib']:.0f} MiB",
                    flush=True,
                )
    print()
    report(results, logits)


if __name__ == "__main__":
    main()
