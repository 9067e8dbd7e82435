"""Benchmark: the one-pass layer sweep with and without a memory budget for its KV-cache copies.

On the embedded default model and a many-shot country-capital prompt (~600 tokens), runs the
one-pass sweep over every layer unchunked (one decode step, one cache copy per layer) and with a
budget of a quarter of those copies, each setting in its own process so peaks don't mix. Prints
seconds per sweep, the peak resident memory of the sweeps above the resident set before them (the
model's weights all read once, /proc's VmHWM restarted), their ratios, and whether the two
settings' logits are equal.

    python bench/sweep_memory.py
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

SETTINGS = ("unchunked", "quarter")
QUERY = "Germany"


def build_prompt(target_tokens: int, tokenizer: Any) -> str:
    from taskvec.tasks import load_task

    demonstrations = ""
    for item in load_task("country-capital").items:
        if item.input == QUERY:
            continue
        candidate = demonstrations + f"Q:{item.input}\nA:{item.output}\n\n"
        if len(tokenizer(candidate + f"Q:{QUERY}\nA:").input_ids) > target_tokens:
            break
        demonstrations = candidate
    return demonstrations + f"Q:{QUERY}\nA:"


def prefix_cache_bytes(handle: Any, inputs: dict[str, Any]) -> int:
    """One copy of the cache the sweep shares: that of the prompt minus its last token."""
    from taskvec.engine.sweep_memory import cache_bytes
    from taskvec.engine.truncated_forward import run_to_last_layer

    prefix = {key: value[:, :-1] for key, value in inputs.items()}
    _, cache = run_to_last_layer(handle, {**prefix, "use_cache": True})
    assert cache is not None
    return cache_bytes(cache)


def resident_kib(field: str) -> int:
    """A resident-memory figure of this process from /proc (VmRSS now, VmHWM the peak), in KiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def reset_peak_resident() -> None:
    """Restart the peak (VmHWM) from the current resident set, so the prompt's setup forwards and
    freed allocations before the sweep do not stand in for the sweep's own peak (Linux 4.0+)."""
    Path("/proc/self/clear_refs").write_text("5")


def touch_weights(handle: Any) -> None:
    """Read every weight once. The checkpoint is memory-mapped, so a weight joins the resident set
    only when first read: the 640 MiB unembedding would otherwise land in the sweep's peak."""
    import torch

    from taskvec.engine.lens import logit_lens
    from taskvec.engine.truncated_forward import run_to_last_layer

    run_to_last_layer(handle, dict(handle.build_inputs([f"Q:{QUERY}\nA:"])))
    logit_lens(handle, torch.zeros(1, handle.hidden_size))


def measure(setting: str, target_tokens: int, repeats: int, logits_path: Path) -> dict[str, float]:
    import torch
    from safetensors.torch import save_file

    from taskvec.engine import sweep_layers
    from taskvec.engine.sweep_memory import rows_per_chunk
    from taskvec.models import load_model

    torch.manual_seed(0)
    handle = load_model("default")
    inputs = handle.build_inputs([build_prompt(target_tokens, handle.tokenizer)])
    vectors = torch.randn(handle.num_layers, handle.hidden_size)
    row_bytes = prefix_cache_bytes(handle, inputs)
    rows = handle.num_layers
    budget = None if setting == "unchunked" else row_bytes * rows // 4
    touch_weights(handle)
    reset_peak_resident()
    baseline_kib = resident_kib("VmRSS")
    times = []
    for _ in range(repeats + 1):  # the first is a warm-up
        start = time.perf_counter()
        logits = sweep_layers(handle, inputs, vectors, method="one_pass", memory_budget=budget)
        times.append(time.perf_counter() - start)
    peak_kib = resident_kib("VmHWM")
    save_file({"logits": logits.contiguous()}, str(logits_path))
    return {
        "seconds": min(times[1:]),
        "tokens": int(inputs["input_ids"].shape[1]),
        "rows": rows,
        "rows_per_chunk": rows_per_chunk(row_bytes, rows, budget),
        "cache_copy_mib": row_bytes / 2**20,
        "peak_mib_above_model": (peak_kib - baseline_kib) / 1024,
    }


def run_child(setting: str, tokens: int, repeats: int, logits_path: Path) -> dict[str, float]:
    command = [sys.executable, __file__, "--child", setting, str(tokens), str(logits_path)]
    # A fixed mmap threshold stops glibc raising it after the first large free, so every large
    # tensor is mapped on allocation and unmapped on free and the resident set follows live memory;
    # otherwise the cache copies reuse heap the setup forwards freed and never show in the peak.
    environment = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(128 * 1024)}
    child = subprocess.run(
        [*command, "--repeats", str(repeats)], check=True, capture_output=True, text=True, env=environment
    )
    result: dict[str, float] = json.loads(child.stdout.strip().splitlines()[-1])
    return result


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--child", nargs=3, metavar=("SETTING", "TOKENS", "LOGITS"), help=argparse.SUPPRESS)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=600)
    args = parser.parse_args()
    if args.child:
        setting, tokens, logits_path = args.child
        print(json.dumps(measure(setting, int(tokens), args.repeats, Path(logits_path))))
        return

    import torch
    from safetensors.torch import load_file

    with tempfile.TemporaryDirectory() as scratch:
        paths = {setting: Path(scratch) / f"{setting}.safetensors" for setting in SETTINGS}
        results = {
            setting: run_child(setting, args.tokens, args.repeats, paths[setting]) for setting in SETTINGS
        }
        logits = {setting: load_file(str(path))["logits"] for setting, path in paths.items()}
    whole, quarter = results["unchunked"], results["quarter"]
    print(
        f"prompt of {whole['tokens']:.0f} tokens, {whole['rows']:.0f} layers swept, "
        f"one cache copy {whole['cache_copy_mib']:.1f} MiB"
    )
    for setting, figures in results.items():
        print(
            f"  {setting:9s} {figures['rows_per_chunk']:3.0f} rows per chunk  {figures['seconds']:7.3f} s  "
            f"peak +{figures['peak_mib_above_model']:.0f} MiB"
        )
    time_ratio = quarter["seconds"] / whole["seconds"]
    memory_ratio = quarter["peak_mib_above_model"] / max(whole["peak_mib_above_model"], 1e-9)
    difference = float((logits["quarter"] - logits["unchunked"]).abs().max())
    print(f"  quarter / unchunked: time {time_ratio:.2f}x, peak above model {memory_ratio:.2f}x")
    print(
        f"  logits equal: {torch.equal(logits['quarter'], logits['unchunked'])} "
        f"(max |difference| {difference:.2e}, argmax equal: "
        f"{torch.equal(logits['quarter'].argmax(-1), logits['unchunked'].argmax(-1))})"
    )


if __name__ == "__main__":
    main()
