"""Three-phase logit lens: input, task and answer tokens across layers at the answer position.

At the query's final ':' the paper finds early layers decoding to the input ("France"), middle
layers to a word naming the task ("capital") and late layers to the answer ("Paris"), whether the
task was given by text examples, image examples or an instruction. Each prompt's probability curve
is divided by its sum over layers, so the three phases are comparable in shape even though the
answer is far more probable than the task word in absolute terms; curves are then averaged.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from taskvec.analysis.prompt_sets import query_items, spec_prompts, unsupported_reason
from taskvec.analysis.tokens import TOKEN_RULE, WordReduce, word_set_ids, words_probability
from taskvec.engine import logit_lens
from taskvec.models import ModelHandle
from taskvec.prompts import DEFAULT_TEMPLATE, Prompt, QATemplate
from taskvec.tasks import Task
from taskvec.vectors import EXTRACTABLE_SPECS, VectorSpec, parse_spec, residuals_at_marker

PHASES = ("input", "task", "answer")


@dataclass
class PhaseCurves:
    """Per-layer curves of one prompt set. `relative[phase][layer]` sums to 1 over layers."""

    prompts: int
    probability: dict[str, list[float]]  # mean probability per layer (not normalised)
    relative: dict[str, list[float]]
    peak_layer: dict[str, int | None]  # argmax of the relative curve; None when no prompt counted
    # Prompts left out of a phase because none of its words has a token (word-level vocabularies).
    prompts_without_token: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class LensPhases:
    """The three phases of one task under each specification (text ICL, image ICL, instruction)."""

    task: str
    curves: dict[str, PhaseCurves]
    skipped: dict[str, str]  # spec -> why it was not run
    token_rule: str = TOKEN_RULE
    task_word_reduce: str = "max"

    def as_dict(self) -> dict[str, Any]:
        return {
            "task": self.task,
            "curves": {spec: curves.as_dict() for spec, curves in self.curves.items()},
            "skipped": self.skipped,
            "token_rule": self.token_rule,
            "task_word_reduce": self.task_word_reduce,
        }


@torch.no_grad()
def phase_curves(
    handle: ModelHandle,
    prompts: Sequence[Prompt],
    input_words: Sequence[str],
    answer_words: Sequence[Sequence[str]],
    task_words: Sequence[str],
    *,
    task_word_reduce: WordReduce = "max",
    template: QATemplate = DEFAULT_TEMPLATE,
    batch_size: int = 4,
    progress: str | None = None,
) -> PhaseCurves:
    """Lens curves of any prompts: prompt i's input word, answer words (any of them) and the task words."""
    if not prompts:
        raise ValueError("phase_curves needs at least one prompt")
    tokenizer = handle.tokenizer
    task_ids = word_set_ids(tokenizer, task_words, capitalised=True)
    totals = {phase: torch.zeros(handle.num_layers) for phase in PHASES}
    relative = {phase: torch.zeros(handle.num_layers) for phase in PHASES}
    counted = dict.fromkeys(PHASES, 0)
    # [prompts, layers, hidden] at the query's answer marker, where the answer is generated.
    residuals = residuals_at_marker(
        handle, prompts, occurrence=-1, batch_size=batch_size, progress=progress, template=template
    ).residuals
    for start in range(0, len(prompts), batch_size):
        # The lens over the whole vocabulary is large: decode a batch of prompts at a time.
        probabilities = logit_lens(handle, residuals[start : start + batch_size]).softmax(dim=-1)
        for row in range(probabilities.shape[0]):
            index = start + row
            per_phase = {
                "input": words_probability(probabilities[row], word_set_ids(tokenizer, [input_words[index]])),
                "task": words_probability(probabilities[row], task_ids, task_word_reduce),
                "answer": words_probability(probabilities[row], word_set_ids(tokenizer, answer_words[index])),
            }
            for phase, curve in per_phase.items():
                totals[phase] += curve
                if float(curve.sum()) > 0:
                    relative[phase] += curve / curve.sum()
                    counted[phase] += 1
    peak: dict[str, int | None] = {}
    relative_mean: dict[str, list[float]] = {}
    for phase in PHASES:
        mean = relative[phase] / max(counted[phase], 1)
        relative_mean[phase] = mean.tolist()
        peak[phase] = int(mean.argmax()) if counted[phase] else None
    return PhaseCurves(
        prompts=len(prompts),
        probability={phase: (totals[phase] / len(prompts)).tolist() for phase in PHASES},
        relative=relative_mean,
        peak_layer=peak,
        prompts_without_token={phase: len(prompts) - counted[phase] for phase in PHASES},
    )


def lens_phases(
    handle: ModelHandle,
    task: Task,
    *,
    specs: Sequence[VectorSpec | str] = EXTRACTABLE_SPECS,
    max_prompts: int = 100,
    shots: int = 5,
    seed: int = 0,
    style: str | None = None,
    task_word_reduce: WordReduce = "max",
    template: QATemplate = DEFAULT_TEMPLATE,
    batch_size: int = 4,
    progress: bool = False,
) -> LensPhases:
    """Input / task / answer curves of a task's test queries, specified each way in `specs`.

    The same (up to `max_prompts`) queries are used for every spec, so the curves differ only in
    how the task was given. Specs the model or task cannot take (image ICL on a text-only model)
    are listed in `skipped` with the reason.
    """
    queries = query_items(task, max_prompts)
    curves: dict[str, PhaseCurves] = {}
    skipped: dict[str, str] = {}
    for spec in map(parse_spec, specs):
        reason = unsupported_reason(handle, task, spec)
        if reason is not None:
            skipped[spec.value] = reason
            continue
        prompts = spec_prompts(task, spec, queries, shots=shots, seed=seed, style=style, template=template)
        curves[spec.value] = phase_curves(
            handle,
            prompts,
            [item.input for item in queries],
            [item.answers() for item in queries],
            task.task_words,
            task_word_reduce=task_word_reduce,
            template=template,
            batch_size=batch_size,
            progress=f"lens {task.name} {spec.value}" if progress else None,
        )
    return LensPhases(task.name, curves, skipped, task_word_reduce=task_word_reduce)


def mean_peak_layers(lens: dict[str, Any]) -> dict[str, dict[str, float | None]]:
    """Per spec and phase, the mean over tasks of the peak layer."""
    summary: dict[str, dict[str, float | None]] = {}
    for spec in (kind.value for kind in EXTRACTABLE_SPECS):
        summary[spec] = {}
        for phase in PHASES:
            peaks = [
                result["curves"][spec]["peak_layer"][phase]
                for result in lens.values()
                if spec in result.get("curves", {})
                and result["curves"][spec]["peak_layer"][phase] is not None
            ]
            summary[spec][phase] = sum(peaks) / len(peaks) if peaks else None
    return {spec: phases for spec, phases in summary.items() if any(v is not None for v in phases.values())}
