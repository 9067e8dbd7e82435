"""`write_report`: results.json + analysis.json -> figures/*.png and one self-contained report.html."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

from taskvec.report import analysis_sections as analysis_parts
from taskvec.report import results_sections as results_parts
from taskvec.report.html import escape, missing, note, page


def _read_json(path: Path, problems: list[str]) -> dict[str, Any]:
    """The file's JSON object, or {} with the reason noted (absent, unreadable, not an object)."""
    if not path.is_file():
        problems.append(f"{path.name} not found")
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        problems.append(f"{path.name} cannot be read ({error})")
        return {}
    if not isinstance(data, dict):
        problems.append(f"{path.name} is not a JSON object")
        return {}
    return data


def _guarded(build: Callable[[], str]) -> str:
    """A section that trips over an unexpected shape says so instead of losing the whole report."""
    try:
        return build()
    except (KeyError, TypeError, ValueError, IndexError, AttributeError) as error:
        reason = f"{type(error).__name__}: {error}"
        return f'<div class="error">This section could not be drawn: {escape(reason)}</div>'


def write_report(run_dir: str | Path) -> Path:
    """Write `run_dir/report.html` (and `run_dir/figures/*.png`) from whatever results exist.

    Either JSON file may be missing or partial: each section renders what it finds and says what
    it lacks, so a report of an interrupted run is still worth opening.
    """
    root = Path(run_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"no run directory at {root}")
    problems: list[str] = []
    results = _read_json(root / "results.json", problems)
    analysis = _read_json(root / "analysis.json", problems)
    writer = results_parts.FigureWriter(root / "figures")

    builders: list[tuple[str, str, Callable[[], str]]] = [
        ("overview", "Run", partial(results_parts.overview, results)),
        ("tables", "Results beside the paper", partial(results_parts.result_tables, results)),
        ("layers", "Layer choice (validation sweeps)", partial(results_parts.layer_section, results, writer)),
        ("llm-to-vlm", "LLM -> VLM transfer", partial(results_parts.llm_to_vlm_section, results, writer)),
        (
            "ensemble",
            "Instruction + exemplar ensemble",
            partial(results_parts.ensemble_section, results, writer),
        ),
        ("lens", "Three phases (logit lens)", partial(analysis_parts.lens_section, analysis, writer)),
        (
            "similarity",
            "Similarity of task vectors",
            partial(analysis_parts.similarity_section, analysis, writer),
        ),
        (
            "map",
            "t-SNE of vectors and inputs",
            partial(analysis_parts.embedding_map_section, analysis, writer),
        ),
        ("tokens", "Decoded task vectors", partial(analysis_parts.decoded_tokens_section, analysis)),
        ("conflict", "Task conflict", partial(analysis_parts.conflict_section, analysis)),
        ("examples", "Example generations", partial(results_parts.examples_section, results, root)),
    ]
    sections = [(anchor, heading, _guarded(build)) for anchor, heading, build in builders]
    if not results:
        sections[0] = ("overview", "Run", missing("results.json"))
    errors = analysis_parts.errors_section(analysis)
    if errors:
        sections.append(("errors", "Analysis steps that failed", errors))
    title = f"taskvec report: {(results.get('meta') or analysis.get('meta') or {}).get('model', root.name)}"
    layer = analysis.get("layer") or {}
    intro = note(
        f"Written {datetime.now(UTC).isoformat(timespec='seconds')} from {root.name}/. "
        + (f"Analyses at layer {layer.get('chosen')} ({layer.get('source')}). " if layer else "")
    )
    intro += "".join(missing(problem) for problem in problems)
    target = root / "report.html"
    target.write_text(page(title, sections, intro), encoding="utf-8")
    return target
