"""Task vectors of a run directory: the ones `taskvec run` saved, and the missing ones computed.

Saved vectors live in `vectors/<model>/<task>/<spec>-seed<k>.safetensors` (docs/RUN_LAYOUT.md); the
seeds of one spec are averaged, as the experiments do. Vectors the analyses compute themselves go
to `cache/analysis/vectors/<model>/<task>/`, named by the settings that made them (a quick run's
vector of 4 prompts is never taken for a full one), so a rerun loads them instead of recomputing
and `vectors/` keeps only what the experiments produced.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from taskvec.analysis.prompt_sets import (
    Spec,
    demonstration_pool,
    icl_prompts,
    spec_modality,
    unsupported_reason,
)
from taskvec.analysis.similarity import VectorKey
from taskvec.models import ModelHandle
from taskvec.tasks import Task
from taskvec.vectors import (
    TaskVector,
    exemplar_vector,
    instruction_vector,
    load_task_vector,
    save_task_vector,
)
from taskvec.vectors.extract import mean_residual_at_marker

COMPUTED_VECTORS = Path("cache") / "analysis" / "vectors"


def saved_vector_files(root: Path, key: VectorKey) -> list[Path]:
    return sorted((root / key.model / key.task).glob(f"{key.spec}-seed*.safetensors"))


def computed_name(spec: Spec, *, shots: int, seed: int, prompt_limit: int | None) -> str:
    if spec == "instruction":
        return "instruction.safetensors"  # depends on nothing but the task and the model
    prompts = "all" if prompt_limit is None else str(prompt_limit)
    return f"{spec}-seed{seed}-shots{shots}-prompts{prompts}.safetensors"


def compute_vector(
    handle: ModelHandle, task: Task, spec: Spec, *, shots: int, seed: int, prompt_limit: int | None
) -> TaskVector:
    """The paper's vector for `spec`; with `prompt_limit`, averaged over that many prompts only."""
    if spec == "instruction":
        return instruction_vector(handle, task)
    modality = spec_modality(spec)
    if prompt_limit is None:
        return exemplar_vector(handle, task, shots=shots, seed=seed, modality=modality)
    queries = demonstration_pool(task)[:prompt_limit]
    prompts = icl_prompts(task, queries, modality=modality, shots=shots, seed=seed)
    vectors = mean_residual_at_marker(handle, prompts, occurrence=-2)
    metadata = {"model": handle.name, "task": task.name, "spec": spec, "shots": shots, "seed": seed}
    return TaskVector(vectors, {**metadata, "prompts": len(prompts), "quick": True})


def load_or_compute_vectors(
    handle: ModelHandle | None,
    tasks: Sequence[Task],
    run_dir: Path,
    *,
    model: str = "vlm",
    specs: Sequence[Spec] = ("text-icl", "image-icl", "instruction"),
    shots: int = 5,
    seed: int = 0,
    prompt_limit: int | None = None,
) -> tuple[dict[VectorKey, torch.Tensor], dict[str, dict[str, Any]]]:
    """Vectors [layers, hidden] per (model, task, spec), and where each came from.

    Without a handle only saved vectors are returned (e.g. base-LM vectors when the base LM is not
    loaded). A saved vector of another shape than the handle's model is ignored and recomputed.
    """
    vectors: dict[VectorKey, torch.Tensor] = {}
    sources: dict[str, dict[str, Any]] = {}
    for task in tasks:
        for spec in specs:
            key = VectorKey(model, task.name, spec)
            name = computed_name(spec, shots=shots, seed=seed, prompt_limit=prompt_limit)
            computed_path = run_dir / COMPUTED_VECTORS / model / task.name / name
            files = saved_vector_files(run_dir / "vectors", key)
            origin = "run"
            if not files and computed_path.is_file():
                files, origin = [computed_path], "computed by the analyses"
            loaded = [load_task_vector(path).vectors.float() for path in files]
            expected = (handle.num_layers, handle.hidden_size) if handle is not None else None
            if loaded and (expected is None or tuple(loaded[0].shape) == expected):
                vectors[key] = torch.stack(loaded).mean(dim=0)
                sources[key.label] = {"source": origin, "files": [str(p.relative_to(run_dir)) for p in files]}
                continue
            if handle is None or unsupported_reason(handle, task, spec) is not None:
                continue
            computed = compute_vector(handle, task, spec, shots=shots, seed=seed, prompt_limit=prompt_limit)
            save_task_vector(computed, computed_path)
            vectors[key] = computed.vectors.float()
            relative = str(computed_path.relative_to(run_dir))
            sources[key.label] = {"source": "computed by the analyses", "files": [relative]}
    return vectors, sources
