"""Analyses of task vectors: three-phase logit lens, similarity, 2-D maps, decoded tokens, conflict.

Each analysis is a function of a model handle and tasks returning a typed dataclass. `run_analyses`
runs a list of analyses (`PAPER_ANALYSES` by default; `with_analysis` adds or replaces one by name)
at a given layer over given vectors into an `AnalysisDocument`, whose `result(LENS)` gives a result
typed; `analysis_vectors` computes those vectors when there is no run to take them from.

    from taskvec.analysis import lens_phases
    from taskvec.prompts.settings import PromptSettings
    task = load_task("country-capital")
    phases = lens_phases(handle, task, max_prompts=20, prompts=PromptSettings(shots=3, batch_size=4))
    phases.curves["text-icl"].peak_layer      # {"input": 2, "task": 8, "answer": 14}
"""

from taskvec.analysis.conflict import (
    ConflictCounts,
    ConflictExample,
    ConflictResults,
    ConflictTotals,
    OutcomeTotals,
    shared_input_pairs,
    task_conflict,
)
from taskvec.analysis.context import Analysis, AnalysisContext, with_analysis
from taskvec.analysis.document import ANALYSIS_FORMAT, AnalysisDocument, AnalysisLayer, AnalysisMeta
from taskvec.analysis.embedding_map import (
    EmbeddingMap,
    MapPoints,
    PromptPoints,
    collect_prompt_points,
    embedding_map,
    neighbour_agreement,
    project_2d,
)
from taskvec.analysis.lens_phases import (
    PHASES,
    LensPeaks,
    LensPhases,
    LensResults,
    PhaseCurves,
    lens_phases,
    phase_curves,
)
from taskvec.analysis.paper_analyses import (
    CONFLICT,
    CONFLICT_TOTALS,
    DECODED_TOKENS,
    EMBEDDING_MAP,
    LENS,
    LENS_PEAKS,
    PAPER_ANALYSES,
    SIMILARITY,
)
from taskvec.analysis.run import analysis_vectors, run_analyses
from taskvec.analysis.settings import QUICK, AnalysisSettings
from taskvec.analysis.similarity import (
    LlmVsVlm,
    PairSummary,
    Similarity,
    VectorKey,
    cosine_per_layer,
    similarity_analysis,
)
from taskvec.analysis.tokens import first_token_variants
from taskvec.analysis.vector_tokens import DecodedVectors, ScoredToken, decode_vector, decode_vectors

__all__ = [
    "ANALYSIS_FORMAT",
    "CONFLICT",
    "CONFLICT_TOTALS",
    "DECODED_TOKENS",
    "EMBEDDING_MAP",
    "LENS",
    "LENS_PEAKS",
    "PAPER_ANALYSES",
    "PHASES",
    "QUICK",
    "SIMILARITY",
    "Analysis",
    "AnalysisContext",
    "AnalysisDocument",
    "AnalysisLayer",
    "AnalysisMeta",
    "AnalysisSettings",
    "ConflictCounts",
    "ConflictExample",
    "ConflictResults",
    "ConflictTotals",
    "DecodedVectors",
    "EmbeddingMap",
    "LensPeaks",
    "LensPhases",
    "LensResults",
    "LlmVsVlm",
    "MapPoints",
    "OutcomeTotals",
    "PairSummary",
    "PhaseCurves",
    "PromptPoints",
    "ScoredToken",
    "Similarity",
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
    "run_analyses",
    "shared_input_pairs",
    "similarity_analysis",
    "task_conflict",
    "with_analysis",
]
