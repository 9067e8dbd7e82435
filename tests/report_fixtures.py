"""A synthetic results.json following docs/RUN_LAYOUT.md (format 1), for report tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from taskvec.experiments.paper_numbers import paper_numbers

COLUMNS = ("no-context", "image-icl", "image-icl-patch", "text-icl-xbase", "text-icl-xpatch")


def _block(mean: float, tasks: list[str]) -> dict[str, Any]:
    return {"mean": mean, "std": 0.02, "per_task": {task: mean for task in tasks}}


def fake_results(tasks: list[str], num_layers: int, image: Path) -> dict[str, Any]:
    sweep = [round(0.1 + 0.5 * (1 - abs(i - num_layers / 2) / num_layers), 3) for i in range(num_layers)]
    return {
        "format": 1,
        "meta": {
            "model": "tiny-llava",
            "llm": "tiny-llama",
            "taskvec": "0.1.0",
            "packages": {"torch": "2.13.0"},
            "started": "2025-01-01T00:00:00+00:00",
            "seconds": 12.5,
            "quick": True,
            "config": {"shots": 5, "seeds": [0]},
        },
        "tasks": tasks,
        "layers": {
            "text-icl-xpatch": {
                "chosen": num_layers // 2,
                "validation_mean": sweep,
                "validation_per_task": {},
            },
            "image-icl-patch": {"chosen": 1, "validation_mean": sweep[::-1], "validation_per_task": {}},
        },
        "results": [
            {
                "model": "vlm",
                "condition": "text-icl-xpatch",
                "task": tasks[0],
                "seed": 0,
                "layer": 1,
                "metric": "prefix",
                "accuracy": 0.5,
                "n": 3,
            },
        ],
        "tables": {
            "paper": {column: _block(0.1 * i, tasks) for i, column in enumerate(COLUMNS)},
            "directions": {
                d: _block(0.3, tasks) for d in ("text->text", "text->image", "image->image", "image->text")
            },
            "llm_to_vlm": {
                "vlm_vectors": _block(0.3, tasks),
                "llm_vectors": _block(0.35, tasks),
                "cosine_per_layer": [0.9] * num_layers,
                "cosine_at_chosen_layer": 0.9,
            },
            "instruction": {
                "instruction_patch": _block(0.2, tasks),
                "instruction_prompt": _block(0.25, tasks),
            },
            "ensemble": {"examples": [0, 5, 10], "exemplar": [0.0, 0.3, 0.4], "ensemble": [0.2, 0.4, 0.45]},
        },
        "examples": [
            {
                "task": tasks[0],
                "condition": "text-icl-xpatch",
                "input": "France",
                "image": str(image),
                "expected": "Paris",
                "generated": "Paris",
            },
            {
                "task": tasks[0],
                "condition": "no-context",
                "input": "Japan",
                "image": None,
                "expected": "Tokyo",
                "generated": "<b>not html</b>",
            },
        ],
        "paper_numbers": paper_numbers(),
    }
