"""The report's function-vector section: per task, each head's indirect effect per demonstration kind
(heatmap), the top heads shared by text and image demonstrations, what each function vector decodes
to, and where each function-vector condition was added."""

from __future__ import annotations

from taskvec.experiments.protocol.tables import placement
from taskvec.experiments.results.run_results import HeadEffects, RunResults
from taskvec.report import figures
from taskvec.report.html import escape, note, number, table
from taskvec.report.results_sections import FigureWriter, result_table

READING = (
    "Each panel is one demonstration kind (layers up, heads across): a head's colour is the gain in "
    "the correct answer's probability when its mean output over clean in-context prompts is put into "
    "a prompt whose labels are shuffled, at the last token (red raises it, blue lowers it; mean over "
    "seeds). Ringed heads are the top k, whose mean outputs, summed into the residual stream, make "
    "the function vector. The same heads lit in both panels mean the task is carried by the same "
    "heads whether it is given by text or by image examples."
)


def _panel(record: HeadEffects) -> str:
    modality = record.spec.removesuffix("-icl")
    return modality if record.role == "vlm" else f"base LM {modality}"


def _heads(heads: list[list[int]]) -> str:
    return " ".join(f"{layer}.{head}" for layer, head in heads)


def function_vector_section(results: RunResults, writer: FigureWriter) -> str:
    records = results.function_vectors
    if not records:
        return note("No function-vector conditions in this run (--no-function-vectors, or none planned).")
    parts = []
    result = results.table("function_vectors")
    if result is not None:
        parts.append(result_table(results, result))
    # A function vector's choice carries its scale, or its curve per scale when no layer helped.
    placements = [
        [
            escape(name),
            escape(placement(choice.chosen, choice.scale, choice)),
            number(choice.validation_at_chosen),
            number(choice.unpatched_validation),
        ]
        for name, choice in results.layers.items()
        if choice.scale is not None or choice.validation_per_scale
    ]
    headers = ["condition", "layer and scale (added)", "validation accuracy there", "unpatched"]
    parts.append(table(headers, placements))
    overlaps = {overlap.task: overlap for overlap in results.head_overlaps}
    for task in results.tasks:
        of_task = [record for record in records if record.task == task]
        if not of_task:
            continue
        parts.append(f"<h3>{escape(task)}</h3>")
        effects = {_panel(record): record.effects for record in of_task}
        heads = {_panel(record): record.top_heads for record in of_task}
        parts.append(
            writer.add(
                f"head_effects_{task}",
                figures.head_effects(effects, heads),
                f"indirect effect per head, {task}",
            )
        )
        rows = [
            [escape(_panel(r)), escape(_heads(r.top_heads)), escape(" ".join(map(repr, r.top_tokens)))]
            for r in of_task
        ]
        parts.append(
            table(["demonstrations", f"top {of_task[0].k} heads", "function vector decodes as"], rows)
        )
        overlap = overlaps.get(task)
        if overlap is not None:
            correlation = "–" if overlap.correlation is None else number(overlap.correlation)
            parts.append(
                note(
                    f"Text and image demonstrations share {len(overlap.shared)} of their top {overlap.k} "
                    f"heads ({escape(_heads(overlap.shared)) or 'none'}); over every head the effects "
                    f"correlate at {correlation} (Pearson)."
                )
            )
    parts.append(note(READING))
    return "\n".join(parts)
