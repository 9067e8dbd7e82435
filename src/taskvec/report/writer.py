"""`write_report`: results.json + analysis.json -> figures/*.png and one self-contained report.html.

The sections are an explicit list, `PAPER_SECTIONS` by default: each reads the typed run results,
the analyses' document, or both, and names the analyses whose results it reads (analysis.json is
read with those, so a result that does not fit its type refuses the report). `with_section` adds
one (the section of an analysis added with `taskvec.analysis.with_analysis`) or replaces one of the
same anchor. A file that is absent is named at the top of the report and the sections that need it say
they are missing. A file that is there but cannot be read (truncated, empty, another format, fields
of the wrong type), or a directory with neither file, is refused with a ValueError naming it, and
nothing is written: the report is built whole, then moved over the last one with its figures.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from taskvec.analysis import (
    CONFLICT,
    DECODED_TOKENS,
    EMBEDDING_MAP,
    LENS,
    LENS_PEAKS,
    SIMILARITY,
    Analysis,
    AnalysisDocument,
)
from taskvec.atomic_files import write_text_atomically
from taskvec.experiments.results.run_results import RunResults
from taskvec.report import analysis_sections as analysis_parts
from taskvec.report import results_sections as results_parts
from taskvec.report.checks_section import engine_checks_section
from taskvec.report.claims import evaluate_claims
from taskvec.report.function_vector_section import function_vector_section
from taskvec.report.html import missing, note, page


@dataclass
class ReportContext:
    root: Path
    results: RunResults | None
    analysis: AnalysisDocument | None
    writer: results_parts.FigureWriter


@dataclass(frozen=True)
class ReportSection:
    """One section; `analyses` are those whose results `build` reads from `context.analysis`."""

    anchor: str
    heading: str
    needs: str  # "results", "analysis" or "both"
    build: Callable[[ReportContext], str]
    analyses: tuple[Analysis[Any], ...] = ()


def _needs_results(build: Callable[[RunResults, ReportContext], str]) -> Callable[[ReportContext], str]:
    def section(context: ReportContext) -> str:
        assert context.results is not None
        return build(context.results, context)

    return section


PAPER_SECTIONS: tuple[ReportSection, ...] = (
    ReportSection(
        "claims",
        "The paper's claims on this run",
        "both",
        _needs_results(lambda r, c: results_parts.claims_section(evaluate_claims(r, c.analysis))),
        (SIMILARITY, EMBEDDING_MAP, LENS_PEAKS),
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
        lambda c: analysis_parts.lens_section(_analysis(c), c.writer),
        (LENS, LENS_PEAKS),
    ),
    ReportSection(
        "similarity",
        "Similarity of task vectors",
        "analysis",
        lambda c: analysis_parts.similarity_section(_analysis(c), c.writer),
        (SIMILARITY,),
    ),
    ReportSection(
        "map",
        "t-SNE of vectors and inputs",
        "analysis",
        lambda c: analysis_parts.embedding_map_section(_analysis(c), c.writer),
        (EMBEDDING_MAP,),
    ),
    ReportSection(
        "tokens",
        "Decoded task vectors",
        "analysis",
        lambda c: analysis_parts.decoded_tokens_section(_analysis(c)),
        (DECODED_TOKENS,),
    ),
    ReportSection(
        "conflict",
        "Task conflict",
        "analysis",
        lambda c: analysis_parts.conflict_section(_analysis(c)),
        (CONFLICT,),
    ),
    ReportSection(
        "examples",
        "Example generations",
        "results",
        _needs_results(lambda r, c: results_parts.examples_section(r, c.root)),
    ),
)


def with_section(
    sections: Sequence[ReportSection], section: ReportSection, *, before: str | None = "examples"
) -> tuple[ReportSection, ...]:
    """The list with `section` in place of the one of its anchor, or else inserted before the
    section `before` (None, or an anchor not in the list: at the end)."""
    anchors = [existing.anchor for existing in sections]
    if section.anchor in anchors:
        index = anchors.index(section.anchor)
        return (*sections[:index], section, *sections[index + 1 :])
    index = anchors.index(before) if before in anchors else len(sections)
    return (*sections[:index], section, *sections[index:])


def _analysis(context: ReportContext) -> AnalysisDocument:
    assert context.analysis is not None  # a section that needs analysis.json runs only with it
    return context.analysis


def _read_analyses(sections: Sequence[ReportSection]) -> Callable[[Path], AnalysisDocument]:
    analyses = {analysis.name: analysis for section in sections for analysis in section.analyses}
    return lambda path: AnalysisDocument.read(path, tuple(analyses.values()))


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


def write_report(run_dir: str | Path, sections: Sequence[ReportSection] = PAPER_SECTIONS) -> Path:
    """Write `run_dir/report.html` (and `run_dir/figures/*.png`) from the run's results and analyses,
    one part per section of `sections` (the paper's by default)."""
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
    analysis = _load(root / "analysis.json", _read_analyses(sections), problems)
    writer = results_parts.FigureWriter(root / "figures")
    try:
        target = _write_page(root, results, analysis, problems, writer, sections)
    finally:
        writer.discard()  # the figures of a report that failed (none left after commit)
    return target


def _write_page(
    root: Path,
    results: RunResults | None,
    analysis: AnalysisDocument | None,
    problems: list[str],
    writer: results_parts.FigureWriter,
    chosen: Sequence[ReportSection],
) -> Path:
    context = ReportContext(root, results, analysis, writer)
    sections = []
    for section in chosen:
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
