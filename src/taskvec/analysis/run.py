"""`run_analyses`: a list of analyses (the paper's by default) over given vectors at a given layer.

The caller decides the layer and the vectors: a run passes the layer it chose on validation and
the vectors it extracted; a caller without a run computes vectors with `analysis_vectors`. Steps are
cached in the given `StepCache` by content (see `taskvec.analysis.context`), so an interrupted call
resumes and an identical one is served from the cache. An analysis that fails is recorded under
`errors` and the others still run: the report shows what exists and says what is missing.

    vectors = analysis_vectors(handle, tasks, settings=QUICK)
    document = run_analyses(handle, tasks, layer=8, vectors=vectors, cache=StepCache(DIR / "cache"))
    document.write(DIR / "analysis.json")
"""

from __future__ import annotations

import json
import time
from collections.abc import Collection, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

import torch
from tqdm import tqdm

from taskvec.analysis.context import Analysis, AnalysisContext
from taskvec.analysis.document import AnalysisDocument, AnalysisLayer, AnalysisMeta
from taskvec.analysis.paper_analyses import PAPER_ANALYSES
from taskvec.analysis.prompt_sets import unsupported_reason
from taskvec.analysis.settings import QUICK, AnalysisSettings
from taskvec.analysis.similarity import VectorKey
from taskvec.caching import StepCache
from taskvec.engine.devices import to_cpu_float32
from taskvec.models import ModelHandle
from taskvec.progress import with_progress
from taskvec.tasks import Task
from taskvec.typed_json import to_json
from taskvec.vectors import EXTRACTABLE_SPECS, VectorSpec, extract_vector
from taskvec.version import __version__


def _check_vectors(
    vectors: Mapping[VectorKey, torch.Tensor], handle: ModelHandle, llm: ModelHandle | None
) -> None:
    """Each vector is [layers, hidden] of the model it is said to come from."""
    for key, vector in vectors.items():
        owner = handle if key.model == "vlm" else llm
        if owner is None:
            if vector.dim() != 2:
                raise ValueError(
                    f"vector {key.label} must be [layers, hidden], has shape {tuple(vector.shape)}"
                )
            continue
        expected = (owner.num_layers, owner.hidden_size)
        if tuple(vector.shape) != expected:
            raise ValueError(
                f"vector {key.label} has shape {tuple(vector.shape)}; {owner.name} ({key.model}) "
                f"has {expected[0]} layers of width {expected[1]}"
            )


def _describe(key: VectorKey, handle: ModelHandle, llm: ModelHandle | None) -> str:
    owner = handle if key.model == "vlm" else llm
    model = owner.name if owner is not None else "the base LM"
    return f"{key.spec.label} vector of {key.task}, read from {model}"


def run_analyses(
    handle: ModelHandle,
    tasks: Sequence[Task],
    *,
    layer: int,
    vectors: Mapping[VectorKey, torch.Tensor],
    cache: StepCache,
    llm: ModelHandle | None = None,
    settings: AnalysisSettings | None = None,
    quick: bool = False,
    progress: bool = True,
    layer_source: str = "given by the caller",
    vector_sources: Mapping[VectorKey, str] | None = None,
    only: Collection[str] | None = None,
    analyses: Sequence[Analysis[Any]] = PAPER_ANALYSES,
) -> AnalysisDocument:
    """Run `analyses` in order (the paper's, `taskvec.analysis.paper_analyses`) and collect their results.

    `layer` is the layer the layer-dependent analyses read (similarity summary, 2-D map, conflict
    patching), `layer_source` says where it came from. `vectors` are [layers, hidden] per (model,
    task, spec), model "vlm" for `handle`, "llm" for the base LM `llm`; `vector_sources` describes
    them for the document (default: their spec, task and model). `settings` default to the full
    analyses, or to QUICK with `quick`; every prompt follows their `prompts`. `only`
    runs just the analyses of those names (a part of the work computed elsewhere, e.g. on a Ray
    worker, into the cache a full call then reads). An analysis may read the result of one before
    it in the list (`AnalysisContext.earlier`).
    """
    started = time.monotonic()
    if not 0 <= layer < handle.num_layers:
        raise ValueError(f"layer {layer} is not one of {handle.name}'s {handle.num_layers} layers")
    _check_vectors(vectors, handle, llm)
    config = settings or (QUICK if quick else AnalysisSettings())
    context = AnalysisContext(
        handle=handle,
        llm=llm,
        tasks=tuple(tasks),
        layer=layer,
        vectors=dict(vectors),
        settings=config,
        cache=cache,
    )
    chosen = [analysis for analysis in analyses if only is None or analysis.name in only]
    if len({analysis.name for analysis in chosen}) != len(chosen):
        raise ValueError("two analyses of one name in the list (`with_analysis` replaces one by name)")
    for analysis in with_progress(chosen, "analyses", enabled=progress):
        context.analysis = analysis
        try:
            result = analysis.compute(context)
            if not isinstance(result, analysis.result_type):
                raise TypeError(
                    f"returned a {type(result).__name__}, not the {analysis.result_type.__name__} it declares"
                )
            # As analysis.json will hold it: a result that is not JSON-able fails here, not at write.
            context.results[analysis.name] = analysis.decode(json.loads(json.dumps(to_json(result))))
        except Exception as error:  # one failed analysis must not lose the others
            context.errors[analysis.name] = f"{type(error).__name__}: {error}"
            if progress:
                tqdm.write(f"analysis {analysis.name} failed: {context.errors[analysis.name]}")
    context.analysis = None
    sources = vector_sources or {}
    return AnalysisDocument(
        meta=AnalysisMeta(
            model=handle.name,
            llm=llm.name if llm is not None else None,
            taskvec=__version__,
            model_fingerprint=context.fingerprint(handle),
            llm_fingerprint=context.fingerprint(llm) if llm is not None else None,
            settings=config,
            quick=quick,
            finished=datetime.now(UTC).isoformat(timespec="seconds"),
            seconds=round(time.monotonic() - started, 1),
        ),
        tasks=[task.name for task in tasks],
        layer=AnalysisLayer(chosen=layer, num_layers=handle.num_layers, source=layer_source),
        vectors={key.label: sources.get(key) or _describe(key, handle, llm) for key in sorted(vectors)},
        results=context.results,
        errors=context.errors,
    )


def analysis_vectors(
    handle: ModelHandle,
    tasks: Sequence[Task],
    *,
    llm: ModelHandle | None = None,
    settings: AnalysisSettings | None = None,
    progress: bool = False,
) -> dict[VectorKey, torch.Tensor]:
    """Vectors for `run_analyses` without a run: every spec each task and model can take.

    The model's text-ICL, image-ICL and instruction vectors, and the base LM's text-ICL vectors
    (LLM -> VLM transfers text-derived vectors), by `taskvec.vectors.extract_vector` on the
    validation split with the settings' `prompts`;
    `settings.vector_prompts` keeps only the first N validation queries (None: all, the paper's
    protocol). Vectors are float32 on the CPU whatever the models' devices and dtypes.
    """
    config = settings or AnalysisSettings()
    jobs: list[tuple[str, ModelHandle, Sequence[VectorSpec]]] = [("vlm", handle, EXTRACTABLE_SPECS)]
    if llm is not None:
        jobs.append(("llm", llm, (VectorSpec.TEXT_ICL,)))
    vectors: dict[VectorKey, torch.Tensor] = {}
    for model, owner, specs in jobs:
        for task in tasks:
            for spec in specs:
                if unsupported_reason(owner, task, spec) is not None:
                    continue
                extraction = extract_vector(
                    owner,
                    task,
                    spec,
                    settings=config.prompts,
                    limit=config.vector_prompts,
                    progress=f"{model} {spec.value} {task.name}" if progress else None,
                )
                vectors[VectorKey(model, task.name, spec)] = to_cpu_float32(extraction.vector.vectors)
    return vectors
