"""Benchmark: Ray's scheduling overhead on `taskvec run --quick` at equal total threads.

The same quick run on the default VLM twice, each into a fresh directory: in one process with
--threads T, then with --ray --workers W (a local cluster; T // W threads per worker). Both wall
times (the whole command: loading, cluster start) and the experiments' own time (results.json
meta.seconds) are printed with their ratio, and the two results.json are checked equal apart from
timing and step counts.

    python bench/ray_overhead.py
    python bench/ray_overhead.py --threads 2 --workers 2 --keep runs/ray-bench --ray-first
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

VOLATILE_META = ("started", "seconds", "steps")


def _run(out: Path, threads: int, extra: list[str]) -> tuple[float, dict[str, Any]]:
    command = [sys.executable, "-m", "taskvec.cli", "run", "--quick", "--no-analyses", "--quiet"]
    command += ["--threads", str(threads), "--out", str(out), *extra]
    start = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - start
    return wall, json.loads((out / "results.json").read_text())


def _comparable(results: dict[str, Any]) -> dict[str, Any]:
    meta = {key: value for key, value in results["meta"].items() if key not in VOLATILE_META}
    return {**results, "meta": meta}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--threads", type=int, default=2, help="total threads of either run")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--keep", type=Path, help="leave both run directories here")
    parser.add_argument("--ray-first", action="store_true", help="the Ray run first (a drifting load)")
    args = parser.parse_args()

    root = args.keep or Path(tempfile.mkdtemp(prefix="taskvec-ray-bench-"))
    ray_options = ["--ray", "--workers", str(args.workers)]
    if args.ray_first:
        ray_wall, on_ray = _run(root / "ray", args.threads, ray_options)
    local_wall, local = _run(root / "local", args.threads, [])
    if not args.ray_first:
        ray_wall, on_ray = _run(root / "ray", args.threads, ray_options)
    same = _comparable(local) == _comparable(on_ray)
    local_seconds, ray_seconds = local["meta"]["seconds"], on_ray["meta"]["seconds"]
    print(f"local, {args.threads} threads: wall {local_wall:.1f} s, experiments {local_seconds:.1f} s")
    print(
        f"ray, {args.workers} workers x {args.threads // args.workers} threads: wall {ray_wall:.1f} s, "
        f"experiments {ray_seconds:.1f} s"
    )
    print(f"ratio ray/local: wall {ray_wall / local_wall:.3f}, experiments {ray_seconds / local_seconds:.3f}")
    print(f"results equal: {same}")
    if not same:
        sys.exit(1)


if __name__ == "__main__":
    main()
