"""Shared fixtures and helpers: tiny random models of every family wrapped in taskvec handles, in
any dtype, and the comparisons of engine and analysis results across dtypes and devices."""

from __future__ import annotations

import os

# Tests never reach a model hub; offline, a missing hub id fails at once instead of after retries.
os.environ["HF_HUB_OFFLINE"] = "1"

import copy
import dataclasses
import functools
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_models import build_tiny

from taskvec.analysis import (
    CONFLICT,
    DECODED_TOKENS,
    EMBEDDING_MAP,
    LENS,
    QUICK,
    SIMILARITY,
    AnalysisDocument,
    AnalysisSettings,
    ConflictCounts,
    VectorKey,
    analysis_vectors,
    run_analyses,
)
from taskvec.caching import StepCache
from taskvec.engine import Patch, generate_greedy_ids, logit_lens, record_residuals, sweep_layers
from taskvec.models import ModelHandle
from taskvec.tasks import Task

# The analyses on two prompts each: the bf16 and GPU runs of every analysis on the tiny families.
TINY_ANALYSIS_SETTINGS: AnalysisSettings = dataclasses.replace(
    QUICK,
    prompts=dataclasses.replace(QUICK.prompts, shots=2),
    lens_prompts=2,
    map_prompts_per_task=2,
    conflict_items=2,
    vector_prompts=2,
)


def run_tiny_analyses(
    handle: ModelHandle,
    tasks: list[Task],
    cache: Path,
    vectors: dict[VectorKey, torch.Tensor] | None = None,
) -> tuple[dict[VectorKey, torch.Tensor], AnalysisDocument]:
    """Every analysis at layer 1 with TINY_ANALYSIS_SETTINGS, on `vectors` (made here when None);
    returns the vectors used and the document."""
    if vectors is None:
        vectors = analysis_vectors(handle, tasks, settings=TINY_ANALYSIS_SETTINGS)
    document = run_analyses(
        handle,
        tasks,
        layer=1,
        vectors=vectors,
        cache=StepCache(cache),
        settings=TINY_ANALYSIS_SETTINGS,
        progress=False,
    )
    return vectors, document


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
    """A copy (build_tiny's model is shared by every test) with its floating-point weights and
    buffers in `dtype`. Complex buffers (Llama-4's rotary frequencies) are kept: `Module.to(dtype)`
    would drop their imaginary part, which loading a checkpoint in that dtype does not do."""
    model = copy.deepcopy(build_tiny(family).model)
    return model._apply(lambda tensor: tensor.to(dtype) if tensor.is_floating_point() else tensor)


def random_image(seed: int, size: int = 24) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, size=(size, size, 3), dtype=np.uint8)
    return Image.fromarray(pixels, "RGB")


# ------------------------------------------------------------------ dtype and device comparisons
# Shared by test_bf16 (bf16 on the CPU) and test_gpu (CUDA, device maps, accelerate's dispatch).

# bf16 keeps 8 bits of mantissa (relative rounding 2^-9 per operation): through a few layers of a
# tiny model results drift by about 1%, far below what separates right from wrong code (a missed
# patch, a wrong position, float32 weights meeting bf16 activations).
BF16_TOLERANCE = 0.05


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual.cpu() - expected.cpu()).norm() / expected.cpu().norm().clamp_min(1e-12))


def assert_float32_on_cpu(tensor: torch.Tensor) -> None:
    assert tensor.dtype == torch.float32 and tensor.device.type == "cpu", (tensor.dtype, tensor.device)


def engine_query(handle: ModelHandle, with_images: bool) -> dict[str, torch.Tensor]:
    if with_images:
        return handle.build_inputs(["Q:<image>\nA:"], [[random_image(5)]])
    return handle.build_inputs(["Q:France\nA:Paris\n\nQ:Spain\nA:"])


def one_pass_applies(handle: ModelHandle) -> bool:
    """The table's rule for the one-pass sweep (sweep_layers refuses it otherwise)."""
    architecture = handle.architecture
    return architecture.cached_step and not architecture.bidirectional_prompt


def sweep_methods(handle: ModelHandle) -> list[str]:
    return ["naive", "batched"] + (["one_pass"] if one_pass_applies(handle) else [])


@torch.no_grad()
def last_logits(handle: ModelHandle, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    return handle.model(**inputs, use_cache=False).logits[:, -1].float()


def first_token_forcing_vector(handle: ModelHandle) -> tuple[torch.Tensor, int]:
    """A residual whose lens picks one token by a wide margin, and that token.

    Patched over the last layer's output at the last position it decides the first generated token,
    so generation can be compared across dtypes and devices even though a random model's own
    predictions are near ties that rounding may flip.
    """
    unembedding = handle.unembedding.weight.detach().float().cpu()
    target = int(unembedding.norm(dim=-1).argmax())
    vector = unembedding[target] / unembedding[target].norm() * 8 * handle.hidden_size**0.5
    logits = logit_lens(handle, vector).cpu()
    best, runner_up = logits.topk(2).values.tolist()
    # A random model's logits are small (weights of std 0.02); a fifth of the top logit is still
    # tens of times bf16's rounding of it.
    assert int(logits.argmax()) == target and best - runner_up > 0.2 * best, "the vector must force its token"
    return vector, target


def engine_outputs(handle: ModelHandle, with_images: bool, forcing: torch.Tensor) -> dict[str, torch.Tensor]:
    """What every engine path returns for one query: residuals at two positions, the lens of the last
    layer, the model's own last logits, each sweep method, and two tokens generated with `forcing`
    patched over the last layer's output."""
    inputs = engine_query(handle, with_images)
    residuals = record_residuals(handle, inputs, [-1, -2])
    outputs = {
        "residuals": residuals,
        "lens": logit_lens(handle, residuals[:, -1, 0]),
        "logits": last_logits(handle, inputs),
    }
    vectors = torch.randn(handle.num_layers, handle.hidden_size, generator=torch.Generator().manual_seed(0))
    for method in sweep_methods(handle):
        outputs[f"sweep {method}"] = sweep_layers(handle, inputs, vectors, method=method)  # type: ignore[arg-type]
    patch = Patch(-1, forcing, position=-1)
    outputs["generated"] = generate_greedy_ids(handle, inputs, [patch], max_new_tokens=2)
    return outputs


def assert_engine_outputs_agree(
    actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], tolerance: float
) -> None:
    """Same paths, float results within `tolerance` relative error, the same forced first token."""
    assert actual.keys() == expected.keys()
    for name, tensor in actual.items():
        if name == "generated":
            assert tensor.dtype == torch.long and tensor.device.type == "cpu"
            assert torch.equal(tensor[:, 0], expected[name][:, 0]), "the forced first token"
            continue
        assert tensor.dtype == torch.float32, name
        assert tensor.shape == expected[name].shape, name
        assert relative_error(tensor, expected[name]) <= tolerance, name


def _lens_curves(lens: dict[str, Any]) -> Iterator[tuple[str, list[float], list[float]]]:
    """(where, probability curve, relative curve) of every task, spec and phase of a lens result."""
    for task, result in lens.items():
        for spec, curves in result["curves"].items():
            for phase, probability in curves["probability"].items():
                yield f"{task} {spec} {phase}", probability, curves["relative"][phase]


def assert_lens_results_agree(actual: dict[str, Any], expected: dict[str, Any], tolerance: float) -> None:
    """Lens results ({task: LensPhases.as_dict()}) with the same curves, within `tolerance`."""
    expected_curves = {where: (p, r) for where, p, r in _lens_curves(expected)}
    for where, probability, relative in _lens_curves(actual):
        expected_probability, expected_relative = expected_curves.pop(where)
        np.testing.assert_allclose(
            probability, expected_probability, rtol=tolerance, atol=1e-4, err_msg=where
        )
        np.testing.assert_allclose(relative, expected_relative, atol=0.02, err_msg=where)
    assert not expected_curves, f"curves missing: {sorted(expected_curves)}"


def _lens_dicts(document: AnalysisDocument) -> dict[str, Any]:
    lens = document.result(LENS)
    assert lens is not None
    return {task: phases.as_dict() for task, phases in lens.per_task.items()}


def assert_analysis_results_agree(
    actual: AnalysisDocument, expected: AnalysisDocument, tolerance: float
) -> None:
    """Two `run_analyses` documents of one model in two dtypes or on two devices agree: every curve,
    cosine and probability within bf16 precision; the discrete parts (which token or answer wins
    among a random model's near ties) only in what was counted."""
    assert actual.results.keys() == expected.results.keys()
    assert_lens_results_agree(_lens_dicts(actual), _lens_dicts(expected), tolerance)
    similarity, expected_similarity = actual.result(SIMILARITY), expected.result(SIMILARITY)
    assert similarity is not None and expected_similarity is not None
    np.testing.assert_allclose(similarity.matrix_per_layer, expected_similarity.matrix_per_layer, atol=0.02)
    decoded, expected_decoded = actual.result(DECODED_TOKENS), expected.result(DECODED_TOKENS)
    assert decoded is not None and expected_decoded is not None
    for model, vectors in decoded.by_model.items():
        for label, layers in vectors.items():
            for row, expected_row in zip(layers, expected_decoded.by_model[model][label], strict=True):
                np.testing.assert_allclose(
                    [t.probability for t in row], [t.probability for t in expected_row], atol=0.01
                )
    actual_map, expected_map = actual.result(EMBEDDING_MAP), expected.result(EMBEDDING_MAP)
    assert actual_map is not None and expected_map is not None
    assert (actual_map.tasks, actual_map.specs) == (expected_map.tasks, expected_map.specs)
    assert np.asarray(actual_map.vectors.xy).shape == (len(actual_map.tasks), 2)
    conflict, expected_conflict = actual.result(CONFLICT), expected.result(CONFLICT)
    assert conflict is not None and expected_conflict is not None

    def counted(rows: list[ConflictCounts]) -> list[tuple[Any, ...]]:
        return [(row.task_a, row.task_b, row.context, row.items) for row in rows]

    assert counted(conflict.rows) == counted(expected_conflict.rows)
    for row in conflict.rows:
        assert sum(row.baseline.values()) == sum(row.patched.values()) == row.items
