"""Shared fixtures: tiny random models of every family wrapped in taskvec handles."""

from __future__ import annotations

import os

# Tests never reach a model hub; offline, a missing hub id fails at once instead of after retries.
os.environ["HF_HUB_OFFLINE"] = "1"

import copy
import functools
from collections.abc import Iterator

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_models import build_tiny

from taskvec.models import ModelHandle


@pytest.fixture(autouse=True, scope="session")
def _single_thread() -> Iterator[None]:
    # Tiny models spend their time in thread hand-offs, not arithmetic: one thread is faster.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


GPU_SKIP_REASON = "needs a CUDA GPU: torch.cuda.is_available() is False on this machine"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason=GPU_SKIP_REASON)
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def tiny_handle(family: str, dtype: torch.dtype = torch.float32) -> ModelHandle:
    """A handle on the family's tiny model; another dtype gets a converted copy (built once)."""
    tiny = build_tiny(family)
    model = tiny.model if dtype == torch.float32 else converted_model(family, dtype)
    suffix = "" if dtype == torch.float32 else f"-{str(dtype).removeprefix('torch.')}"
    return ModelHandle.wrap(model, tiny.processor, name=f"tiny-{family}{suffix}")


@functools.cache
def converted_model(family: str, dtype: torch.dtype) -> torch.nn.Module:
    # A copy: build_tiny's model is shared by every test and must stay float32.
    return copy.deepcopy(build_tiny(family).model).to(dtype)


def random_image(seed: int, size: int = 24) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, size=(size, size, 3), dtype=np.uint8)
    return Image.fromarray(pixels, "RGB")
