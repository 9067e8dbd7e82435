"""One self-contained HTML report (figures embedded as data URIs) of a run directory.

from taskvec.report import write_report
write_report("runs/default")     # -> runs/default/report.html, runs/default/figures/*.png

`write_report(dir, sections=...)` takes the sections to write (`PAPER_SECTIONS` by default);
`with_section(PAPER_SECTIONS, ReportSection(...))` adds one, or replaces the one of its anchor.
"""

from taskvec.report.writer import PAPER_SECTIONS, ReportContext, ReportSection, with_section, write_report

__all__ = ["PAPER_SECTIONS", "ReportContext", "ReportSection", "with_section", "write_report"]
