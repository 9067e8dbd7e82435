"""The report's engine-checks section: what `taskvec check` measured on each model of the run before
its first step, or that the run was told not to (--no-check)."""

from __future__ import annotations

from taskvec.checks.results import TABLE_HEADER, EngineChecks, table_rows
from taskvec.experiments.results.run_results import RunResults
from taskvec.report.html import escape, note, table

READING = (
    "Before any step the run measures the engine's invariants on each model as it was loaded (device, "
    "dtype, device map, quantization): a failing check stops the run. `taskvec check` runs the whole "
    "set; the tolerances per precision are in taskvec/checks/tolerances.py and the README."
)


def _model_checks(checks: EngineChecks) -> str:
    heading = f"<h3>{escape(checks.model)}: {escape(checks.headline())}</h3>"
    if checks.declined:
        return heading + note("The run was started with --no-check: no invariant was measured on this model.")
    where = note(f"{checks.precision} on {checks.device}, {checks.seconds:.1f} s")
    cells = [[escape(cell) for cell in row] for row in table_rows(checks)[1:]]
    classes = ["" if row.status != "fail" else "fail" for row in checks.rows]
    return heading + where + table(TABLE_HEADER, cells, text_columns=3, row_classes=classes)


def engine_checks_section(results: RunResults) -> str:
    if not results.engine_checks:
        return note("This run's results.json records no engine checks.")
    return note(READING) + "".join(_model_checks(checks) for checks in results.engine_checks)
