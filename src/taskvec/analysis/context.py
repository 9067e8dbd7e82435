"""What an analysis computes from, and how its steps are cached: `Analysis` and `AnalysisContext`.

An analysis is a name, a function of the context returning its typed result (a dataclass that
`taskvec.typed_json` writes and reads), and how it splits into worker steps. The context holds
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
from typing import Any, Generic, TypeVar, cast

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
from taskvec.typed_json import from_json, to_json

# The StepCache kind of the analyses' steps: DIR/cache/analysis/<step>/<key>.json (or .safetensors).
CACHE_KIND = "analysis"
# A step's tensors by name and its metadata (strings, as a safetensors header holds them).
StoredTensors = tuple[dict[str, torch.Tensor], dict[str, str]]


R = TypeVar("R")
S = TypeVar("S")
# How an analysis splits into worker steps: the groups of tasks each step covers.
TaskGroups = Callable[[Sequence[Task]], list[list[Task]]]


@dataclass(frozen=True)
class Analysis(Generic[R]):
    """One analysis: `compute(context)` returns its result, an instance of `result_type`, stored
    under `name` (analysis.json holds it as `taskvec.typed_json` writes it).

    `version` is part of every cache key of its steps: raise it when a change to `compute` makes
    earlier cached results wrong. `worker_steps` says how a distributed run splits it: one worker
    step per group of tasks it returns (a task's lens, a pair's conflict); None keeps the analysis
    on the driver (it is cheap, or reads other analyses' results).
    """

    name: str
    compute: Callable[[AnalysisContext], R]
    result_type: type[R]
    description: str = ""
    version: int = 1
    worker_steps: TaskGroups | None = None

    def __post_init__(self) -> None:
        if not self.name or "/" in self.name:
            raise ValueError(f"an analysis name must be non-empty without '/', got {self.name!r}")

    def decode(self, data: Any, path: str = "") -> R:
        """The result of `to_json` data; a ValueError naming the field when it does not fit."""
        return from_json(self.result_type, data, path or self.name)

    def holds(self, value: object) -> R | None:
        """`value` as this analysis's result, or None when it is something else."""
        return cast(R, value) if isinstance(value, self.result_type) else None


def with_analysis(analyses: Sequence[Analysis[Any]], analysis: Analysis[Any]) -> tuple[Analysis[Any], ...]:
    """The list with `analysis` in place of the one of its name, or after the others when none has it
    (so running the same notebook cell twice gives the same list)."""
    names = [existing.name for existing in analyses]
    if analysis.name in names:
        index = names.index(analysis.name)
        return (*analyses[:index], analysis, *analyses[index + 1 :])
    return (*analyses, analysis)


def _decodes(result_type: type[Any]) -> Callable[[dict[str, Any]], bool]:
    def usable(entry: dict[str, Any]) -> bool:
        try:
            from_json(result_type, entry.get("result"))
        except (ValueError, TypeError):
            return False
        return True

    return usable


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
    analysis: Analysis[Any] | None = None  # the analysis being run
    results: dict[str, object] = field(default_factory=dict)  # typed results by analysis name
    errors: dict[str, str] = field(default_factory=dict)
    _fingerprints: dict[int, str] = field(default_factory=dict, repr=False)
    _digests: dict[VectorKey, str] = field(default_factory=dict, repr=False)

    def fingerprint(self, handle: ModelHandle) -> str:
        if id(handle) not in self._fingerprints:
            self._fingerprints[id(handle)] = model_fingerprint(handle)
        return self._fingerprints[id(handle)]

    def earlier(self, analysis: Analysis[S]) -> S:
        """The result of an analysis that ran before this one; a LookupError when it did not finish."""
        result = analysis.holds(self.results.get(analysis.name))
        if result is None:
            raise LookupError(f"needs the {analysis.name!r} analysis, which did not finish")
        return result

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
        compute: Callable[[], S],
        result_type: type[S],
        *,
        tasks: Sequence[Task] | None = None,
        layer: bool = True,
        vectors: Iterable[VectorKey] | None = None,
        llm: bool = True,
    ) -> S:
        """The step's `result_type` result from the cache, else computed and stored (as JSON). An
        entry that does not read back as `result_type` is computed again."""
        key = self.cache.key(self.identity(step, tasks=tasks, layer=layer, vectors=vectors, llm=llm))
        stored = self.cache.load(CACHE_KIND, step, key, _decodes(result_type))
        if stored is not None:
            return from_json(result_type, stored["result"], step)
        result = compute()
        data = json.loads(json.dumps(to_json(result)))  # a TypeError here if it is not JSON-able
        self.cache.store(CACHE_KIND, step, key, {"step": step, "result": data})
        return from_json(result_type, data, step)

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

    def attempt(self, step: str, compute: Callable[[], S], result_type: type[S], **scope: Any) -> S | None:
        """`cached` (with the same keyword scope), but a failure is recorded under `errors[step]` and
        gives None: one part of an analysis (a task's lens, a pair's conflict) failing keeps the others."""
        try:
            return self.cached(step, compute, result_type, **scope)
        except Exception as error:  # one failed part must not lose the others
            self.errors[step] = f"{type(error).__name__}: {error}"
            return None
