"""Task vectors of a run: extracted once, saved under DIR/vectors, loaded again on a rerun.

Exemplar vectors keep their per-prompt residuals too (DIR/cache/residuals), because the ensemble
curve averages subsets of prompts (see `exemplar_subset_vector`).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from taskvec.caching import StepCache, model_fingerprint, task_fingerprint
from taskvec.engine import marker_position, record_residuals
from taskvec.experiments.config import RunConfig
from taskvec.models import ModelHandle
from taskvec.prompts import DEFAULT_TEMPLATE, Modality, Prompt, encode_prompts
from taskvec.tasks import Task
from taskvec.vectors import TaskVector, icl_prompts, instruction_vector, load_task_vector
from taskvec.vectors.task_vector import save_task_vector

ModelRole = Literal["vlm", "llm"]
VectorSpec = Literal["text-icl", "image-icl", "instruction"]


def exemplar_prompts(
    task: Task, *, shots: int, seed: int, modality: Modality, style: str | None, limit: int | None
) -> list[Prompt]:
    """The paper's vector prompts: `shots` validation demonstrations, then a validation query.

    Sampled exactly as `taskvec.vectors.exemplar_vector` does, so with no limit the mean of these
    prompts' residuals is that function's vector; `limit` keeps the first queries only.
    """
    pool = task.split("val")
    return icl_prompts(pool, pool[:limit], shots=shots, seed=seed, modality=modality, style=style)


@torch.no_grad()
def residuals_per_prompt(
    handle: ModelHandle, prompts: Sequence[Prompt], *, batch_size: int, progress: str | None = None
) -> torch.Tensor:
    """[prompts, layers, hidden]: the residual at the last demonstration's answer marker."""
    rows = []
    starts = range(0, len(prompts), batch_size)
    for start in tqdm(starts, desc=progress, disable=progress is None, leave=False):
        inputs = encode_prompts(handle, prompts[start : start + batch_size])
        positions = torch.tensor(
            [
                [marker_position(handle.tokenizer, ids, DEFAULT_TEMPLATE.marker, -2)]
                for ids in inputs["input_ids"]
            ]
        )
        rows.append(record_residuals(handle, inputs, positions)[:, :, 0].float().cpu())
    return torch.cat(rows)


def exemplar_subset_vector(per_prompt: torch.Tensor, examples: int, shots: int, seed: int) -> torch.Tensor:
    """The exemplar vector of the ensemble curve built from `examples` demonstrations.

    What "n examples" means, read from the reference code (experiment_ensemble.sh and
    `postprocess_feats` in src/xpatch_evaluate.py of g-luo/task_vectors_are_cross_modal): the
    text-ICL residual of every validation prompt (each `shots` demonstrations + a query) is kept,
    and for n = shots * r the mean over r prompts drawn at random (seeded by the run's seed) is the
    exemplar vector. So n counts demonstrations over r separate 5-shot prompts (a demonstration may
    recur in two prompts), not one n-shot prompt; n=30 is 6 prompts. We draw the r prompts with
    `random.Random(seed).sample`, the same rule with Python's generator instead of numpy's.
    """
    if examples % shots:
        raise ValueError(f"{examples} examples is not a whole number of {shots}-shot prompts")
    count = examples // shots
    if not 1 <= count <= per_prompt.shape[0]:
        raise ValueError(
            f"{examples} examples need {count} prompts of {shots} shots; {per_prompt.shape[0]} were extracted"
        )
    chosen = random.Random(seed).sample(range(per_prompt.shape[0]), count)
    return per_prompt[chosen].mean(dim=0)


def ensemble_of(exemplar: torch.Tensor, instruction: torch.Tensor) -> torch.Tensor:
    """The paper's ensemble: the mean of an exemplar vector and an instruction vector."""
    return (exemplar + instruction) / 2


class VectorStore:
    """Vectors of one run, keyed by model, task, spec and seed; resumable from DIR/vectors."""

    def __init__(self, out_dir: Path, config: RunConfig, cache: StepCache, progress: bool = True) -> None:
        self.out_dir = out_dir
        self.config = config
        self.cache = cache
        self.progress = progress
        self.extracted = 0  # vectors computed (not loaded) in this process, for tests and logs
        self._fingerprints: dict[int, str] = {}
        self._memory: dict[tuple[str, str, str, int], tuple[TaskVector, str]] = {}

    def fingerprint(self, handle: ModelHandle) -> str:
        if id(handle) not in self._fingerprints:
            self._fingerprints[id(handle)] = model_fingerprint(handle)
        return self._fingerprints[id(handle)]

    def identity(self, handle: ModelHandle, task: Task, spec: VectorSpec, seed: int) -> dict[str, Any]:
        identity: dict[str, Any] = {
            "step": "vector",
            "model": self.fingerprint(handle),
            "task": task_fingerprint(task),
            "spec": spec,
        }
        if spec == "instruction":
            return identity
        return {
            **identity,
            "shots": self.config.shots,
            "seed": seed,
            "val_limit": self.config.val_limit,
            "style": self.config.style_for(task.name) if spec == "image-icl" else None,
            "template": [DEFAULT_TEMPLATE.query, DEFAULT_TEMPLATE.answer, DEFAULT_TEMPLATE.marker],
        }

    def vector_path(self, role: ModelRole, task: Task, spec: VectorSpec, seed: int) -> Path:
        return self.out_dir / "vectors" / role / task.name / f"{spec}-seed{seed}.safetensors"

    def residuals_path(self, role: ModelRole, task: Task, spec: VectorSpec, seed: int, key: str) -> Path:
        return self.cache.root / "residuals" / role / task.name / f"{spec}-seed{seed}-{key}.safetensors"

    def get(
        self, role: ModelRole, handle: ModelHandle, task: Task, spec: VectorSpec, seed: int = 0
    ) -> tuple[TaskVector, str]:
        """The vector and its cache key (which later steps fold into theirs)."""
        seed = 0 if spec == "instruction" else seed
        memo = (role, task.name, spec, seed)
        if memo in self._memory:
            return self._memory[memo]
        key = self.cache.key(self.identity(handle, task, spec, seed))
        path = self.vector_path(role, task, spec, seed)
        needs_residuals = spec != "instruction"
        if (
            path.is_file()
            and load_task_vector(path).metadata.get("cache_key") == key
            and (not needs_residuals or self.residuals_path(role, task, spec, seed, key).is_file())
        ):
            vector = load_task_vector(path)
        else:
            vector = self._extract(role, handle, task, spec, seed, key)
        self._memory[memo] = (vector, key)
        return vector, key

    def per_prompt(
        self, role: ModelRole, handle: ModelHandle, task: Task, spec: VectorSpec, seed: int
    ) -> Any:
        _, key = self.get(role, handle, task, spec, seed)
        return load_file(str(self.residuals_path(role, task, spec, seed, key)))["residuals"]

    def _extract(
        self, role: ModelRole, handle: ModelHandle, task: Task, spec: VectorSpec, seed: int, key: str
    ) -> TaskVector:
        self.extracted += 1
        if spec == "instruction":
            vector = instruction_vector(handle, task)
        else:
            modality: Modality = "image" if spec == "image-icl" else "text"
            style = self.config.style_for(task.name) if modality == "image" else None
            prompts = exemplar_prompts(
                task,
                shots=self.config.shots,
                seed=seed,
                modality=modality,
                style=style,
                limit=self.config.val_limit,
            )
            label = f"{role} {spec} {task.name} seed {seed}" if self.progress else None
            per_prompt = residuals_per_prompt(
                handle, prompts, batch_size=self.config.batch_size, progress=label
            )
            residuals = self.residuals_path(role, task, spec, seed, key)
            residuals.parent.mkdir(parents=True, exist_ok=True)
            save_file({"residuals": per_prompt.contiguous()}, str(residuals))
            vector = TaskVector(
                per_prompt.mean(dim=0),
                {
                    "model": handle.name,
                    "task": task.name,
                    "spec": spec,
                    "shots": self.config.shots,
                    "seed": seed,
                    "split": "val",
                    "prompts": len(prompts),
                    "style": style,
                    "position": f"last token of the last demonstration's {DEFAULT_TEMPLATE.marker!r}",
                    "template": {"query": DEFAULT_TEMPLATE.query, "answer": DEFAULT_TEMPLATE.answer},
                },
            )
        vector.metadata.update({"cache_key": key, "role": role, "seed": seed})
        save_task_vector(vector, self.vector_path(role, task, spec, seed))
        return vector
