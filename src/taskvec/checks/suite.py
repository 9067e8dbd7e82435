"""Which checks run, on which prompts, against which tolerance: the whole set for `taskvec check` and
a smaller one before every `taskvec run`."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from taskvec.checks import invariants, structure
from taskvec.checks.measure import Measurement
from taskvec.checks.prompts import CheckPrompts, NotApplicable, PromptSource
from taskvec.checks.results import CheckRow, CheckSet, EngineChecks
from taskvec.checks.tolerances import EXACT, MEMORY_BUDGET_SHARE, TOLERANCES, Tolerances, precision_of
from taskvec.models import ModelHandle
from taskvec.prompts import QATemplate, TemplateName, as_template, chat_template_of

Measure = Callable[[PromptSource, str], Measurement]


class EngineCheckFailed(ValueError):
    """A check failed before a run: the run would compute numbers the engine cannot vouch for on this
    model as loaded (a ValueError, so the command line prints it as one line)."""


@dataclass(frozen=True)
class Check:
    """One invariant: its name (as a failure names it), what it states, how it is measured and the
    tolerance it is held to."""

    name: str
    what: str
    measure: Measure
    tolerance: Callable[[Tolerances], float]
    # Prompts in the full set and before a run: "text", "image" (where the model takes images), or
    # "last", the model's last kind (image on a VLM).
    full: tuple[str, ...] = ("text", "image")
    run: tuple[str, ...] = ()
    # How the check measures before a run, when it does less there than in the full set.
    run_measure: Measure | None = None


def _run_sweep(prompts: PromptSource, modality: str) -> Measurement:
    """Before a run the sweep compares three layers (first, middle, last), not all of them."""
    layers = prompts.handle.num_layers
    return invariants.sweep_equals_naive_loop(prompts, modality, sorted({0, layers // 2, layers - 1}))


CHECKS: tuple[Check, ...] = (
    Check(
        "residuals",
        "hooked residuals = output_hidden_states at every layer (the last through the final norm)",
        invariants.residuals_equal_hidden_states,
        lambda t: t.residuals,
        run=("text",),
    ),
    Check(
        "own-value-patch",
        "replacing a residual by its own value changes no logit",
        invariants.own_value_patch_changes_nothing,
        lambda t: t.patch,
        run=("text",),
    ),
    Check(
        "sweep",
        "the layer sweep = a full forward per patched layer (same top token at each layer)",
        invariants.sweep_equals_naive_loop,
        lambda t: t.sweep,
        run=("last",),
        run_measure=_run_sweep,
    ),
    Check(
        "shared-prefix-rows",
        "rows of one prefix pass over a mixed batch = each prompt alone, patched at its marker",
        invariants.shared_prefix_rows_equal_prompts_alone,
        lambda t: t.shared_prefix,
    ),
    Check(
        "padded-batch",
        "a left-padded batch of different lengths = each prompt alone",
        invariants.padded_batch_equals_prompts_alone,
        lambda t: t.padded_batch,
        run=("text",),
    ),
    Check(
        "decode-positions",
        "the decode step's position ids = a full forward's (exact)",
        structure.decode_positions_equal_full_forward,
        lambda _t: EXACT,
        run=("last",),
    ),
    Check(
        "lens",
        "the logit lens of the last layer = the model's logits",
        invariants.lens_of_last_layer_equals_logits,
        lambda t: t.lens,
        run=("text",),
    ),
    Check(
        "heads",
        "recorded heads re-projected and summed = the attention output (function vectors)",
        structure.heads_sum_to_attention_output,
        lambda t: t.heads,
    ),
    Check(
        "attention-norm",
        "the norm heads are mapped through receives the attention output (none where none does)",
        structure.attention_norm_receives_the_attention_output,
        lambda t: t.attention_norm,
        full=("text",),
    ),
    Check(
        "answer-marker",
        "the answer marker is where the template puts it (qa, and chat if the model has a template)",
        structure.answer_marker_where_the_template_puts_it,
        lambda _t: EXACT,
        run=("text",),
    ),
    Check(
        "sweep-memory",
        "the sweep's memory budget on this device and the peak of its cache copies (share of it)",
        structure.sweep_memory_within_budget,
        lambda _t: MEMORY_BUDGET_SHARE,
        full=("last",),
    ),
)
CHECK_NAMES = tuple(check.name for check in CHECKS)


def _modalities(wanted: Sequence[str], prompts: PromptSource) -> list[str]:
    """'last' is the model's own last kind (image on a VLM); image only on a model that takes images."""
    resolved = [prompts.modalities[-1] if kind == "last" else kind for kind in wanted]
    return [kind for kind in resolved if kind in prompts.modalities]


def run_check(
    check: Check, prompts: PromptSource, modality: str, tolerances: Tolerances, check_set: CheckSet = "full"
) -> CheckRow:
    """One row: the check measured on one kind of prompt; an error inside it fails it with its message."""
    tolerance = check.tolerance(tolerances)
    run_measure = check.run_measure if check_set == "run" else None
    measure = run_measure or check.measure
    started = time.perf_counter()
    try:
        measured = measure(prompts, modality)
    except NotApplicable as reason:
        return CheckRow(
            check.name, modality, check.what, "skip", None, None, time.perf_counter() - started, str(reason)
        )
    except (RuntimeError, ValueError, LookupError, TypeError) as error:
        seconds = time.perf_counter() - started
        return CheckRow(
            check.name,
            modality,
            check.what,
            "fail",
            None,
            tolerance,
            seconds,
            f"{type(error).__name__}: {error}",
        )
    seconds = time.perf_counter() - started
    ok = measured.broken is None and measured.deviation <= tolerance
    detail = measured.broken or measured.detail
    return CheckRow(
        check.name,
        modality,
        check.what,
        "pass" if ok else "fail",
        measured.deviation,
        tolerance,
        seconds,
        detail,
    )


def run_checks(
    handle: ModelHandle,
    template: QATemplate | TemplateName = "qa",
    *,
    check_set: CheckSet = "full",
    only: Sequence[str] | None = None,
    prompts: PromptSource | None = None,
) -> EngineChecks:
    """Every check of the set on the model as it is loaded (device, dtype, device map, quantization),
    on the country-capital prompts in `template`, or on `prompts` when given."""
    started = time.perf_counter()
    if prompts is None:
        prompts = CheckPrompts(handle, as_template(template))
        if prompts.template.chat:  # a model without one is refused here, not by every check
            chat_template_of(handle)
    precision = precision_of(handle)
    tolerances = TOLERANCES[precision]
    rows = []
    for check in CHECKS:
        if only is not None and check.name not in only:
            continue
        kinds = check.full if check_set == "full" else check.run
        for modality in _modalities(kinds, prompts):
            with torch.no_grad():
                rows.append(run_check(check, prompts, modality, tolerances, check_set))
    return EngineChecks(
        model=handle.name,
        precision=precision,
        device=str(handle.device),
        check_set=check_set,
        rows=rows,
        seconds=round(time.perf_counter() - started, 2),
    )


def checks_before_run(
    models: Sequence[ModelHandle], template: QATemplate | TemplateName = "qa", *, enabled: bool = True
) -> list[EngineChecks]:
    """The run's set of checks on every model of a run, before any step: raises EngineCheckFailed
    with one line on the first failure. Not `enabled` (`--no-check`): a record that none ran."""
    if not enabled:
        return [
            EngineChecks(handle.name, precision_of(handle), str(handle.device), "run", declined=True)
            for handle in models
        ]
    checked = []
    for handle in models:
        checks = run_checks(handle, template, check_set="run")
        if checks.failures:
            raise EngineCheckFailed(
                f"{checks.failures[0].failure_line(handle.name)} (--no-check runs anyway)"
            )
        checked.append(checks)
    return checked
