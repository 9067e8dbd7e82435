"""The analyses' settings: prompt counts, the prompts' protocol, the projection and the scoring."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from taskvec.analysis.embedding_map import ProjectionMethod
from taskvec.prompts import TemplateName


@dataclass(frozen=True)
class AnalysisSettings:
    """What the analyses compute with. Every field is part of each cached step's key.

    `conflict_max_new_tokens` and `conflict_metric` score the task conflict by the run's protocol
    (the paper's: one greedy token, prefix match). `vector_prompts` is read by `analysis_vectors`
    only (a vector of the first N validation queries instead of all of them).
    """

    lens_prompts: int = 100
    map_prompts_per_task: int = 30
    conflict_items: int = 50
    conflict_max_new_tokens: int = 1
    conflict_metric: str = "prefix"
    vector_prompts: int | None = None  # None: the paper's protocol (every validation prompt)
    shots: int = 5
    seed: int = 0
    projection: ProjectionMethod = "tsne"
    top_k: int = 5
    batch_size: int = 4
    template: TemplateName = "qa"  # "chat": every analysis prompt as one user turn of the chat template

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


# A few prompts per analysis: the whole set in minutes on CPU (tests, smoke runs).
QUICK = AnalysisSettings(lens_prompts=4, map_prompts_per_task=4, conflict_items=4, vector_prompts=4, top_k=3)
