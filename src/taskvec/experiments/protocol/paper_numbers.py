"""The paper's reported figures (test accuracy, mean of the six tasks), printed beside ours.

Source: "Task Vectors are Cross-Modal" (Luo, Darrell, Bar; arXiv 2410.22330), Table 1, the
directions figure (Idefics2), the LLM -> VLM table and the efficiency note of the ICML version.
None means the paper reports no number there (LLaVA-1.5 takes one image, so no image ICL).
"""

from __future__ import annotations

from taskvec.experiments.results.run_results import PaperNumbers

PAPER_COLUMNS = ("no-context", "image-icl", "image-icl-patch", "text-icl-xbase", "text-icl-xpatch")

PAPER_TABLE: dict[str, dict[str, float | None]] = {
    "LLaVA-1.5-7B": {
        "no-context": 0.00,
        "image-icl": None,
        "image-icl-patch": None,
        "text-icl-xbase": 0.18,
        "text-icl-xpatch": 0.32,
    },
    "Mantis-Fuyu-8B": {
        "no-context": 0.00,
        "image-icl": 0.18,
        "image-icl-patch": 0.20,
        "text-icl-xbase": 0.09,
        "text-icl-xpatch": 0.31,
    },
    "Idefics2-8B": {
        "no-context": 0.01,
        "image-icl": 0.43,
        "image-icl-patch": 0.31,
        "text-icl-xbase": 0.18,
        "text-icl-xpatch": 0.51,
    },
}

PAPER_DIRECTIONS_MODEL = "Idefics2-8B"
PAPER_DIRECTIONS: dict[str, float] = {
    "text->text": 0.65,
    "image->text": 0.42,
    "image->image": 0.31,
    "text->image": 0.51,
}

# VLM's own text-ICL vectors -> the base LM's text-ICL vectors, both patched into image queries.
PAPER_LLM_TO_VLM: dict[str, dict[str, float | None]] = {
    "LLaVA-1.5-7B (from Vicuna)": {"vlm_vectors": 0.32, "llm_vectors": 0.37},
    "Idefics2-8B (from Mistral)": {"vlm_vectors": 0.51, "llm_vectors": 0.52},
}
PAPER_LLM_VLM_COSINE = (0.89, 0.95)

PAPER_BEST_LAYERS: dict[str, list[int]] = {
    "LLaVA-1.5-7B": [15, 32],
    "Idefics2-8B": [16, 32],
    "Mantis-Fuyu-8B": [23, 36],
}

PAPER_EFFICIENCY: dict[str, dict[str, float] | float] = {
    "patching": {"seconds": 0.20, "gb": 8.21},
    "prompting_30_examples": {"seconds": 2.20, "gb": 20.02},
    "ensemble_sample_efficiency_gain": 0.18,
}


def paper_numbers() -> PaperNumbers:
    """Everything above as one record (results.json's "paper_numbers")."""
    return PaperNumbers(
        source="arXiv 2410.22330 (ICML 2025: Vision-Language Models Create Cross-Modal Task ...)",
        table=PAPER_TABLE,
        directions_model=PAPER_DIRECTIONS_MODEL,
        directions=PAPER_DIRECTIONS,
        llm_to_vlm=PAPER_LLM_TO_VLM,
        llm_vlm_cosine_range=list(PAPER_LLM_VLM_COSINE),
        best_layers=PAPER_BEST_LAYERS,
        efficiency=PAPER_EFFICIENCY,
    )
