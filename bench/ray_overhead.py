"""Benchmark: Ray's scheduling overhead on `taskvec run --quick` at equal total threads.

The same quick run on the default VLM twice, each into a fresh directory: in one process with
--threads T, then with --ray --workers W (a local cluster; T // W threads per worker). Both wall
times (the whole command: loading, cluster start) and the experiments' own time (results.json
meta.seconds) are printed with their ratio, and the two results.json are checked equal apart from
timing and step counts (floats within 1e-5: see `_close`).

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
FLOAT_TOLERANCE = 1e-5


def _run(out: Path, threads: int, extra: list[str]) -> tuple[float, dict[str, Any]]:
    command = [sys.executable, "-m", "taskvec.cli", "run", "--quick", "--no-analyses", "--quiet"]
    command += ["--threads", str(threads), "--out", str(out), *extra]
    start = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - start
    return wall, json.loads((out / "results.json").read_text())


def _close(a: Any, b: Any, tolerance: float) -> bool:
    """Equal, numbers within `tolerance`: a worker's single thread sums floats in another order than
    two threads do, which moves the function vectors' head effects in their sixth decimal."""
    if isinstance(a, float) or isinstance(b, float):
        return isinstance(a, (int, float)) and isinstance(b, (int, float)) and abs(a - b) <= tolerance
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_close(a[k], b[k], tolerance) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_close(x, y, tolerance) for x, y in zip(a, b, strict=True))
    return bool(a == b)


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
    close = _close(_comparable(local), _comparable(on_ray), FLOAT_TOLERANCE)
    local_seconds, ray_seconds = local["meta"]["seconds"], on_ray["meta"]["seconds"]
    print(f"local, {args.threads} threads: wall {local_wall:.1f} s, experiments {local_seconds:.1f} s")
    print(
        f"ray, {args.workers} workers x {args.threads // args.workers} threads: wall {ray_wall:.1f} s, "
        f"experiments {ray_seconds:.1f} s"
    )
    print(f"ratio ray/local: wall {ray_wall / local_wall:.3f}, experiments {ray_seconds / local_seconds:.3f}")
    print(f"results equal: {same}; equal within {FLOAT_TOLERANCE:g} for floats: {close}")
    if not close:
        sys.exit(1)


if __name__ == "__main__":
    main()
