"""What an analysis computes from, and how its steps are cached: `Analysis` and `AnalysisContext`.

An analysis is a name and a function of the context returning JSON-able data. The context holds
the models, tasks, chosen layer, vectors and settings given to `run_analyses`, and caches steps in
the run's `StepCache` under a key built from their content: the model's fingerprint (and the base
LM's when the step uses it), each involved task's fingerprint, the settings, the layer when the step
reads it, and a digest of the values of the vectors it reads. A changed weight, task file, setting,
layer or vector makes a new key, so a stale result is never served.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from taskvec.analysis.settings import AnalysisSettings
from taskvec.analysis.similarity import VectorKey
from taskvec.atomic_files import write_tensors_atomically
from taskvec.caching import (
    StepCache,
    model_fingerprint,
    read_tensor_file,
    task_fingerprint,
    warn_unusable,
)
from taskvec.engine.devices import to_cpu_float32
from taskvec.models import ModelHandle
from taskvec.tasks import Task

# The StepCache kind of the analyses' steps: DIR/cache/analysis/<step>/<key>.json (or .safetensors).
CACHE_KIND = "analysis"
# A step's tensors by name and its metadata (strings, as a safetensors header holds them).
StoredTensors = tuple[dict[str, torch.Tensor], dict[str, str]]


@dataclass(frozen=True)
class Analysis:
    """One analysis: `compute(context)` returns its JSON-able result, stored under `name`.

    `version` is part of every cache key of its steps: raise it when a change to `compute` makes
    earlier cached results wrong.
    """

    name: str
    compute: Callable[[AnalysisContext], Any]
    description: str = ""
    version: int = 1

    def __post_init__(self) -> None:
        if not self.name or "/" in self.name:
            raise ValueError(f"an analysis name must be non-empty without '/', got {self.name!r}")


def as_json(value: Any) -> Any:
    """The value as it reads back from JSON (tuples become lists); a TypeError if it is not JSON-able."""
    return json.loads(json.dumps(value))


def tensor_digest(tensor: torch.Tensor) -> str:
    """A hash of a tensor's shape and float32 values."""
    values = to_cpu_float32(tensor).contiguous()
    hasher = hashlib.sha256(str(tuple(values.shape)).encode())
    hasher.update(values.numpy().tobytes())
    return hasher.hexdigest()[:16]


@dataclass
class AnalysisContext:
    """Everything the analyses share; `results` holds those that already ran, by name."""

    handle: ModelHandle
    llm: ModelHandle | None
    tasks: tuple[Task, ...]
    layer: int
    vectors: Mapping[VectorKey, torch.Tensor]
    settings: AnalysisSettings
    cache: StepCache
    analysis: Analysis | None = None  # the analysis being run
    results: dict[str, Any] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)
    _fingerprints: dict[int, str] = field(default_factory=dict, repr=False)
    _digests: dict[VectorKey, str] = field(default_factory=dict, repr=False)

    def fingerprint(self, handle: ModelHandle) -> str:
        if id(handle) not in self._fingerprints:
            self._fingerprints[id(handle)] = model_fingerprint(handle)
        return self._fingerprints[id(handle)]

    def vector(self, key: VectorKey) -> torch.Tensor:
        """A [layers, hidden] vector given to the analyses, or an error naming it."""
        if key not in self.vectors:
            raise LookupError(f"the analyses were given no {key.label} vector ({key.model} model)")
        return self.vectors[key]

    def vectors_of(self, model: str) -> dict[VectorKey, torch.Tensor]:
        return {key: vector for key, vector in sorted(self.vectors.items()) if key.model == model}

    def identity(
        self,
        step: str,
        *,
        tasks: Sequence[Task] | None = None,
        layer: bool = True,
        vectors: Iterable[VectorKey] | None = None,
        llm: bool = True,
    ) -> dict[str, Any]:
        """What a step's result depends on. The defaults (every task, the layer, every vector, the
        base LM) suit any step; a step that reads less names what it reads, so it is reused more."""
        used = sorted(self.vectors if vectors is None else set(vectors))
        for key in used:
            if key not in self._digests:
                self._digests[key] = tensor_digest(self.vector(key))
        version = self.analysis.version if self.analysis is not None else 0
        return {
            "step": f"{CACHE_KIND}/{step}",
            "version": version,
            "model": self.fingerprint(self.handle),
            "llm": self.fingerprint(self.llm) if llm and self.llm is not None else None,
            "tasks": {task.name: task_fingerprint(task) for task in (self.tasks if tasks is None else tasks)},
            "settings": self.settings.as_dict(),
            "layer": self.layer if layer else None,
            "vectors": {key.label: self._digests[key] for key in used},
        }

    def cached(
        self,
        step: str,
        compute: Callable[[], Any],
        *,
        tasks: Sequence[Task] | None = None,
        layer: bool = True,
        vectors: Iterable[VectorKey] | None = None,
        llm: bool = True,
    ) -> Any:
        """The step's result from the cache, else computed (as JSON data) and stored."""
        key = self.cache.key(self.identity(step, tasks=tasks, layer=layer, vectors=vectors, llm=llm))
        stored = self.cache.load(CACHE_KIND, step, key, lambda entry: "result" in entry)
        if stored is not None:
            return stored["result"]
        result = as_json(compute())
        self.cache.store(CACHE_KIND, step, key, {"step": step, "result": result})
        return result

    def cached_tensors(
        self,
        step: str,
        compute: Callable[[], StoredTensors],
        *,
        usable: Callable[[StoredTensors], bool] = lambda stored: True,
        **scope: Any,
    ) -> StoredTensors:
        """`cached` for a step that produces tensors (and string metadata): kept as safetensors, so a
        later step reads exactly the values stored, bit for bit, whichever process computed them."""
        key = self.cache.key(self.identity(step, **scope))
        path = self.cache.tensor_path(CACHE_KIND, step, key)
        stored = read_tensor_file(path)
        if stored is not None and not usable(stored):
            warn_unusable(path, f"not a complete {step} entry")
            stored = None
        if stored is not None:
            self.cache.hits += 1
            return stored
        self.cache.misses += 1
        tensors, metadata = compute()
        write_tensors_atomically(path, tensors, metadata)
        return tensors, metadata

    def attempt(self, step: str, compute: Callable[[], Any], **scope: Any) -> Any | None:
        """`cached` (with the same keyword scope), but a failure is recorded under `errors[step]` and
        gives None: one part of an analysis (a task's lens, a pair's conflict) failing keeps the others."""
        try:
            return self.cached(step, compute, **scope)
        except Exception as error:  # one failed part must not lose the others
            self.errors[step] = f"{type(error).__name__}: {error}"
            return None
