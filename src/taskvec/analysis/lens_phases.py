"""Three-phase logit lens: input, task and answer tokens across layers at the answer position.

At the query's final ':' the paper finds early layers decoding to the input ("France"), middle
layers to a word naming the task ("capital") and late layers to the answer ("Paris"), whether the
task was given by text examples, image examples or an instruction. Each prompt's probability curve
is divided by its sum over layers, so the three phases are comparable in shape even though the
answer is far more probable than the task word in absolute terms; curves are then averaged.

Position rule: the lens reads the prompt's last token, the one whose next-token prediction is the
answer. Under the qa template that is the query's answer marker (`A:`, found in the tokens as the
marker's last occurrence); under the chat template the end of the user turn and the assistant header
follow the marker, and the answer is produced at the header's last token, so that is where it reads.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from taskvec.analysis.prompt_sets import (
    ANALYSIS_PROMPT_SETTINGS,
    query_items,
    spec_prompts,
    unsupported_reason,
)
from taskvec.analysis.tokens import TOKEN_RULE, WordReduce, word_set_ids, words_probability
from taskvec.engine import logit_lens
from taskvec.engine.devices import to_cpu_float32
from taskvec.models import ModelHandle
from taskvec.prompts import DEFAULT_TEMPLATE, Prompt, QATemplate, TemplateName, as_template
from taskvec.prompts.settings import PromptSettings
from taskvec.tasks import Task
from taskvec.vectors import (
    EXTRACTABLE_SPECS,
    VectorSpec,
    last_columns,
    parse_spec,
    residuals_at_columns,
    residuals_at_marker,
)

QA_LENS_POSITION = "the query's answer marker (the prompt's last token)"
CHAT_LENS_POSITION = "the prompt's last token (the chat template's assistant header, after the query's A:)"

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
    template: TemplateName = "qa"

    @property
    def position(self) -> str:
        return CHAT_LENS_POSITION if self.template == "chat" else QA_LENS_POSITION

    def as_dict(self) -> dict[str, Any]:
        record: dict[str, Any] = {
            "task": self.task,
            "curves": {spec: curves.as_dict() for spec, curves in self.curves.items()},
            "skipped": self.skipped,
            "token_rule": self.token_rule,
            "task_word_reduce": self.task_word_reduce,
        }
        if self.template == "chat":  # qa records keep the keys they always had
            record.update(template=self.template, position=self.position)
        return record


def _batch_curves(
    handle: ModelHandle,
    residuals: torch.Tensor,
    input_words: Sequence[str],
    answer_words: Sequence[Sequence[str]],
    task_ids: Sequence[Sequence[int]],
    task_word_reduce: WordReduce,
) -> dict[str, torch.Tensor]:
    """Each phase's per-layer probability of a batch of prompts: [prompts, layers], float32, CPU.

    The lens runs wherever the model's unembedding is; only the small curves are copied back, once
    per phase, so the whole-vocabulary distributions never leave the accelerator.
    """
    tokenizer = handle.tokenizer
    probabilities = logit_lens(handle, residuals).softmax(dim=-1)
    rows: dict[str, list[torch.Tensor]] = {phase: [] for phase in PHASES}
    for index, distribution in enumerate(probabilities):
        input_ids = word_set_ids(tokenizer, [input_words[index]])
        rows["input"].append(words_probability(distribution, input_ids))
        rows["task"].append(words_probability(distribution, task_ids, task_word_reduce))
        rows["answer"].append(words_probability(distribution, word_set_ids(tokenizer, answer_words[index])))
    return {phase: to_cpu_float32(torch.stack(curves)) for phase, curves in rows.items()}


@dataclass
class _PhaseSums:
    """Running sums over prompts of one phase's curves, on the CPU in float32 whatever the model's
    device and dtype: absolute probabilities, and curves divided by their sum over layers."""

    layers: int
    total: torch.Tensor = field(init=False)
    relative: torch.Tensor = field(init=False)
    counted: int = 0  # prompts whose curve is not all zero (some word of the phase has a token)

    def __post_init__(self) -> None:
        self.total = torch.zeros(self.layers, dtype=torch.float32)
        self.relative = torch.zeros(self.layers, dtype=torch.float32)

    def add(self, curves: torch.Tensor) -> None:
        """Add [prompts, layers] curves."""
        self.total += curves.sum(dim=0)
        sums = curves.sum(dim=1, keepdim=True)
        present = sums.squeeze(1) > 0
        self.relative += (curves[present] / sums[present]).sum(dim=0)
        self.counted += int(present.sum())

    def relative_mean(self) -> torch.Tensor:
        return self.relative / max(self.counted, 1)


@torch.no_grad()
def phase_curves(
    handle: ModelHandle,
    prompts: Sequence[Prompt],
    input_words: Sequence[str],
    answer_words: Sequence[Sequence[str]],
    task_words: Sequence[str],
    *,
    task_word_reduce: WordReduce = "max",
    template: QATemplate | TemplateName = DEFAULT_TEMPLATE,
    batch_size: int = 4,
    progress: str | None = None,
) -> PhaseCurves:
    """Lens curves of any prompts: prompt i's input word, answer words (any of them) and the task words.

    Read where the answer is generated (see the module's position rule): the query's marker for qa
    prompts, the last token for chat prompts.
    """
    if not prompts:
        raise ValueError("phase_curves needs at least one prompt")
    task_ids = word_set_ids(handle.tokenizer, task_words, capitalised=True)
    sums = {phase: _PhaseSums(handle.num_layers) for phase in PHASES}
    # [prompts, layers, hidden] where the answer is generated.
    if any(prompt.chat for prompt in prompts):
        residuals = residuals_at_columns(
            handle, prompts, last_columns, batch_size=batch_size, progress=progress
        ).residuals
    else:
        residuals = residuals_at_marker(
            handle, prompts, occurrence=-1, batch_size=batch_size, progress=progress, template=template
        ).residuals
    for start in range(0, len(prompts), batch_size):
        # The lens over the whole vocabulary is large: decode a batch of prompts at a time.
        stop = start + batch_size
        curves = _batch_curves(
            handle,
            residuals[start:stop],
            input_words[start:stop],
            answer_words[start:stop],
            task_ids,
            task_word_reduce,
        )
        for phase, phase_sums in sums.items():
            phase_sums.add(curves[phase])
    relative = {phase: phase_sums.relative_mean() for phase, phase_sums in sums.items()}
    return PhaseCurves(
        prompts=len(prompts),
        probability={phase: (sums[phase].total / len(prompts)).tolist() for phase in PHASES},
        relative={phase: curve.tolist() for phase, curve in relative.items()},
        peak_layer={
            phase: int(relative[phase].argmax()) if sums[phase].counted else None for phase in PHASES
        },
        prompts_without_token={phase: len(prompts) - sums[phase].counted for phase in PHASES},
    )


def lens_phases(
    handle: ModelHandle,
    task: Task,
    *,
    specs: Sequence[VectorSpec | str] = EXTRACTABLE_SPECS,
    max_prompts: int = 100,
    prompts: PromptSettings = ANALYSIS_PROMPT_SETTINGS,
    task_word_reduce: WordReduce = "max",
    progress: bool = False,
) -> LensPhases:
    """Input / task / answer curves of a task's test queries, specified each way in `specs`.

    The same (up to `max_prompts`) queries are used for every spec, so the curves differ only in
    how the task was given. Specs the model or task cannot take (image ICL on a text-only model)
    are listed in `skipped` with the reason. `prompts` gives the demonstrations (shots, seed, image
    style), the template (its "chat" asks every prompt as one user turn of the model's chat
    template) and the batch size.
    """
    template = as_template(prompts.template)
    queries = query_items(task, max_prompts)
    curves: dict[str, PhaseCurves] = {}
    skipped: dict[str, str] = {}
    for spec in map(parse_spec, specs):
        reason = unsupported_reason(handle, task, spec)
        if reason is not None:
            skipped[spec.value] = reason
            continue
        built_prompts = spec_prompts(task, spec, queries, settings=prompts)
        curves[spec.value] = phase_curves(
            handle,
            built_prompts,
            [item.input for item in queries],
            [item.answers() for item in queries],
            task.task_words,
            task_word_reduce=task_word_reduce,
            template=template,
            batch_size=prompts.batch_size,
            progress=f"lens {task.name} {spec.value}" if progress else None,
        )
    return LensPhases(task.name, curves, skipped, task_word_reduce=task_word_reduce, template=template.name)


@dataclass
class LensResults:
    """The `lens` analysis: each task's three phases (a task whose lens failed is left out)."""

    per_task: dict[str, LensPhases]


@dataclass
class LensPeaks:
    """The `lens_peaks` analysis: per spec and phase, the mean over tasks of the peak layer (None
    when no task has a peak for that phase); specs without any peak are left out."""

    per_spec: dict[str, dict[str, float | None]]


def mean_peak_layers(lens: LensResults) -> LensPeaks:
    """Per spec and phase, the mean over tasks of the peak layer."""
    summary: dict[str, dict[str, float | None]] = {}
    for spec in (kind.value for kind in EXTRACTABLE_SPECS):
        summary[spec] = {}
        for phase in PHASES:
            peaks = [
                peak
                for result in lens.per_task.values()
                if spec in result.curves and (peak := result.curves[spec].peak_layer.get(phase)) is not None
            ]
            summary[spec][phase] = sum(peaks) / len(peaks) if peaks else None
    return LensPeaks(
        {spec: phases for spec, phases in summary.items() if any(v is not None for v in phases.values())}
    )
