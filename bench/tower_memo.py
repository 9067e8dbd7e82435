"""Benchmark: `taskvec run --quick` on the default VLM with and without the tower's remembered pictures.

The default VLM's tower runs EfficientNet-Lite0 on every picture of every image prompt. A run shows
the same task pictures again and again (every demonstration set, seed and condition, every patched
row of a sweep or a head-effect pass), so the tower remembers each picture's tokens by content
(`vision_tower.REMEMBERED_PICTURES`). This times the quick run both ways in one process (the naive
way first, so any warm-up favours it) and checks the two results.json give the same numbers.

    python bench/tower_memo.py
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from taskvec.experiments import RunConfig, run_experiments
from taskvec.models import load_model
from taskvec.vlm.vision_tower import ImagenetColourTower


@contextmanager
def nothing_remembered() -> Iterator[None]:
    remembered = ImagenetColourTower._remembered_tokens
    ImagenetColourTower._remembered_tokens = ImagenetColourTower._tokens  # type: ignore[method-assign]
    try:
        yield
    finally:
        ImagenetColourTower._remembered_tokens = remembered  # type: ignore[method-assign]


def numbers(results_json: Path) -> list[tuple[Any, ...]]:
    rows = json.loads(results_json.read_text())["results"]
    return sorted(
        (row["condition"], row["task"], row["seed"], row["metric"], row["accuracy"], row.get("layer"))
        for row in rows
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    config = RunConfig.quick_preset()
    vlm, llm = load_model("default-vlm"), load_model("default")
    seconds: dict[str, float] = {}
    found: dict[str, list[tuple[Any, ...]]] = {}
    with tempfile.TemporaryDirectory() as scratch:
        for label in ("every picture through lite0", "remembered pictures"):
            out = Path(scratch) / label.replace(" ", "-")
            started = time.perf_counter()
            if label.startswith("every"):
                with nothing_remembered():
                    run_experiments(vlm, config, out, llm=llm, progress=False)
            else:
                run_experiments(vlm, config, out, llm=llm, progress=False)
            seconds[label] = time.perf_counter() - started
            found[label] = numbers(out / "results.json")
            print(f"{label}: {seconds[label]:.1f} s", flush=True)
    naive, remembered = seconds.values()
    same = found["every picture through lite0"] == found["remembered pictures"]
    print(f"quick run: {naive:.1f} s -> {remembered:.1f} s, {naive / remembered:.2f}x faster")
    print(f"results equal: {same} ({len(found['remembered pictures'])} rows)")


if __name__ == "__main__":
    main()
