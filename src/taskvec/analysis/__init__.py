"""Analyses of task vectors: three-phase logit lens, similarity, 2-D maps, decoded tokens, conflict.

Each analysis is a function of a model handle and tasks returning plain data (dataclasses with
`as_dict()`, or dicts ready for JSON); `run_analyses` runs them all over a run directory.

    from taskvec.analysis import lens_phases
    phases = lens_phases(handle, load_task("country-capital"), max_prompts=20)
    phases.curves["text-icl"].peak_layer      # {"input": 2, "task": 8, "answer": 14}
"""

from taskvec.analysis.conflict import ConflictCounts, shared_input_pairs, task_conflict
from taskvec.analysis.embedding_map import (
    PromptPoints,
    collect_prompt_points,
    embedding_map,
    neighbour_agreement,
    project_2d,
)
from taskvec.analysis.lens_phases import PHASES, LensPhases, PhaseCurves, lens_phases, phase_curves
from taskvec.analysis.prompt_sets import SPECS, Spec
from taskvec.analysis.run import QUICK, AnalysisSettings, run_analyses
from taskvec.analysis.run_files import chosen_layer
from taskvec.analysis.run_vectors import load_or_compute_vectors
from taskvec.analysis.similarity import VectorKey, cosine_per_layer, similarity_analysis
from taskvec.analysis.tokens import first_token_variants
from taskvec.analysis.vector_tokens import decode_vector, decode_vectors

__all__ = [
    "PHASES",
    "QUICK",
    "SPECS",
    "AnalysisSettings",
    "ConflictCounts",
    "LensPhases",
    "PhaseCurves",
    "PromptPoints",
    "Spec",
    "VectorKey",
    "chosen_layer",
    "collect_prompt_points",
    "cosine_per_layer",
    "decode_vector",
    "decode_vectors",
    "embedding_map",
    "first_token_variants",
    "lens_phases",
    "load_or_compute_vectors",
    "neighbour_agreement",
    "phase_curves",
    "project_2d",
    "run_analyses",
    "shared_input_pairs",
    "similarity_analysis",
    "task_conflict",
]
