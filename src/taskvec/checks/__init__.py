"""`taskvec check`: the engine's invariants measured on the model the user loaded, on the hardware it
runs on, each against a tolerance for its precision (tolerances.py)."""

from taskvec.checks.results import CheckRow, EngineChecks, format_table
from taskvec.checks.suite import CHECK_NAMES, CHECKS, EngineCheckFailed, checks_before_run, run_checks
from taskvec.checks.tolerances import TOLERANCES, Tolerances, precision_of

__all__ = [
    "CHECKS",
    "CHECK_NAMES",
    "TOLERANCES",
    "CheckRow",
    "EngineCheckFailed",
    "EngineChecks",
    "Tolerances",
    "checks_before_run",
    "format_table",
    "precision_of",
    "run_checks",
]
