"""Where a checkpoint comes from: a local directory, or a hub repo id resolved through the HF cache.

Hub ids go through huggingface_hub, so they follow HF_HOME / HF_HUB_CACHE and HF_HUB_OFFLINE like
every other Hugging Face tool; the revision asked for is pinned to the commit it resolved to, so the
weights, processor and config all come from one snapshot and the run records which one.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import huggingface_hub
from huggingface_hub import constants as hub_constants
from huggingface_hub import errors as hub_errors

# A Hugging Face repo id: "org/name" (one slash; letters, digits, '-', '_', '.').
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class CheckpointNotFoundError(FileNotFoundError):
    """Neither a local checkpoint directory nor a hub repo that can be reached."""


@dataclass(frozen=True)
class CheckpointSource:
    reference: str  # what from_pretrained is given: a directory or a repo id
    name: str  # the handle's name: "org/name", "org/name@revision" or the directory's name
    config: dict[str, Any]
    revision: str | None = None  # as asked
    commit: str | None = None  # the hub snapshot it resolved to

    @property
    def pinned_revision(self) -> str | None:
        return self.commit or self.revision

    def as_record(self) -> dict[str, Any]:
        if self.commit is None:
            return {"path": self.reference}
        return {"repo_id": self.reference, "revision": self.revision or "main", "commit": self.commit}


def is_repo_id(text: str) -> bool:
    return bool(_REPO_ID.match(text))


def find_checkpoint(name_or_path: str | Path, revision: str | None = None) -> CheckpointSource:
    path = Path(name_or_path)
    if path.is_dir():
        if revision is not None:
            raise ValueError(f"a revision ({revision!r}) applies to hub ids, not to the directory {path}")
        return CheckpointSource(str(path), path.name, _read_config(path / "config.json"))
    text = str(name_or_path)
    if path.exists() or not is_repo_id(text):
        raise CheckpointNotFoundError(
            f"model {text!r} is not a checkpoint directory, a hub id (org/name) nor a known name"
        )
    return _hub_checkpoint(text, revision)


def _read_config(config_path: Path) -> dict[str, Any]:
    if not config_path.is_file():
        raise CheckpointNotFoundError(
            f"{config_path.parent} has no config.json: not a Hugging Face checkpoint"
        )
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{config_path} is not valid JSON: {error}") from None
    if not isinstance(config, dict):
        raise ValueError(f"{config_path} is not a JSON object")
    return config


def _hub_checkpoint(repo_id: str, revision: str | None) -> CheckpointSource:
    shown = f"{repo_id}@{revision}" if revision else repo_id
    try:
        config_file = Path(huggingface_hub.hf_hub_download(repo_id, "config.json", revision=revision))
    except hub_errors.LocalEntryNotFoundError:
        why = (
            "downloads are off (HF_HUB_OFFLINE=1)"
            if hub_constants.HF_HUB_OFFLINE
            else "the hub is unreachable"
        )
        raise CheckpointNotFoundError(
            f"model {shown!r} is not in the Hugging Face cache ({hub_constants.HF_HUB_CACHE}) and {why}; "
            "download it where there is a network (`hf download`) or point HF_HOME at a cache that has it"
        ) from None
    except hub_errors.GatedRepoError:
        raise CheckpointNotFoundError(
            f"model {shown!r} is gated: accept its licence on huggingface.co and log in (`hf auth login`)"
        ) from None
    except hub_errors.RevisionNotFoundError:
        raise CheckpointNotFoundError(f"model {repo_id!r} has no revision {revision!r}") from None
    except hub_errors.RepositoryNotFoundError:
        raise CheckpointNotFoundError(
            f"model {shown!r}: no such repository on the hub (or it is private: log in with `hf auth login`)"
        ) from None
    except hub_errors.EntryNotFoundError:
        raise CheckpointNotFoundError(
            f"model {shown!r} has no config.json: not a transformers checkpoint"
        ) from None
    # The cache stores files under .../snapshots/<commit>/, so the path names the commit resolved to.
    commit = config_file.parent.name
    return CheckpointSource(repo_id, shown, _read_config(config_file), revision=revision, commit=commit)
