"""Report sections from analysis.json: lens phases, similarity, 2-D maps, decoded tokens, conflict."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from taskvec.report import figures
from taskvec.report.html import escape, missing, note, number, table
from taskvec.report.results_sections import FigureWriter

PHASES = ("input", "task", "answer")


def lens_section(analysis: Mapping[str, Any], writer: FigureWriter) -> str:
    lens = analysis.get("lens") or {}
    if not lens:
        return missing("lens phases in analysis.json")
    first = next(iter(lens.values()))
    parts = [
        note(
            "Logit lens at the query's final ':' (the position before the answer). Each prompt's "
            "probability curve is divided by its sum over layers, then averaged over prompts. "
            f"Tokens: {first.get('token_rule', '')}. Task words reduced by "
            f"{first.get('task_word_reduce', 'max')}."
        )
    ]
    peaks = analysis.get("lens_peaks") or {}
    if peaks:
        rows = [[escape(spec), *(number(phases.get(p), 1) for p in PHASES)] for spec, phases in peaks.items()]
        parts.append("<h3>Peak layer (mean over tasks)</h3>" + table(["spec", *PHASES], rows))
    parts.append(
        writer.add(
            "lens_mean",
            figures.lens_phases("Three phases, averaged over tasks", figures.mean_lens_curves(lens)),
            "mean lens phases",
        )
    )
    for task, result in lens.items():
        parts.append(f"<h3>{escape(task)}</h3>")
        parts.append(
            writer.add(f"lens_{task}", figures.lens_phases(task, result.get("curves") or {}), f"lens {task}")
        )
        for spec, reason in (result.get("skipped") or {}).items():
            parts.append(note(f"{spec} not run: {reason}"))
    return "\n".join(parts)


def similarity_section(analysis: Mapping[str, Any], writer: FigureWriter) -> str:
    similarity = analysis.get("similarity")
    if not similarity:
        return missing("similarity in analysis.json")
    layer = similarity.get("layer")
    parts = [
        writer.add(
            "similarity",
            figures.similarity_heatmap(
                similarity["labels"],
                similarity["matrix"],
                f"Cosine similarity of task vectors, layer {layer}",
            ),
            "similarity matrix",
        )
    ]
    summary = similarity.get("summary") or {}
    labels = {
        "within_task_cross_spec": "same task, different specification",
        "within_task_text_image": "same task, text ICL vs image ICL",
        "cross_task": "different tasks",
        "cross_task_same_spec": "different tasks, same specification",
    }
    centered = similarity.get("summary_centered") or {}
    rows = [
        [escape(text), number(summary.get(key), 3), number(centered.get(key), 3)]
        for key, text in labels.items()
    ]
    parts.append(
        table([f"pairs of VLM vectors (layer {layer})", "mean cosine", "mean cosine, mean-centred"], rows)
    )
    per_layer = similarity.get("summary_per_layer") or []
    series = {
        text: [row.get(key) for row in per_layer]
        for key, text in labels.items()
        if key != "cross_task_same_spec"
    }
    parts.append(
        writer.add(
            "similarity_per_layer",
            figures.per_layer_lines(
                series, title="Mean cosine per layer", ylabel="mean cosine", chosen=layer
            ),
            "similarity per layer",
        )
    )
    comparison = similarity.get("llm_vs_vlm")
    if comparison:
        parts.append("<h3>Base LM vs VLM text-ICL vectors</h3>")
        parts.append(note(f"mean cosine at layer {layer}: {number(comparison.get('mean_at_layer'), 3)}"))
        parts.append(
            writer.add(
                "similarity_llm_vlm",
                figures.per_layer_lines(
                    comparison.get("per_task") or {},
                    title="LM vs VLM vector cosine",
                    ylabel="cosine",
                    chosen=layer,
                ),
                "LM vs VLM cosine per layer",
            )
        )
    else:
        parts.append(note("No base-LM vectors in this run: LM vs VLM comparison not shown."))
    return "\n".join(parts)


def embedding_map_section(analysis: Mapping[str, Any], writer: FigureWriter) -> str:
    mapped = analysis.get("embedding_map")
    if not mapped:
        return missing("2-D map (t-SNE / PCA) in analysis.json")
    parts = [
        writer.add("embedding_map", figures.embedding_maps(mapped), "t-SNE of task vectors and raw inputs")
    ]
    rows = [
        [
            escape(name),
            number((mapped.get(key) or {}).get("same_task_neighbour")),
            number((mapped.get(key) or {}).get("same_spec_neighbour")),
        ]
        for key, name in (("vectors", "task vectors"), ("embeddings", "raw input embeddings"))
    ]
    parts.append(table(["points", "nearest neighbour: same task", "nearest neighbour: same spec"], rows))
    parts.append(
        note(
            "Shares computed in the full space (cosine), not in 2-D. The paper's claim: vectors agree "
            "by task, raw inputs by modality."
        )
    )
    return "\n".join(parts)


def decoded_tokens_section(analysis: Mapping[str, Any]) -> str:
    decoded = analysis.get("decoded_tokens") or {}
    if not decoded:
        return missing("decoded tokens of the vectors in analysis.json")
    layer = (analysis.get("layer") or {}).get("chosen")
    parts = [note("Logit lens of each task vector itself (final norm and softcap applied once).")]
    for model, vectors in decoded.items():
        if isinstance(layer, int):
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


def _tokens_cell(tokens: list[Any]) -> str:
    return ", ".join(
        f"<code>{escape(repr(token))}</code> {number(probability)}" for token, probability in tokens
    )


def conflict_section(analysis: Mapping[str, Any]) -> str:
    rows_data = analysis.get("conflict") or []
    if not rows_data:
        return missing("task conflict in analysis.json (needs tasks sharing inputs)")
    outcomes = ("a", "b", "both", "neither")
    rows = []
    for row in rows_data:
        rows.append(
            [
                escape(row["task_a"]),
                escape(row["task_b"]),
                escape(row["context"]),
                number(row["layer"]),
                number(row["items"]),
                " / ".join(number(row["baseline"][o]) for o in outcomes),
                " / ".join(number(row["patched"][o]) for o in outcomes),
            ]
        )
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
        [escape(row["task_a"]), escape(e["input"]), escape(e["answer_a"]), escape(e["answer_b"]),
         escape(repr(e["baseline"])), escape(repr(e["patched"]))]
        for row in rows_data
        for e in row.get("examples", [])[:1]
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
