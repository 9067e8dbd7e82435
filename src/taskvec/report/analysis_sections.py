"""Report sections from analysis.json: lens phases, similarity, 2-D maps, decoded tokens, conflict."""

from __future__ import annotations

from collections.abc import Mapping

from taskvec.analysis import (
    CONFLICT,
    DECODED_TOKENS,
    EMBEDDING_MAP,
    LENS,
    LENS_PEAKS,
    PHASES,
    SIMILARITY,
    AnalysisDocument,
    PairSummary,
    ScoredToken,
)
from taskvec.report import figures
from taskvec.report.html import escape, missing, note, number, table
from taskvec.report.results_sections import FigureWriter


def lens_section(analysis: AnalysisDocument, writer: FigureWriter) -> str:
    lens = analysis.result(LENS)
    if lens is None or not lens.per_task:
        return missing("lens phases in analysis.json")
    first = next(iter(lens.per_task.values()))
    parts = [
        note(
            "Logit lens at the query's final ':' (the position before the answer). Each prompt's "
            "probability curve is divided by its sum over layers, then averaged over prompts. "
            f"Tokens: {first.token_rule}. Task words reduced by {first.task_word_reduce}."
        )
    ]
    peaks = analysis.result(LENS_PEAKS)
    if peaks is not None and peaks.per_spec:
        rows = [
            [escape(spec), *(number(phases.get(p), 1) for p in PHASES)]
            for spec, phases in peaks.per_spec.items()
        ]
        parts.append("<h3>Peak layer (mean over tasks)</h3>" + table(["spec", *PHASES], rows))
    parts.append(
        writer.add(
            "lens_mean",
            figures.lens_phases(
                "Three phases, averaged over tasks", figures.mean_lens_curves(lens), figures.mean_of_tasks
            ),
            "mean lens phases",
        )
    )
    for task, result in lens.per_task.items():
        parts.append(f"<h3>{escape(task)}</h3>")
        parts.append(writer.add(f"lens_{task}", figures.lens_phases(task, result.curves), f"lens {task}"))
        for spec, reason in result.skipped.items():
            parts.append(note(f"{spec} not run: {reason}"))
    return "\n".join(parts)


def _pairs(summary: PairSummary) -> list[tuple[str, float | None]]:
    """The pair summaries shown, each with what it averages over."""
    return [
        ("same task, different specification", summary.within_task_cross_spec),
        ("same task, text ICL vs image ICL", summary.within_task_text_image),
        ("different tasks", summary.cross_task),
        ("different tasks, same specification", summary.cross_task_same_spec),
    ]


def similarity_section(analysis: AnalysisDocument, writer: FigureWriter) -> str:
    similarity = analysis.result(SIMILARITY)
    if similarity is None:
        return missing("similarity in analysis.json")
    layer = similarity.layer
    parts = [
        writer.add(
            "similarity",
            figures.similarity_heatmap(
                similarity.labels, similarity.matrix, f"Cosine similarity of task vectors, layer {layer}"
            ),
            "similarity matrix",
        )
    ]
    rows = [
        [escape(text), number(raw, 3), number(centred, 3)]
        for (text, raw), (_, centred) in zip(
            _pairs(similarity.summary), _pairs(similarity.summary_centered), strict=True
        )
    ]
    parts.append(
        table([f"pairs of VLM vectors (layer {layer})", "mean cosine", "mean cosine, mean-centred"], rows)
    )
    # "different tasks, same specification" is left out of the plot: it follows "different tasks".
    series: dict[str, list[float | None]] = {}
    for row in similarity.summary_per_layer:
        for text, value in _pairs(row)[:3]:
            series.setdefault(text, []).append(value)
    parts.append(
        writer.add(
            "similarity_per_layer",
            figures.per_layer_lines(
                series, title="Mean cosine per layer", ylabel="mean cosine", chosen=layer
            ),
            "similarity per layer",
        )
    )
    comparison = similarity.llm_vs_vlm
    if comparison is not None:
        parts.append("<h3>Base LM vs VLM text-ICL vectors</h3>")
        parts.append(note(f"mean cosine at layer {layer}: {number(comparison.mean_at_layer, 3)}"))
        parts.append(
            writer.add(
                "similarity_llm_vlm",
                figures.per_layer_lines(
                    comparison.per_task, title="LM vs VLM vector cosine", ylabel="cosine", chosen=layer
                ),
                "LM vs VLM cosine per layer",
            )
        )
    else:
        parts.append(note("No base-LM vectors in this run: LM vs VLM comparison not shown."))
    return "\n".join(parts)


def embedding_map_section(analysis: AnalysisDocument, writer: FigureWriter) -> str:
    mapped = analysis.result(EMBEDDING_MAP)
    if mapped is None:
        return missing("2-D map (t-SNE / PCA) in analysis.json")
    parts = [
        writer.add("embedding_map", figures.embedding_maps(mapped), "t-SNE of task vectors and raw inputs")
    ]
    rows = [
        [escape(name), number(points.same_task_neighbour), number(points.same_spec_neighbour)]
        for points, name in ((mapped.vectors, "task vectors"), (mapped.embeddings, "raw input embeddings"))
    ]
    parts.append(table(["points", "nearest neighbour: same task", "nearest neighbour: same spec"], rows))
    parts.append(
        note(
            "Shares computed in the full space (cosine), not in 2-D. The paper's claim: vectors agree "
            "by task, raw inputs by modality."
        )
    )
    return "\n".join(parts)


def decoded_tokens_section(analysis: AnalysisDocument) -> str:
    decoded = analysis.result(DECODED_TOKENS)
    if decoded is None or not decoded.by_model:
        return missing("decoded tokens of the vectors in analysis.json")
    layer = analysis.layer.chosen
    parts = [note("Logit lens of each task vector itself (final norm and softcap applied once).")]
    for model, vectors in decoded.by_model.items():
        rows = [
            [escape(label), _tokens_cell(layers[layer])]
            for label, layers in vectors.items()
            if layer < len(layers)
        ]
        parts.append(f"<h3>{escape(model.upper())} vectors at layer {layer}</h3>")
        parts.append(table(["vector", "top tokens (probability)"], rows, text_columns=2))
        for label, layers in vectors.items():
            rows = [[number(i), _tokens_cell(tokens)] for i, tokens in enumerate(layers)]
            parts.append(
                f"<details><summary>{escape(model)}: {escape(label)}, every layer</summary>"
                + table(["layer", "top tokens"], rows, text_columns=2)
                + "</details>"
            )
    return "\n".join(parts)


def _tokens_cell(tokens: list[ScoredToken]) -> str:
    return ", ".join(
        f"<code>{escape(repr(scored.token))}</code> {number(scored.probability)}" for scored in tokens
    )


def conflict_section(analysis: AnalysisDocument) -> str:
    conflict = analysis.result(CONFLICT)
    if conflict is None or not conflict.rows:
        return missing("task conflict in analysis.json (needs tasks sharing inputs)")
    outcomes = ("a", "b", "both", "neither")
    rows = [
        [
            escape(row.task_a),
            escape(row.task_b),
            escape(row.context),
            number(row.layer),
            number(row.items),
            " / ".join(number(row.baseline[o]) for o in outcomes),
            " / ".join(number(row.patched[o]) for o in outcomes),
        ]
        for row in conflict.rows
    ]
    headers = [
        "prompted for A",
        "vector of B",
        "A given by",
        "layer",
        "queries",
        "without patch",
        "with B's vector",
    ]
    text = note("Counts are A's answer / B's answer / both / neither.") + table(headers, rows, text_columns=3)
    examples = [
        [escape(row.task_a), escape(e.input), escape(e.answer_a), escape(e.answer_b),
         escape(repr(e.baseline)), escape(repr(e.patched))]
        for row in conflict.rows
        for e in row.examples[:1]
    ]  # fmt: skip
    if examples:
        headers = ["A", "input", "A's answer", "B's answer", "without patch", "with B's vector"]
        text += (
            "<details><summary>examples</summary>" + table(headers, examples, text_columns=6) + "</details>"
        )
    return text


def errors_section(errors: Mapping[str, str]) -> str:
    return "".join(
        f'<div class="error">{escape(step)}: {escape(message)}</div>' for step, message in errors.items()
    )
