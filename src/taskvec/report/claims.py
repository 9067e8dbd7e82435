"""The paper's six claims, the numbers of a run that bear on each, and a verdict computed from them.

A verdict is "holds", "does not hold" or "not testable" (the run lacks the conditions or analyses
the claim needs). A patched condition counts as beating a reference only when its 95% interval lies
above the reference's interval (or above a floor's mean and interval), and never when its answers
are mostly the vector's own decoded token, whatever the query, or when no layer helped it on
validation: that is no transfer.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from taskvec.analysis import EMBEDDING_MAP, LENS_PEAKS, SIMILARITY, AnalysisDocument
from taskvec.experiments.protocol import conditions as known
from taskvec.experiments.results.run_results import Floor, RunResults, Summary
from taskvec.layer_choice import NO_LAYER_HELPED

PHASES = ("input", "task", "answer")
Verdict = Literal["holds", "does not hold", "not testable"]


@dataclass
class Claim:
    number: int
    statement: str
    verdict: Verdict
    evidence: list[str] = field(default_factory=list)


def _cell(summary: Summary) -> str:
    return f"{summary.mean:.2f} [{summary.interval.low:.2f}, {summary.interval.high:.2f}]"


class _Judge:
    def __init__(self, results: RunResults) -> None:
        self.results = results
        self.threshold = results.config.query_independent_share

    def summary(self, condition: known.Condition) -> Summary | None:
        return self.results.summary(condition.name)

    def beats(self, summary: Summary, reference: Summary | Floor, evidence: list[str]) -> bool:
        label = reference.label
        above = summary.interval.low > reference.interval.high
        evidence.append(
            f"{summary.label} {_cell(summary)} {'is above' if above else 'does not clear'} {label} "
            f"{reference.mean:.2f} [{reference.interval.low:.2f}, {reference.interval.high:.2f}]"
        )
        return above

    def depends_on_query(self, summary: Summary, evidence: list[str]) -> bool:
        """The answers are not mostly the vector's own token, and beat answering that token everywhere."""
        share = summary.vector_answer_share
        if share is None:
            return True
        independent = summary.query_independent(self.threshold)
        evidence.append(
            f"{summary.label}: {share:.0%} of answers are the vector's own decoded token"
            + (" (does not depend on the query: no transfer)" if independent else "")
        )
        own = summary.vector_answer_accuracy
        if own is None:
            return not independent
        above = summary.interval.low > own
        evidence.append(
            f"answering every query with the vector's own token would score {own:.2f}: "
            f"{summary.label} {'is' if above else 'is not'} above it"
        )
        return above and not independent

    def transfer(
        self, patched: known.Condition, references: list[known.Condition], evidence: list[str]
    ) -> Verdict:
        summary = self.summary(patched)
        if summary is None:
            evidence.append(f"{patched.label} did not run")
            return "not testable"
        ok = True
        choice = self.results.layers.get(patched.name)
        if choice is not None and not choice.helped:
            unpatched = choice.unpatched_validation
            against = "" if unpatched is None else f" ({unpatched:.2f})"
            evidence.append(
                f"{patched.label}: {NO_LAYER_HELPED} (no candidate layer beat the unpatched validation "
                f"queries{against}): no transfer"
            )
            ok = False
        ok = self.depends_on_query(summary, evidence) and ok
        for reference in references:
            other = self.summary(reference)
            if other is not None:
                ok = self.beats(summary, other, evidence) and ok
        for floor in self.results.floors:
            ok = self.beats(summary, floor, evidence) and ok
        return "holds" if ok else "does not hold"


def _similarity_claim(analysis: AnalysisDocument | None, evidence: list[str]) -> Verdict:
    similarity = analysis.result(SIMILARITY) if analysis is not None else None
    mapped = analysis.result(EMBEDDING_MAP) if analysis is not None else None
    if similarity is None:
        evidence.append("no similarity analysis")
        return "not testable"
    centred = similarity.summary_centered
    same, other = centred.within_task_text_image, centred.cross_task
    if same is None or other is None:
        evidence.append("no text-ICL and image-ICL vectors of the same task to compare")
        return "not testable"
    ok = same > other
    evidence.append(
        f"mean-centred cosine at layer {similarity.layer}: same task text vs image ICL {same:.3f}, "
        f"different tasks {other:.3f}"
    )
    if mapped is not None:
        vectors, inputs = mapped.vectors, mapped.embeddings
        found = [
            vectors.same_task_neighbour,
            inputs.same_task_neighbour,
            vectors.same_spec_neighbour,
            inputs.same_spec_neighbour,
        ]
        shares = [float(share) for share in found if share is not None]
        if len(shares) == len(found):
            vector_task, input_task, vector_spec, input_spec = shares
            evidence.append(
                f"nearest neighbour of the same task: task vectors {vector_task:.2f}, raw inputs "
                f"{input_task:.2f}; of the same modality: task vectors {vector_spec:.2f}, raw inputs "
                f"{input_spec:.2f}"
            )
            # Vectors group by task at least as often as raw inputs do, raw inputs by modality at
            # least as often as vectors do.
            ok = ok and vector_task >= input_task and input_spec >= vector_spec
    return "holds" if ok else "does not hold"


def _lens_claim(analysis: AnalysisDocument | None, evidence: list[str]) -> Verdict:
    found = analysis.result(LENS_PEAKS) if analysis is not None else None
    peaks = found.per_spec if found is not None else {}
    if not peaks:
        evidence.append("no logit-lens analysis")
        return "not testable"
    ok = True
    for spec, phases in peaks.items():
        values = [value for value in (phases.get(phase) for phase in PHASES) if value is not None]
        if len(values) < len(PHASES):
            evidence.append(f"{spec}: a phase has no token in the vocabulary")
            ok = False
            continue
        ordered = values[0] <= values[1] <= values[2] and values[0] < values[2]
        shown = ", ".join(f"{name} {value:.1f}" for name, value in zip(PHASES, values, strict=True))
        evidence.append(f"{spec}: mean peak layers {shown}" + ("" if ordered else " (out of order)"))
        ok = ok and ordered
    return "holds" if ok else "does not hold"


def _ensemble_claim(judge: _Judge, evidence: list[str]) -> Verdict:
    table = judge.results.table("ensemble")
    if table is None:
        evidence.append("the ensemble curve did not run")
        return "not testable"
    exemplar = {c.x: c.summary for c in table.series("exemplar") if c.x}
    ensemble = {c.x: c.summary for c in table.series("ensemble") if c.x}
    shared = sorted(set(exemplar) & set(ensemble))
    if not shared:
        evidence.append("no ensemble point with examples")
        return "not testable"
    n = shared[0]
    better = ensemble[n].mean > exemplar[n].mean
    evidence.append(
        f"n={n}: ensemble {_cell(ensemble[n])} vs exemplar alone {_cell(exemplar[n])} ({table.metric})"
    )
    return "holds" if better else "does not hold"


def _combine(*verdicts: Verdict) -> Verdict:
    tested = [verdict for verdict in verdicts if verdict != "not testable"]
    if not tested:
        return "not testable"
    return "holds" if all(verdict == "holds" for verdict in tested) else "does not hold"


def evaluate_claims(results: RunResults, analysis: AnalysisDocument | None) -> list[Claim]:
    """The six claims of the paper (`../PAPER.md` order) judged on one run and its analyses."""
    judge = _Judge(results)
    claims = []

    evidence: list[str] = []
    verdict = judge.transfer(known.TEXT_TO_TEXT, [known.NO_CONTEXT_TEXT], evidence)
    claims.append(
        Claim(
            1,
            "A task given by examples is compressed into one vector at the answer marker",
            verdict,
            evidence,
        )
    )

    evidence = []
    claims.append(
        Claim(
            2,
            "Vectors of one task are similar across modalities; raw inputs cluster by modality",
            _similarity_claim(analysis, evidence),
            evidence,
        )
    )

    evidence = []
    claims.append(
        Claim(
            3,
            "Tokens pass input, task and answer phases across layers",
            _lens_claim(analysis, evidence),
            evidence,
        )
    )

    evidence = []
    verdict = judge.transfer(known.TEXT_TO_IMAGE, [known.NO_CONTEXT, known.TEXT_ICL_XBASE], evidence)
    image_icl = judge.summary(known.IMAGE_ICL)
    xpatch = judge.summary(known.TEXT_TO_IMAGE)
    if image_icl is not None and xpatch is not None:
        relation = "above" if xpatch.mean > image_icl.mean else "not above"
        evidence.append(f"xPatch is {relation} image ICL {_cell(image_icl)} (the paper: often above)")
    claims.append(
        Claim(
            4, "Text-ICL vectors patched into image queries transfer (xPatch beats xBase)", verdict, evidence
        )
    )

    evidence = []
    verdict = judge.transfer(known.LLM_TO_VLM, [known.NO_CONTEXT], evidence)
    cosine = results.vector_cosine
    if cosine is not None and cosine.at_layer is not None:
        evidence.append(f"base-LM vs model vector cosine at layer {cosine.layer}: {cosine.at_layer:.2f}")
    claims.append(Claim(5, "Vectors of the base language model transfer into its VLM", verdict, evidence))

    evidence = []
    instruction = judge.transfer(known.INSTRUCTION_PATCH, [known.NO_CONTEXT], evidence)
    ensemble = _ensemble_claim(judge, evidence)
    claims.append(
        Claim(
            6,
            "An instruction vector works, and averaging it with an exemplar vector beats the exemplar alone",
            _combine(instruction, ensemble),
            evidence,
        )
    )
    return claims
