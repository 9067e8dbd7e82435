"""The typed outcome of `taskvec check`: one row per invariant, as printed, saved in results.json and
shown in the report."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

CheckStatus = Literal["pass", "fail", "skip"]
CheckSet = Literal["full", "run"]


@dataclass(frozen=True)
class CheckRow:
    """One invariant measured on one kind of prompt.

    `deviation` is what was measured against `tolerance` (a relative error for floating-point
    comparisons, a count for exact ones); None for a skipped check or one that could not measure.
    """

    check: str  # the invariant's name, e.g. "residuals", as `taskvec check` and a failing run name it
    prompts: str  # which prompts it ran on: "text", "image", "text batch", ...
    what: str
    status: CheckStatus
    deviation: float | None
    tolerance: float | None
    seconds: float
    detail: str = ""

    @property
    def label(self) -> str:
        return f"{self.check} ({self.prompts})"

    def failure_line(self, model: str) -> str:
        """One line naming the invariant, the deviation and the model."""
        measured = (
            "no measurement" if self.deviation is None else f"deviation {format_number(self.deviation)}"
        )
        bound = "" if self.tolerance is None else f" > tolerance {format_number(self.tolerance)}"
        why = f": {self.detail}" if self.detail else ""
        return f"engine check {self.label} fails on {model}: {measured}{bound}{why}"


@dataclass(frozen=True)
class EngineChecks:
    """The engine's invariants measured on one loaded model (or declined with --no-check)."""

    model: str
    precision: str  # the row of the tolerance table used: fp32, bf16, fp16, 4bit or 8bit
    device: str
    check_set: CheckSet
    rows: list[CheckRow] = field(default_factory=list)
    seconds: float = 0.0
    declined: bool = False  # `taskvec run --no-check`: nothing was measured

    @property
    def applicable(self) -> list[CheckRow]:
        return [row for row in self.rows if row.status != "skip"]

    @property
    def failures(self) -> list[CheckRow]:
        return [row for row in self.rows if row.status == "fail"]

    @property
    def passed(self) -> bool:
        return not self.declined and not self.failures

    def headline(self) -> str:
        if self.declined:
            return "engine checks on this model: not run (--no-check)"
        passing = len(self.applicable) - len(self.failures)
        skipped = len(self.rows) - len(self.applicable)
        tail = f", {skipped} not applicable" if skipped else ""
        return f"engine checks on this model: {passing} of {len(self.applicable)} pass{tail}"


def format_number(value: float | None) -> str:
    if value is None:
        return "-"
    if value == 0:
        return "0"
    if math.isinf(value) or math.isnan(value):
        return str(value)
    if value == int(value) and abs(value) < 1e6:
        return str(int(value))
    return f"{value:.1e}"


TABLE_HEADER = ("check", "prompts", "result", "deviation", "tolerance", "seconds", "what")


def table_rows(checks: EngineChecks) -> list[tuple[str, ...]]:
    """The printed table's cells, one tuple per row (header first)."""
    rows: list[tuple[str, ...]] = [TABLE_HEADER]
    for row in checks.rows:
        what = f"{row.what} ({row.detail})" if row.detail else row.what
        rows.append(
            (
                row.check,
                row.prompts,
                row.status,
                format_number(row.deviation),
                format_number(row.tolerance),
                f"{row.seconds:.2f}",
                what,
            )
        )
    return rows


def format_table(checks: EngineChecks) -> str:
    """The rows as aligned text, the headline above them."""
    rows = table_rows(checks)
    widths = [max(len(row[column]) for row in rows) for column in range(len(TABLE_HEADER) - 1)]
    lines = [
        f"{checks.headline()} ({checks.model}, {checks.precision} on {checks.device}, {checks.seconds:.1f} s)"
    ]
    for row in rows:
        cells = [cell.ljust(width) for cell, width in zip(row[:-1], widths, strict=True)]
        lines.append("  ".join([*cells, row[-1]]).rstrip())
    return "\n".join(lines)
