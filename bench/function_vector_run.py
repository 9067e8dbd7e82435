"""Benchmark: the time function-vector conditions add to `taskvec run`, measured on one task.

Function vectors are found per task on the first `--fv-seeds` seeds (default 1) whatever the run's
seeds, and their sweeps and tests are per task too, so their cost in the full run is the cost on one
task times the number of tasks. This runs the same one-task run (full protocol: every validation
and test item, Todd et al.'s 10-shot prompts, 100 mean and 25 effect prompts) twice into fresh
directories, with and without function vectors, and prints both wall times, the experiments' own
time (results.json meta.seconds), the difference and the difference times the paper's six tasks.

    python bench/function_vector_run.py
    python bench/function_vector_run.py --task food-color --seeds 3 --keep runs/fv-bench
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

PAPER_TASK_COUNT = 6


def _run(out: Path, task: str, seeds: int, threads: int, extra: list[str]) -> tuple[float, dict[str, Any]]:
    command = [sys.executable, "-m", "taskvec.cli", "run", "--tasks", task, "--seeds", str(seeds)]
    command += ["--no-analyses", "--quiet", "--threads", str(threads), "--out", str(out), *extra]
    start = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start, json.loads((out / "results.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--task", default="country-capital")
    parser.add_argument(
        "--seeds", type=int, default=1, help="the run's seeds (function vectors use the first)"
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--keep", type=Path, help="leave both run directories here")
    args = parser.parse_args()

    root = args.keep or Path(tempfile.mkdtemp(prefix="taskvec-fv-bench-"))
    without_wall, without = _run(
        root / "without", args.task, args.seeds, args.threads, ["--no-function-vectors"]
    )
    with_wall, with_fv = _run(root / "with", args.task, args.seeds, args.threads, [])
    same = {s["condition"]: s["mean"] for s in without["summaries"]} == {
        s["condition"]: s["mean"] for s in with_fv["summaries"] if not s["condition"].startswith("fv-")
    }
    added_wall = with_wall - without_wall
    added = with_fv["meta"]["seconds"] - without["meta"]["seconds"]
    print(f"{args.task}, {args.seeds} seed(s), {args.threads} threads")
    print(
        f"without function vectors: wall {without_wall:.1f} s, experiments {without['meta']['seconds']:.1f} s"
    )
    print(f"with function vectors:    wall {with_wall:.1f} s, experiments {with_fv['meta']['seconds']:.1f} s")
    print(f"added: wall {added_wall:.1f} s, experiments {added:.1f} s ({with_wall / without_wall:.2f}x wall)")
    print(f"x {PAPER_TASK_COUNT} tasks: {PAPER_TASK_COUNT * added / 60:.1f} min added to the full run")
    print(f"the residual conditions' numbers are the same in both runs: {same}")
    for summary in with_fv["summaries"]:
        if summary["condition"].startswith("fv-"):
            low, high = summary["interval"]["low"], summary["interval"]["high"]
            where = f"layer {summary['layer']}, x{summary['scale']:g}"
            print(f"  {summary['condition']}: {summary['mean']:.2f} [{low:.2f}, {high:.2f}] ({where})")


if __name__ == "__main__":
    main()
