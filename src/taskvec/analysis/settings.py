"""The analyses' settings: prompt counts, the prompts' protocol, the projection and the scoring."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from taskvec.analysis.embedding_map import ProjectionMethod
from taskvec.analysis.prompt_sets import ANALYSIS_PROMPT_SETTINGS
from taskvec.prompts.settings import PromptSettings


@dataclass(frozen=True)
class AnalysisSettings:
    """What the analyses compute with. Every field is part of each cached step's key.

    `conflict_max_new_tokens` and `conflict_metric` score the task conflict by the run's protocol
    (the paper's: one greedy token, prefix match). `vector_prompts` is read by `analysis_vectors`
    only (a vector of the first N validation queries instead of all of them). `prompts` builds and
    batches every prompt of the analyses and of `analysis_vectors` (its template "chat": each prompt
    as one user turn of the chat template); its seed also seeds the embedding map's projection.
    """

    lens_prompts: int = 100
    map_prompts_per_task: int = 30
    conflict_items: int = 50
    conflict_max_new_tokens: int = 1
    conflict_metric: str = "prefix"
    vector_prompts: int | None = None  # None: the paper's protocol (every validation prompt)
    prompts: PromptSettings = ANALYSIS_PROMPT_SETTINGS
    projection: ProjectionMethod = "tsne"
    top_k: int = 5

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


# A few prompts per analysis: the whole set in minutes on CPU (tests, smoke runs).
QUICK = AnalysisSettings(lens_prompts=4, map_prompts_per_task=4, conflict_items=4, vector_prompts=4, top_k=3)
