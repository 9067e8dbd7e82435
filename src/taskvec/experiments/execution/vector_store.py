"""Task vectors of a run: extracted once, saved under DIR/vectors, loaded again on a rerun.

Exemplar vectors keep their per-prompt residuals too (DIR/cache/residuals), because the ensemble
curve averages subsets of prompts (see `exemplar_subset_vector`).
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any, Literal

import torch

from taskvec.atomic_files import write_tensors_atomically
from taskvec.caching import (
    StepCache,
    model_fingerprint,
    read_tensors,
    task_fingerprint,
    tensors_readable,
    warn_unusable,
)
from taskvec.experiments.config import RunConfig
from taskvec.experiments.protocol.conditions import heads_used
from taskvec.function_vectors import find_function_vector
from taskvec.models import ModelHandle
from taskvec.prompts import as_template
from taskvec.tasks import Task
from taskvec.vectors import (
    TaskVector,
    VectorFileError,
    VectorSpec,
    extract_vector,
    load_task_vector,
    parse_spec,
)
from taskvec.vectors.task_vector import save_task_vector

# Which model of the run a vector is read from: the model under study, or its base language model.
ModelRole = Literal["vlm", "llm"]


def _extractable(spec: VectorSpec | str) -> VectorSpec:
    kind = parse_spec(spec)
    if not kind.extractable:
        raise ValueError(f"the vector store keeps extracted vectors only, not {kind.value!r}")
    return kind


def _from_demonstrations(spec: VectorSpec | str) -> VectorSpec:
    kind = parse_spec(spec)
    if kind not in (VectorSpec.TEXT_ICL, VectorSpec.IMAGE_ICL):
        raise ValueError(
            f"function vectors come from demonstrations (text-icl or image-icl), not {kind.value!r}"
        )
    return kind


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
    """Vectors of one run, keyed by model, task, spec and seed; resumable from DIR/vectors.

    Specs are the extractable `VectorSpec`s (text ICL, image ICL, instruction); a spec's string
    value is accepted too. Extraction itself is `taskvec.vectors.extract_vector`.
    """

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

    def _style(self, task: Task, spec: VectorSpec) -> str | None:
        return self.config.style_for(task.name) if spec is VectorSpec.IMAGE_ICL else None

    def identity(self, handle: ModelHandle, task: Task, spec: VectorSpec | str, seed: int) -> dict[str, Any]:
        kind = _extractable(spec)
        identity: dict[str, Any] = {
            "step": "vector",
            "model": self.fingerprint(handle),
            "task": task_fingerprint(task),
            "spec": kind.value,
        }
        template = as_template(self.config.template)
        if kind is VectorSpec.INSTRUCTION:
            # The chat template changes the instruction's tokens; qa keys stay what they were.
            return {**identity, "template": template.cache_key()} if template.chat else identity
        return {
            **identity,
            "shots": self.config.shots,
            "seed": seed,
            "val_limit": self.config.val_limit,
            "style": self._style(task, kind),
            "template": template.cache_key(),
        }

    def vector_path(self, role: ModelRole, task: Task, spec: VectorSpec | str, seed: int) -> Path:
        kind = _extractable(spec)
        return self.out_dir / "vectors" / role / task.name / f"{kind.value}-seed{seed}.safetensors"

    def residuals_path(
        self, role: ModelRole, task: Task, spec: VectorSpec | str, seed: int, key: str
    ) -> Path:
        kind = _extractable(spec)
        return self.cache.root / "residuals" / role / task.name / f"{kind.value}-seed{seed}-{key}.safetensors"

    def get(
        self, role: ModelRole, handle: ModelHandle, task: Task, spec: VectorSpec | str, seed: int = 0
    ) -> tuple[TaskVector, str]:
        """The vector and its cache key (which later steps fold into theirs)."""
        kind = _extractable(spec)
        seed = 0 if kind is VectorSpec.INSTRUCTION else seed
        memo = (role, task.name, kind.value, seed)
        if memo in self._memory:
            return self._memory[memo]
        key = self.cache.key(self.identity(handle, task, kind, seed))
        path = self.vector_path(role, task, kind, seed)
        needs_residuals = kind is not VectorSpec.INSTRUCTION
        cached = _cached_vector(path, key)
        if cached is not None and (
            not needs_residuals or tensors_readable(self.residuals_path(role, task, kind, seed, key))
        ):
            vector = cached
        else:
            vector = self._extract(role, handle, task, kind, seed, key)
        self._memory[memo] = (vector, key)
        return vector, key

    def has(
        self, role: ModelRole, handle: ModelHandle, task: Task, spec: VectorSpec | str, seed: int
    ) -> bool:
        """Whether `get` would read this vector from the run directory instead of extracting it."""
        kind = _extractable(spec)
        seed = 0 if kind is VectorSpec.INSTRUCTION else seed
        if (role, task.name, kind.value, seed) in self._memory:
            return True
        key = self.cache.key(self.identity(handle, task, kind, seed))
        if _cached_vector(self.vector_path(role, task, kind, seed), key) is None:
            return False
        residuals = self.residuals_path(role, task, kind, seed, key)
        return kind is VectorSpec.INSTRUCTION or tensors_readable(residuals)

    def add(
        self,
        role: ModelRole,
        task: Task,
        spec: VectorSpec | str,
        seed: int,
        vector: TaskVector,
        per_prompt: torch.Tensor | None,
    ) -> None:
        """Keep a vector extracted elsewhere (a Ray worker) as if `get` had extracted it here."""
        kind = _extractable(spec)
        seed = 0 if kind is VectorSpec.INSTRUCTION else seed
        key = vector.metadata["cache_key"]
        if per_prompt is not None:
            residuals = self.residuals_path(role, task, kind, seed, key)
            write_tensors_atomically(residuals, {"residuals": per_prompt})
        save_task_vector(vector, self.vector_path(role, task, kind, seed))

    def per_prompt(
        self, role: ModelRole, handle: ModelHandle, task: Task, spec: VectorSpec | str, seed: int
    ) -> Any:
        """[prompts, layers, hidden]: the residuals an exemplar vector is the mean of (extracted again
        when their file cannot be read)."""
        kind = _extractable(spec)
        _, key = self.get(role, handle, task, kind, seed)
        path = self.residuals_path(role, task, kind, seed, key)
        stored = read_tensors(path)
        if stored is not None and "residuals" not in stored:
            warn_unusable(path, "no 'residuals' tensor")
        if stored is None or "residuals" not in stored:
            vector = self._extract(role, handle, task, kind, seed, key)
            self._memory[(role, task.name, kind.value, seed)] = (vector, key)
            stored = read_tensors(path)
            if stored is None:
                raise OSError(f"{path}: the residuals just written cannot be read back")
        return stored["residuals"]

    # ---- function vectors ----------------------------------------------------------------------
    def function_vector_identity(
        self, handle: ModelHandle, task: Task, spec: VectorSpec | str, seed: int
    ) -> dict[str, Any]:
        kind = _from_demonstrations(spec)
        config = self.config
        return {
            "step": "function-vector",
            "model": self.fingerprint(handle),
            "task": task_fingerprint(task),
            "spec": kind.value,
            "shots": config.fv_shots,
            "mean_prompts": config.fv_mean_prompts,
            "effect_prompts": config.fv_effect_prompts,
            "k": heads_used(handle, config.fv_heads),
            "seed": seed,
            "style": self._style(task, kind),
            "template": as_template(config.template).cache_key(),
        }

    def function_vector_path(self, role: ModelRole, task: Task, spec: VectorSpec | str, seed: int) -> Path:
        kind = _from_demonstrations(spec)
        return self.out_dir / "vectors" / role / task.name / f"fv-{kind.value}-seed{seed}.safetensors"

    def function_vector(
        self, role: ModelRole, handle: ModelHandle, task: Task, spec: VectorSpec | str, seed: int
    ) -> tuple[TaskVector, str]:
        """The function vector (the same [hidden] at every layer, heads and effects in its metadata)
        of `spec`'s demonstrations, and its cache key."""
        kind = _from_demonstrations(spec)
        memo = (role, task.name, f"fv-{kind.value}", seed)
        if memo in self._memory:
            return self._memory[memo]
        key = self.cache.key(self.function_vector_identity(handle, task, kind, seed))
        vector = _cached_vector(self.function_vector_path(role, task, kind, seed), key)
        if vector is None:
            vector = self._find_function_vector(role, handle, task, kind, seed, key)
        self._memory[memo] = (vector, key)
        return vector, key

    def has_function_vector(
        self, role: ModelRole, handle: ModelHandle, task: Task, spec: VectorSpec | str, seed: int
    ) -> bool:
        kind = _from_demonstrations(spec)
        if (role, task.name, f"fv-{kind.value}", seed) in self._memory:
            return True
        key = self.cache.key(self.function_vector_identity(handle, task, kind, seed))
        return _cached_vector(self.function_vector_path(role, task, kind, seed), key) is not None

    def add_function_vector(
        self, role: ModelRole, task: Task, spec: VectorSpec | str, seed: int, vector: TaskVector
    ) -> None:
        """Keep a function vector found elsewhere (a Ray worker) as if found here."""
        save_task_vector(vector, self.function_vector_path(role, task, spec, seed))

    def _find_function_vector(
        self, role: ModelRole, handle: ModelHandle, task: Task, spec: VectorSpec, seed: int, key: str
    ) -> TaskVector:
        self.extracted += 1
        config = self.config
        found = find_function_vector(
            handle,
            task,
            spec,
            shots=config.fv_shots,
            mean_prompts=config.fv_mean_prompts,
            effect_prompts=config.fv_effect_prompts,
            k=heads_used(handle, config.fv_heads),
            seed=seed,
            split="val",
            style=self._style(task, spec),
            template=config.template,
            batch_size=config.batch_size,
            memory_budget=config.sweep_memory,
            progress=self.progress,
        )
        vector = found.as_task_vector(handle.num_layers)
        vector.metadata.update(
            {"effects": found.effects.tolist(), "cache_key": key, "role": role, "seed": seed}
        )
        save_task_vector(vector, self.function_vector_path(role, task, spec, seed))
        return vector

    def _extract(
        self, role: ModelRole, handle: ModelHandle, task: Task, spec: VectorSpec, seed: int, key: str
    ) -> TaskVector:
        self.extracted += 1
        label = f"{role} {spec.value} {task.name} seed {seed}" if self.progress else None
        extraction = extract_vector(
            handle,
            task,
            spec,
            shots=self.config.shots,
            seed=seed,
            split="val",
            limit=self.config.val_limit,
            style=self._style(task, spec),
            batch_size=self.config.batch_size,
            progress=label,
            template=self.config.template,
        )
        if extraction.per_prompt is not None:
            residuals = self.residuals_path(role, task, spec, seed, key)
            write_tensors_atomically(residuals, {"residuals": extraction.per_prompt})
        vector = extraction.vector
        vector.metadata.update({"cache_key": key, "role": role, "seed": seed})
        save_task_vector(vector, self.vector_path(role, task, spec, seed))
        return vector


def _cached_vector(path: Path, key: str) -> TaskVector | None:
    """The vector file of this step, if it exists, reads and was made for it; a stale file (an old
    key) is extracted again, and so is an unreadable one, with a warning naming it."""
    if not path.is_file():
        return None
    try:
        vector = load_task_vector(path)
    except VectorFileError as error:
        warn_unusable(path, str(error).removeprefix(f"{path}: "))
        return None
    return vector if vector.metadata.get("cache_key") == key else None
