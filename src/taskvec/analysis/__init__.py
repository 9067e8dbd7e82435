"""Analyses of task vectors: three-phase logit lens, similarity, 2-D maps, decoded tokens, conflict.

Each analysis is a function of a model handle and tasks returning plain data (dataclasses with
`as_dict()`, or dicts ready for JSON). `run_analyses` runs every registered analysis
(`register_analysis` adds one) at a given layer over given vectors into an `AnalysisDocument`;
`analysis_vectors` computes those vectors when there is no run to take them from.

    from taskvec.analysis import lens_phases
    phases = lens_phases(handle, load_task("country-capital"), max_prompts=20)
    phases.curves["text-icl"].peak_layer      # {"input": 2, "task": 8, "answer": 14}
"""

from taskvec.analysis.conflict import ConflictCounts, shared_input_pairs, task_conflict
from taskvec.analysis.context import Analysis, AnalysisContext
from taskvec.analysis.document import ANALYSIS_FORMAT, AnalysisDocument, AnalysisLayer, AnalysisMeta
from taskvec.analysis.embedding_map import (
    PromptPoints,
    collect_prompt_points,
    embedding_map,
    neighbour_agreement,
    project_2d,
)
from taskvec.analysis.lens_phases import PHASES, LensPhases, PhaseCurves, lens_phases, phase_curves
from taskvec.analysis.registry import register_analysis, registered_analyses, unregister_analysis
from taskvec.analysis.run import analysis_vectors, run_analyses
from taskvec.analysis.settings import QUICK, AnalysisSettings
from taskvec.analysis.similarity import VectorKey, cosine_per_layer, similarity_analysis
from taskvec.analysis.tokens import first_token_variants
from taskvec.analysis.vector_tokens import decode_vector, decode_vectors

__all__ = [
    "ANALYSIS_FORMAT",
    "PHASES",
    "QUICK",
    "Analysis",
    "AnalysisContext",
    "AnalysisDocument",
    "AnalysisLayer",
    "AnalysisMeta",
    "AnalysisSettings",
    "ConflictCounts",
    "LensPhases",
    "PhaseCurves",
    "PromptPoints",
    "VectorKey",
    "analysis_vectors",
    "collect_prompt_points",
    "cosine_per_layer",
    "decode_vector",
    "decode_vectors",
    "embedding_map",
    "first_token_variants",
    "lens_phases",
    "neighbour_agreement",
    "phase_curves",
    "project_2d",
    "register_analysis",
    "registered_analyses",
    "run_analyses",
    "shared_input_pairs",
    "similarity_analysis",
    "task_conflict",
    "unregister_analysis",
]
