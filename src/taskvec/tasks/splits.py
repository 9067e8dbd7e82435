"""Seeded, stable validation/test splits.

Each input gets a key, the SHA-256 of a fixed seed and the input text. Inputs sorted by key: the first
30 are validation, the next up to 100 test, the rest "train" (a pool for demonstrations). The key of an
input never depends on the other inputs, so adding or removing entities moves at most the items at the
split borders instead of reshuffling everything.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

SPLIT_SEED = "taskvec-splits-v1"
VAL_SIZE = 30
TEST_SIZE = 100
# Below VAL_SIZE + MIN_TEST items the validation split shrinks to half, so the test split never empties.
MIN_TEST = 10


def split_key(text: str, seed: str = SPLIT_SEED) -> str:
    return hashlib.sha256(f"{seed}\x00{text}".encode()).hexdigest()


def assign_splits(
    inputs: Sequence[str], *, seed: str = SPLIT_SEED, val_size: int = VAL_SIZE, test_size: int = TEST_SIZE
) -> dict[str, tuple[int, ...]]:
    """Split name -> ascending indices into `inputs` ("train" only when items are left over)."""
    order = sorted(range(len(inputs)), key=lambda i: split_key(inputs[i], seed))
    n_val = val_size if len(order) >= val_size + MIN_TEST else len(order) // 2
    n_test = min(test_size, len(order) - n_val)
    splits = {
        "val": tuple(sorted(order[:n_val])),
        "test": tuple(sorted(order[n_val : n_val + n_test])),
    }
    if len(order) > n_val + n_test:
        splits["train"] = tuple(sorted(order[n_val + n_test :]))
    return splits
