"""`write_report`: results.json + analysis.json -> figures/*.png and one self-contained report.html.

The sections are an explicit list: each reads the typed run results, the analyses' document, or
both; `register_section` adds one (an analysis registered with `taskvec.analysis` adds its section
here). A file that is absent is named at the top of the report and the sections that need it say
they are missing. A file that is there but cannot be read (truncated, empty, another format, fields
of the wrong type), or a directory with neither file, is refused with a ValueError naming it, and
nothing is written: the report is built whole, then moved over the last one with its figures.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from taskvec.analysis import AnalysisDocument
from taskvec.atomic_files import write_text_atomically
from taskvec.experiments.results.run_results import RunResults
from taskvec.report import analysis_sections as analysis_parts
from taskvec.report import results_sections as results_parts
from taskvec.report.checks_section import engine_checks_section
from taskvec.report.claims import evaluate_claims
from taskvec.report.function_vector_section import function_vector_section
from taskvec.report.html import missing, note, page
from taskvec.typed_json import to_json


@dataclass
class ReportContext:
    root: Path
    results: RunResults | None
    analysis: AnalysisDocument | None
    writer: results_parts.FigureWriter

    @property
    def analysis_results(self) -> dict[str, Any]:
        """Each analysis's result by name, plus the layer the analyses read."""
        if self.analysis is None:
            return {}
        return {**self.analysis.results, "layer": to_json(self.analysis.layer)}


@dataclass(frozen=True)
class ReportSection:
    anchor: str
    heading: str
    needs: str  # "results", "analysis" or "both"
    build: Callable[[ReportContext], str]


def _needs_results(build: Callable[[RunResults, ReportContext], str]) -> Callable[[ReportContext], str]:
    def section(context: ReportContext) -> str:
        assert context.results is not None
        return build(context.results, context)

    return section


SECTIONS: list[ReportSection] = [
    ReportSection(
        "claims",
        "The paper's claims on this run",
        "both",
        _needs_results(
            lambda r, c: results_parts.claims_section(evaluate_claims(r, c.analysis_results or None))
        ),
    ),
    ReportSection("overview", "Run", "results", _needs_results(lambda r, _c: results_parts.overview(r))),
    ReportSection(
        "engine-checks",
        "Engine checks",
        "results",
        _needs_results(lambda r, _c: engine_checks_section(r)),
    ),
    ReportSection(
        "tables",
        "Results beside the paper",
        "results",
        _needs_results(lambda r, _c: results_parts.tables_section(r)),
    ),
    ReportSection(
        "conditions",
        "Every condition",
        "results",
        _needs_results(lambda r, _c: results_parts.all_conditions_section(r)),
    ),
    ReportSection(
        "layers",
        "Layer choice (validation sweeps)",
        "results",
        _needs_results(lambda r, c: results_parts.layer_section(r, c.writer)),
    ),
    ReportSection(
        "llm-to-vlm",
        "LLM -> VLM transfer",
        "results",
        _needs_results(lambda r, c: results_parts.llm_to_vlm_section(r, c.writer)),
    ),
    ReportSection(
        "function-vectors",
        "Function vectors (attention heads) beside task vectors",
        "results",
        _needs_results(lambda r, c: function_vector_section(r, c.writer)),
    ),
    ReportSection(
        "ensemble",
        "Instruction + exemplar ensemble",
        "results",
        _needs_results(lambda r, c: results_parts.ensemble_section(r, c.writer)),
    ),
    ReportSection(
        "lens",
        "Three phases (logit lens)",
        "analysis",
        lambda c: analysis_parts.lens_section(c.analysis_results, c.writer),
    ),
    ReportSection(
        "similarity",
        "Similarity of task vectors",
        "analysis",
        lambda c: analysis_parts.similarity_section(c.analysis_results, c.writer),
    ),
    ReportSection(
        "map",
        "t-SNE of vectors and inputs",
        "analysis",
        lambda c: analysis_parts.embedding_map_section(c.analysis_results, c.writer),
    ),
    ReportSection(
        "tokens",
        "Decoded task vectors",
        "analysis",
        lambda c: analysis_parts.decoded_tokens_section(c.analysis_results),
    ),
    ReportSection(
        "conflict", "Task conflict", "analysis", lambda c: analysis_parts.conflict_section(c.analysis_results)
    ),
    ReportSection(
        "examples",
        "Example generations",
        "results",
        _needs_results(lambda r, c: results_parts.examples_section(r, c.root)),
    ),
]


def register_section(section: ReportSection, *, before: str | None = "examples") -> ReportSection:
    """Add a section to every later report, before the section `before` (None: at the end)."""
    if any(existing.anchor == section.anchor for existing in SECTIONS):
        raise ValueError(f"a report section {section.anchor!r} is already registered")
    anchors = [existing.anchor for existing in SECTIONS]
    SECTIONS.insert(anchors.index(before) if before in anchors else len(SECTIONS), section)
    return section


def unregister_section(anchor: str) -> None:
    SECTIONS[:] = [section for section in SECTIONS if section.anchor != anchor]


def _load(path: Path, read: Callable[[Path], Any], problems: list[str]) -> Any:
    """The file read, None when it is absent (named in `problems`); a ValueError naming it when it is
    there but cannot be read, so that no report is written from it."""
    if not path.exists():
        problems.append(f"{path.name} not found")
        return None
    try:
        return read(path)
    except (ValueError, OSError) as error:
        raise ValueError(f"no report written: {error}") from None


def write_report(run_dir: str | Path) -> Path:
    """Write `run_dir/report.html` (and `run_dir/figures/*.png`) from the run's results and analyses."""
    root = Path(run_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"no run directory at {root}")
    if not (root / "results.json").exists() and not (root / "analysis.json").exists():
        raise FileNotFoundError(
            f"{root} is not a run directory: it has no results.json or analysis.json "
            "(`taskvec run --out DIR` makes one)"
        )
    problems: list[str] = []
    results = _load(root / "results.json", RunResults.read, problems)
    analysis = _load(root / "analysis.json", AnalysisDocument.read, problems)
    writer = results_parts.FigureWriter(root / "figures")
    try:
        target = _write_page(root, results, analysis, problems, writer)
    finally:
        writer.discard()  # the figures of a report that failed (none left after commit)
    return target


def _write_page(
    root: Path,
    results: RunResults | None,
    analysis: AnalysisDocument | None,
    problems: list[str],
    writer: results_parts.FigureWriter,
) -> Path:
    context = ReportContext(root, results, analysis, writer)
    sections = []
    for section in SECTIONS:
        lacking = [
            name
            for name, value in (("results.json", results), ("analysis.json", analysis))
            if value is None and section.needs in (name.split(".")[0], "both")
        ]
        if lacking and not (section.needs == "both" and results is not None):
            sections.append((section.anchor, section.heading, missing(" and ".join(lacking))))
            continue
        sections.append((section.anchor, section.heading, section.build(context)))
    if analysis is not None and analysis.errors:
        sections.append(
            ("errors", "Analysis steps that failed", analysis_parts.errors_section(analysis.errors))
        )
    model = results.meta.model if results is not None else analysis.meta.model if analysis else root.name
    intro = note(f"Written {datetime.now(UTC).isoformat(timespec='seconds')} from {root.name}/.")
    intro += "".join(missing(problem) for problem in problems)
    text = page(f"taskvec report: {model}", sections, intro)
    writer.commit()
    target = root / "report.html"
    write_text_atomically(target, text)
    return target
