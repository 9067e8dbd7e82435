"""A tiny run's inputs: a country-capital task file with images, a tiny LLaVA and its base LM."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import transformers
from conftest import random_image
from safetensors.torch import load_file

from taskvec.experiments import RunConfig
from taskvec.function_vectors import FunctionVectorSettings
from taskvec.models import ModelHandle
from taskvec.prompts.settings import PromptSettings

PAIRS = [
    ("France", "Paris"),
    ("Japan", "Tokyo"),
    ("Italy", "Rome"),
    ("Spain", "Madrid"),
    ("Egypt", "Cairo"),
    ("Peru", "Lima"),
    ("Germany", "Berlin"),
    ("China", "Beijing"),
    ("India", "Delhi"),
    ("Kenya", "Nairobi"),
    ("Canada", "Ottawa"),
    ("Brazil", "Brasilia"),
    ("Greece", "Athens"),
]


def write_task_file(directory: Path) -> Path:
    """country-capital.jsonl: 7 validation and 6 test items with images; borrows the built-in instruction."""
    directory.mkdir(parents=True, exist_ok=True)
    lines = []
    for index, (country, capital) in enumerate(PAIRS):
        random_image(index).save(directory / f"{country}.png")
        split = "val" if index < 7 else "test"
        lines.append(
            json.dumps({"input": country, "output": capital, "image": f"{country}.png", "split": split})
        )
    path = directory / "country-capital.jsonl"
    path.write_text("\n".join(lines))
    return path


COLOURS = (
    "blue",
    "red",
    "green",
    "yellow",
    "black",
    "white",
    "orange",
    "purple",
    "pink",
    "brown",
    "grape",
    "cat",
    "dog",
)


def write_shared_input_task_file(directory: Path) -> Path:
    """country-currency.jsonl over the same countries and images as `write_task_file` (words of the tiny
    vocabulary as answers; the built-in name lends it an instruction), so two tasks share inputs."""
    write_task_file(directory)
    lines = [
        json.dumps(
            {
                "input": country,
                "output": COLOURS[index],
                "image": f"{country}.png",
                "split": "val" if index < 7 else "test",
            }
        )
        for index, (country, _) in enumerate(PAIRS)
    ]
    path = directory / "country-currency.jsonl"
    path.write_text("\n".join(lines))
    return path


def tiny_base_lm(vlm: ModelHandle) -> ModelHandle:
    """The tiny LLaVA's own language model as a causal LM: the shape of a real LLM -> VLM pair."""
    config = vlm.model.config.text_config  # type: ignore[union-attr]
    lm = transformers.LlamaForCausalLM(config).eval()
    lm.model.load_state_dict(vlm.model.model.language_model.state_dict())  # type: ignore[union-attr]
    lm.lm_head.load_state_dict(vlm.model.lm_head.state_dict())  # type: ignore[union-attr]
    return ModelHandle.wrap(lm, vlm.tokenizer, name="tiny-llava-base")


def tiny_config(task_file: Path, **changes: Any) -> RunConfig:
    options: dict[str, Any] = {
        "tasks": (str(task_file),),
        "seeds": (0, 1),
        "prompts": PromptSettings(shots=2, batch_size=4),
        "ensemble_examples": (0, 2, 4),
        "max_new_tokens": 2,
        # Function vectors from 2-shot prompts, ranked on a few prompts: the tiny task has 7
        # validation items.
        "function_vector": FunctionVectorSettings(
            shots=2, mean_prompts=4, effect_prompts=3, scales=(1.0, 4.0)
        ),
    }
    options.update(changes)
    return RunConfig(**options)


def untimed_results(run_dir: Path) -> dict[str, Any]:
    """results.json without what measures time (when the run started, how long it and each of its
    engine checks took, how many steps it computed rather than read): what two runs of the same
    inputs must agree on, wherever and however often their steps ran."""
    results: dict[str, Any] = json.loads((run_dir / "results.json").read_text())
    for field in ("started", "seconds", "steps"):
        results["meta"].pop(field)
    for checks in results.get("engine_checks", []):
        checks.pop("seconds")
        for row in checks["rows"]:
            row.pop("seconds")
    return results


def comparable_run(out: Path) -> dict[str, Any]:
    """What a run leaves that must not depend on where, or in which order, its steps ran: results.json
    untimed, every vector file's tensors, every cached sweep and test step, the residuals files kept."""
    vectors = {
        str(path.relative_to(out)): {name: tensor.tolist() for name, tensor in load_file(path).items()}
        for path in sorted(out.glob("vectors/**/*.safetensors"))
    }
    steps = {
        str(path.relative_to(out)): json.loads(path.read_text())
        for kind in ("sweeps", "test")
        for path in sorted((out / "cache" / kind).glob("**/*.json"))
    }
    residuals = sorted(str(path.relative_to(out)) for path in out.glob("cache/residuals/**/*.safetensors"))
    return {"results": untimed_results(out), "vectors": vectors, "steps": steps, "residuals": residuals}
