"""One self-contained HTML report (figures embedded as data URIs) of a run directory.

from taskvec.report import write_report
write_report("runs/default")     # -> runs/default/report.html, runs/default/figures/*.png
"""

from taskvec.report.writer import write_report

__all__ = ["write_report"]
