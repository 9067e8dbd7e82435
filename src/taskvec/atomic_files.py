"""Files written whole or not at all.

Each write goes to a temporary file of its own beside the target (a name no other writer picks) and
is renamed over the target only when it is complete: a reader sees the old file or the new one,
never half of one, and two processes or threads writing the same file at once both succeed (the
last rename wins). A write that fails, or a process killed mid-write, leaves the target as it was.
"""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

# What every temporary file's name ends with: `<name>.<random>.partial`.
TEMPORARY_SUFFIX = ".partial"


def temporary_beside(path: Path) -> Path:
    """A new empty file in `path`'s directory under a name that no other writer uses."""
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        temporary = path.with_name(f"{path.name}.{secrets.token_hex(6)}{TEMPORARY_SUFFIX}")
        try:
            # O_EXCL: the name is ours alone; mode 0o666 under the umask, as open() would create it.
            os.close(os.open(temporary, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
        except FileExistsError:
            continue
        return temporary


@contextmanager
def replacing(path: Path) -> Iterator[Path]:
    """A temporary path to write `path`'s new content to: renamed over `path` when the block ends,
    removed if it raises."""
    temporary = temporary_beside(path)
    try:
        yield temporary
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def write_text_atomically(path: Path, text: str) -> None:
    with replacing(path) as temporary:
        temporary.write_text(text, encoding="utf-8")


def write_json_atomically(path: Path, data: Any) -> None:
    """`data` as indented JSON (values JSON cannot hold as their str)."""
    write_text_atomically(path, json.dumps(data, indent=1, default=str))


def write_tensors_atomically(
    path: Path, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None
) -> None:
    with replacing(path) as temporary:
        contiguous = {name: tensor.contiguous() for name, tensor in tensors.items()}
        save_file(contiguous, str(temporary), metadata=dict(metadata) if metadata is not None else None)
