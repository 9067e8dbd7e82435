"""`run_analyses`: every analysis over a run directory, resumable, into `analysis.json`.

Each step's result is cached as JSON in `cache/analysis/<step>.json` together with the settings it
was computed with; a rerun with the same settings loads it, so an interrupted run resumes and a
finished one is rewritten in seconds. A step that fails is recorded under `errors` and the others
still run: the report shows what exists and says what is missing.
"""

from __future__ import annotations

import functools
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

import taskvec
from taskvec.analysis.conflict import ConflictContext, conflict_totals, shared_input_pairs, task_conflict
from taskvec.analysis.embedding_map import ProjectionMethod, collect_prompt_points, embedding_map
from taskvec.analysis.lens_phases import lens_phases, mean_peak_layers
from taskvec.analysis.prompt_sets import Spec, unsupported_reason
from taskvec.analysis.run_files import StepCache, chosen_layer
from taskvec.analysis.run_vectors import load_or_compute_vectors
from taskvec.analysis.similarity import VectorKey, similarity_analysis
from taskvec.analysis.vector_tokens import decode_vectors
from taskvec.models import ModelHandle
from taskvec.tasks import Task


@dataclass(frozen=True)
class AnalysisSettings:
    lens_prompts: int = 100
    map_prompts_per_task: int = 30
    conflict_items: int = 50
    vector_prompts: int | None = None  # None: the paper's protocol (every validation prompt)
    shots: int = 5
    seed: int = 0
    projection: ProjectionMethod = "tsne"
    top_k: int = 5
    batch_size: int = 4


QUICK = AnalysisSettings(lens_prompts=4, map_prompts_per_task=4, conflict_items=4, vector_prompts=4, top_k=3)


@dataclass
class _Analysis:
    """Everything the steps share: models, tasks, layer, settings and the vectors once loaded."""

    handle: ModelHandle
    llm: ModelHandle | None
    tasks: Sequence[Task]
    root: Path
    layer: int
    config: AnalysisSettings
    vectors: dict[VectorKey, torch.Tensor] = field(default_factory=dict)
    sources: dict[str, dict[str, Any]] = field(default_factory=dict)

    def load_vectors(self) -> None:
        config = self.config
        vectors, found = load_or_compute_vectors(
            self.handle, self.tasks, self.root, shots=config.shots, seed=config.seed,
            prompt_limit=config.vector_prompts,
        )  # fmt: skip
        # The base LM gives text-ICL vectors only: LLM -> VLM transfers text-derived vectors.
        llm_vectors, llm_found = load_or_compute_vectors(
            self.llm, self.tasks, self.root, model="llm", specs=("text-icl",), shots=config.shots,
            seed=config.seed, prompt_limit=config.vector_prompts,
        )  # fmt: skip
        self.vectors = {**vectors, **llm_vectors}
        self.sources = {**found, **llm_found}

    def lens(self, task: Task) -> dict[str, Any]:
        config = self.config
        return lens_phases(
            self.handle,
            task,
            max_prompts=config.lens_prompts,
            shots=config.shots,
            seed=config.seed,
            batch_size=config.batch_size,
        ).as_dict()

    def similarity(self) -> dict[str, Any]:
        return similarity_analysis(self.vectors, self.layer)

    def decoded_tokens(self) -> dict[str, Any]:
        """Top tokens per layer of every vector, each decoded by the model it came from."""
        decoded: dict[str, Any] = {}
        for model, owner in (("vlm", self.handle), ("llm", self.llm)):
            mine = {key.label: vector for key, vector in self.vectors.items() if key.model == model}
            if owner is not None and mine:
                decoded[model] = decode_vectors(owner, mine, self.config.top_k)
        return decoded

    def embedding_map(self) -> dict[str, Any]:
        # A spec enters the map only if every task has it, so the clusters compare like with like.
        specs: list[Spec] = [
            spec
            for spec in ("text-icl", "image-icl")
            if all(unsupported_reason(self.handle, task, spec) is None for task in self.tasks)
        ]
        points = collect_prompt_points(
            self.handle,
            self.tasks,
            self.layer,
            specs=specs,
            prompts_per_task=self.config.map_prompts_per_task,
            shots=self.config.shots,
            seed=self.config.seed,
            batch_size=self.config.batch_size,
        )
        return embedding_map(points, self.config.projection, self.config.seed)

    def conflict(self, task_a: Task, task_b: Task, context: ConflictContext) -> dict[str, Any]:
        return task_conflict(
            self.handle,
            task_a,
            task_b,
            self.vectors[VectorKey("vlm", task_b.name, "text-icl")],
            self.layer,
            context=context,
            max_items=self.config.conflict_items,
            shots=self.config.shots,
            seed=self.config.seed,
        ).as_dict()

    def steps(self) -> list[tuple[str, Callable[[], Any]]]:
        steps: list[tuple[str, Callable[[], Any]]] = [
            (f"lens-{task.name}", functools.partial(self.lens, task)) for task in self.tasks
        ]
        steps += [
            ("similarity", self.similarity),
            ("decoded-tokens", self.decoded_tokens),
            ("embedding-map", self.embedding_map),
        ]
        for task_a, task_b in shared_input_pairs(self.tasks):
            contexts: list[ConflictContext] = (
                ["text-icl", "instruction"] if task_a.instruction else ["text-icl"]
            )
            steps += [
                (
                    f"conflict-{context}-{task_a.name}--{task_b.name}",
                    functools.partial(self.conflict, task_a, task_b, context),
                )
                for context in contexts
            ]
        return steps


def run_analyses(
    handle: ModelHandle,
    tasks: Sequence[Task],
    run_dir: str | Path,
    *,
    llm: ModelHandle | None = None,
    quick: bool = False,
    progress: bool = True,
    settings: AnalysisSettings | None = None,
) -> dict[str, Any]:
    """Lens phases, similarity, 2-D maps, decoded vector tokens and task conflict -> `analysis.json`.

    The layer is the one the experiments chose (results.json), else the middle layer. Vectors come
    from `vectors/` and are computed when missing. `quick` uses a few prompts per analysis (tests).
    """
    started = time.monotonic()
    root = Path(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    config = settings or (QUICK if quick else AnalysisSettings())
    layer, layer_source = chosen_layer(root, handle.num_layers)
    fingerprint = {
        "settings": asdict(config),
        "layer": layer,
        "model": handle.name,
        "llm": llm.name if llm else None,
        "tasks": [task.name for task in tasks],
    }
    cache = StepCache(root / "cache" / "analysis", fingerprint)
    analysis = _Analysis(handle, llm, tasks, root, layer, config)
    errors: dict[str, str] = {}
    results: dict[str, Any] = {}
    steps: list[tuple[str, Callable[[], Any]]] = [("vectors", analysis.load_vectors), *analysis.steps()]
    for name, compute in tqdm(steps, desc="analyses", disable=not progress):
        try:
            if name == "vectors":
                compute()  # vectors are cached as safetensors files, not in the JSON cache
            else:
                results[name] = cache.get_or_run(name, compute)
        except Exception as error:  # one failed analysis must not lose the others
            errors[name] = f"{type(error).__name__}: {error}"
            if progress:
                tqdm.write(f"analysis step {name} failed: {errors[name]}")

    lens = {t.name: results[f"lens-{t.name}"] for t in tasks if f"lens-{t.name}" in results}
    conflicts = [value for key, value in results.items() if key.startswith("conflict-")]
    document = {
        "format": 1,
        "meta": {
            "model": handle.name,
            "llm": llm.name if llm else None,
            "taskvec": taskvec.__version__,
            "quick": quick,
            "settings": asdict(config),
            "finished": datetime.now(UTC).isoformat(timespec="seconds"),
            "seconds": round(time.monotonic() - started, 1),
        },
        "tasks": [task.name for task in tasks],
        "layer": {"chosen": layer, "source": layer_source, "num_layers": handle.num_layers},
        "vectors": analysis.sources,
        "lens": lens,
        "lens_peaks": mean_peak_layers(lens),
        "similarity": results.get("similarity"),
        "decoded_tokens": results.get("decoded-tokens"),
        "embedding_map": results.get("embedding-map"),
        "conflict": conflicts,
        "conflict_totals": conflict_totals(conflicts),
        "errors": errors,
    }
    (root / "analysis.json").write_text(json.dumps(document, indent=1), encoding="utf-8")
    return document
