"""Progress shown the way its reader sees it: redrawn bars on a terminal, one line per stage elsewhere.

A bar redraws itself by writing carriage returns, which a terminal turns into one moving line and a
file or a CI log keeps as hundreds of lines of frames. Off a terminal, a stage prints one line when
it finishes (what it was, how many it did, how long it took), and the progress of steps inside a
stage (`leave=False`: the batches of one extraction) prints nothing.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any, Protocol, TypeVar

from tqdm import tqdm

Item = TypeVar("Item")


class Counter(Protocol):
    """The part of a tqdm bar that counts by hand (a bar with no iterable)."""

    total: float | None

    def update(self, n: float = 1) -> Any: ...

    def set_postfix(self, ordered_dict: Any = None, refresh: bool = True, **kwargs: Any) -> None: ...

    def refresh(self) -> Any: ...

    def close(self) -> None: ...


def on_terminal() -> bool:
    """Whether progress is read on a terminal (tqdm draws on stderr)."""
    isatty = getattr(sys.stderr, "isatty", None)
    return bool(isatty and isatty())


class StageLine:
    """Off a terminal: counts what a bar would, then prints one line when the stage ends."""

    def __init__(self, desc: str, total: float | None = None, unit: str = "it") -> None:
        self.desc, self.total, self.unit = desc, total, unit
        self.n: float = 0
        self.postfix = ""
        self._started = time.monotonic()
        self._closed = False

    def wrap(self, iterable: Iterable[Item]) -> Iterator[Item]:
        for item in iterable:
            yield item
            self.n += 1
        self.close()  # only a stage that ran to its end is reported as finished

    def update(self, n: float = 1) -> None:
        self.n += n

    def set_postfix(self, ordered_dict: Any = None, refresh: bool = True, **kwargs: Any) -> None:
        values = {**dict(ordered_dict or {}), **kwargs}
        self.postfix = ", ".join(f"{key}={value}" for key, value in values.items())

    def refresh(self) -> None:
        pass

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        count = f"{self.n:g}" if self.total is None else f"{self.n:g}/{self.total:g}"
        if self.unit != "it":
            count += f" {self.unit}"
        postfix = f" ({self.postfix})" if self.postfix else ""
        seconds = time.monotonic() - self._started
        print(f"{self.desc}: {count} in {seconds:.1f} s{postfix}", file=sys.stderr, flush=True)


def with_progress(
    iterable: Iterable[Item], desc: str | None, *, enabled: bool = True, leave: bool = True
) -> Iterable[Item]:
    """`iterable` with its progress shown: a bar on a terminal, a line at the end of a stage off one.
    Nothing when `enabled` is False or `desc` is None."""
    if not enabled or desc is None:
        return iterable
    if on_terminal():
        return tqdm(iterable, desc=desc, leave=leave)
    if not leave:
        return iterable
    total = len(iterable) if hasattr(iterable, "__len__") else None  # type: ignore[arg-type]
    return StageLine(desc, total).wrap(iterable)


def progress_counter(
    desc: str, *, total: float = 0, initial: float = 0, enabled: bool = True, unit: str = "it"
) -> Counter:
    """A bar counted by hand (`update`), for work that is not a loop over a known iterable."""
    if enabled and not on_terminal():
        line = StageLine(desc, total, unit)
        line.n = initial
        return line
    return tqdm(total=total, initial=initial, desc=desc, disable=not enabled, unit=unit)
