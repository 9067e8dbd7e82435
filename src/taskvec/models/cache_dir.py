"""Where taskvec keeps converted weights and experiment caches."""

from __future__ import annotations

import os
from pathlib import Path

from platformdirs import user_cache_dir

CACHE_ENV = "TASKVEC_CACHE"


def cache_root() -> Path:
    """$TASKVEC_CACHE if set, else the user's cache directory (e.g. ~/.cache/taskvec)."""
    root = Path(os.environ.get(CACHE_ENV) or user_cache_dir("taskvec"))
    root.mkdir(parents=True, exist_ok=True)
    return root
