"""Shared fixtures: tiny random models of every family wrapped in taskvec handles."""

from __future__ import annotations

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


def tiny_handle(family: str) -> ModelHandle:
    tiny = build_tiny(family)
    return ModelHandle.wrap(tiny.model, tiny.processor, name=f"tiny-{family}")


def random_image(seed: int, size: int = 24) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, size=(size, size, 3), dtype=np.uint8)
    return Image.fromarray(pixels, "RGB")
