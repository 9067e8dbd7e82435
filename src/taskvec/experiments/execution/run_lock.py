"""One `taskvec run` at a time per run directory: an exclusive lock on DIR/run.lock.

Two runs into one directory would compute the same steps twice and write results.json from two
half-finished runs. The lock is `flock` on an open file: the operating system releases it when the
process exits, however it exits (a crash, SIGKILL), so a stale lock never outlives its run. A second
run stops at once with `RunDirectoryBusy`, naming the directory and the process that holds it.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

LOCK_FILE = "run.lock"


class RunDirectoryBusy(OSError):
    """Another process is running into this run directory."""


@contextlib.contextmanager
def run_directory_lock(directory: Path) -> Iterator[None]:
    """Hold DIR/run.lock for the block (created with DIR); RunDirectoryBusy if another process holds it."""
    if sys.platform == "win32":  # no flock: runs are not guarded against each other there
        yield
        return
    import fcntl

    directory.mkdir(parents=True, exist_ok=True)
    path = directory / LOCK_FILE
    with path.open("a+", encoding="utf-8") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            raise RunDirectoryBusy(
                f"{directory} is in use by another taskvec run (process {holder}); wait for it to "
                "finish, or give another --out"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@contextlib.contextmanager
def run_directory_locks(directories: Sequence[Path]) -> Iterator[None]:
    """Every directory locked for the block, or none (RunDirectoryBusy on the first one taken)."""
    with contextlib.ExitStack() as stack:
        for directory in directories:
            stack.enter_context(run_directory_lock(directory))
        yield
