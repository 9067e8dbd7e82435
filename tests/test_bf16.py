"""bf16 on the CPU, and tensors "on another device": the engine and the analyses whatever the model runs in.

Users run bf16 (and 4-bit) models on GPUs. A bf16 copy of each tiny model catches, on this CPU-only
suite, float32 tensors meeting bf16 weights, `.numpy()` of a bf16 tensor and results returned in
the model's dtype: every engine path and every analysis must return float32 CPU results that agree
with the float32 model's to bf16 precision. What bf16 cannot catch, CPU tensors mixed into tensors
on an accelerator, a tensor subclass standing in for "on another device" does (`OnAnotherDevice`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import random_image, tiny_handle
from tiny_models import FAMILIES, VLM_FAMILIES
from tiny_tasks import make_tiny_tasks

import taskvec.analysis.lens_phases as lens_phases_module
import taskvec.analysis.vector_tokens as vector_tokens_module
from taskvec.analysis import (
    QUICK,
    VectorKey,
    analysis_vectors,
    collect_prompt_points,
    lens_phases,
    run_analyses,
)
from taskvec.caching import StepCache
from taskvec.engine import Patch, generate_greedy_ids, logit_lens, patch_at, record_residuals, sweep_layers
from taskvec.models import ModelHandle
from taskvec.tasks import Item, Task

BF16 = torch.bfloat16
# bf16 keeps 8 bits of mantissa (relative rounding 2^-9 per operation): through a few layers of a
# tiny model results drift by about 1%, far below what separates right from wrong code (a missed
# patch, a wrong position, float32 weights meeting bf16 activations).
RELATIVE_TOLERANCE = 0.05
# Families the analyses run on in bf16: a text model and the VLM layouts that differ most.
ANALYSIS_FAMILIES = ("llama", "llava", "qwen2_vl", "idefics2", "gemma3", "fuyu")
SETTINGS = replace(QUICK, shots=2, lens_prompts=2, map_prompts_per_task=2, conflict_items=2, vector_prompts=2)


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual - expected).norm() / expected.norm().clamp_min(1e-12))


def assert_float32_on_cpu(tensor: torch.Tensor) -> None:
    assert tensor.dtype == torch.float32 and tensor.device.type == "cpu", (tensor.dtype, tensor.device)


def query(handle: ModelHandle, with_images: bool) -> dict[str, Any]:
    if with_images:
        return handle.build_inputs(["Q:<image>\nA:"], [[random_image(5)]])
    return handle.build_inputs(["Q:France\nA:Paris\n\nQ:Spain\nA:"])


@torch.no_grad()
def last_logits(handle: ModelHandle, inputs: dict[str, Any]) -> torch.Tensor:
    return handle.model(**inputs, use_cache=False).logits[:, -1].float()


def first_token_forcing_vector(handle: ModelHandle) -> tuple[torch.Tensor, int]:
    """A residual whose lens picks one token by a wide margin, and that token.

    Patched over the last layer's output at the last position it decides the first generated token,
    so generation can be compared across dtypes even though a random model's own predictions are
    near ties that bf16 rounding may flip.
    """
    unembedding = handle.unembedding.weight.detach().float()
    target = int(unembedding.norm(dim=-1).argmax())
    vector = unembedding[target] / unembedding[target].norm() * 8 * math.sqrt(handle.hidden_size)
    logits = logit_lens(handle, vector).cpu()
    best, runner_up = logits.topk(2).values.tolist()
    # A random model's logits are small (weights of std 0.02); a fifth of the top logit is still
    # tens of times bf16's rounding of it.
    assert int(logits.argmax()) == target and best - runner_up > 0.2 * best, "the vector must force its token"
    return vector, target


ENGINE_CASES = [(family, family in VLM_FAMILIES) for family in FAMILIES]


@pytest.mark.parametrize(("family", "with_images"), ENGINE_CASES, ids=[case[0] for case in ENGINE_CASES])
def test_every_engine_path_runs_in_bf16_and_returns_float32_close_to_fp32(
    family: str, with_images: bool
) -> None:
    full, half = tiny_handle(family), tiny_handle(family, BF16)
    assert half.dtype == BF16
    inputs_full, inputs_half = query(full, with_images), query(half, with_images)

    residuals = record_residuals(half, inputs_half, [-1, -2])
    assert_float32_on_cpu(residuals)
    assert relative_error(residuals, record_residuals(full, inputs_full, [-1, -2])) < RELATIVE_TOLERANCE

    lens = logit_lens(half, residuals[:, -1, 0])
    assert lens.dtype == torch.float32
    own_logits = last_logits(half, inputs_half)
    assert relative_error(lens, own_logits) < RELATIVE_TOLERANCE
    assert relative_error(lens, last_logits(full, inputs_full)) < RELATIVE_TOLERANCE

    # The float32 copy of a bf16 residual is exact, so patching it back must change no bit: a patch
    # that left the residual stream in float32 would.
    layer = half.num_layers // 2
    own = record_residuals(half, inputs_half, -2, layers=[layer])[:, 0, 0]
    with torch.no_grad(), patch_at(half, [Patch(layer, own, position=-2)]):
        assert torch.equal(last_logits(half, inputs_half), own_logits)

    vectors = torch.randn(full.num_layers, full.hidden_size, generator=torch.Generator().manual_seed(0))
    methods = ["naive", "batched"] + ([] if half.architecture.bidirectional_prompt else ["one_pass"])
    swept = {method: sweep_layers(half, inputs_half, vectors, method=method) for method in methods}  # type: ignore[arg-type]
    reference = sweep_layers(full, inputs_full, vectors, method="naive")
    for method, logits in swept.items():
        assert_float32_on_cpu(logits)
        assert logits.shape == reference.shape
        assert relative_error(logits, reference) < RELATIVE_TOLERANCE, method

    vector, target = first_token_forcing_vector(full)
    for handle, inputs in ((full, inputs_full), (half, inputs_half)):
        generated = generate_greedy_ids(handle, inputs, [Patch(-1, vector, position=-1)], max_new_tokens=2)
        assert generated.dtype == torch.long and generated.device.type == "cpu"
        assert generated.shape == (1, 2) and int(generated[0, 0]) == target


@pytest.fixture(scope="module")
def tasks(tmp_path_factory: pytest.TempPathFactory) -> list[Task]:
    return make_tiny_tasks(tmp_path_factory.mktemp("images"))


def _analysis_run(handle: ModelHandle, tasks: list[Task], cache: Path) -> tuple[dict[VectorKey, Any], Any]:
    vectors = analysis_vectors(handle, tasks, settings=SETTINGS)
    document = run_analyses(
        handle, tasks, layer=1, vectors=vectors, cache=StepCache(cache), settings=SETTINGS, progress=False
    )
    return vectors, document


def _lens_curves(lens: dict[str, Any]) -> Iterator[tuple[str, list[float], list[float]]]:
    """(where, probability curve, relative curve) of every task, spec and phase of a lens result."""
    for task, result in lens.items():
        for spec, curves in result["curves"].items():
            for phase, probability in curves["probability"].items():
                yield f"{task} {spec} {phase}", probability, curves["relative"][phase]


@pytest.mark.parametrize("family", ANALYSIS_FAMILIES)
def test_every_analysis_runs_in_bf16_close_to_fp32(family: str, tasks: list[Task], tmp_path: Path) -> None:
    full, half = tiny_handle(family), tiny_handle(family, BF16)
    full_vectors, full_run = _analysis_run(full, tasks, tmp_path / "fp32")
    half_vectors, half_run = _analysis_run(half, tasks, tmp_path / "bf16")
    assert half_run.errors == {} and full_run.errors == {}
    assert set(half_run.results) == set(full_run.results)

    assert set(half_vectors) == set(full_vectors)
    for key, vector in half_vectors.items():
        assert_float32_on_cpu(vector)
        assert relative_error(vector, full_vectors[key]) < RELATIVE_TOLERANCE, key.label

    half_results, full_results = half_run.results, full_run.results
    assert set(half_results["lens"]) == set(full_results["lens"])
    expected_curves = {where: (p, r) for where, p, r in _lens_curves(full_results["lens"])}
    for where, probability, relative in _lens_curves(half_results["lens"]):
        full_probability, full_relative = expected_curves.pop(where)
        np.testing.assert_allclose(probability, full_probability, rtol=RELATIVE_TOLERANCE, atol=1e-4)
        np.testing.assert_allclose(relative, full_relative, atol=0.02)
    assert not expected_curves, "bf16 must produce every curve fp32 produces"

    np.testing.assert_allclose(
        half_results["similarity"]["matrix_per_layer"], full_results["similarity"]["matrix_per_layer"], atol=0.02
    )
    # A random model's top tokens are near ties whose order bf16 may swap: compare the probabilities.
    for label, layers in half_results["decoded_tokens"]["vlm"].items():
        for rank_row, full_row in zip(layers, full_results["decoded_tokens"]["vlm"][label], strict=True):
            np.testing.assert_allclose([p for _, p in rank_row], [p for _, p in full_row], atol=0.01)

    half_map, full_map = half_results["embedding_map"], full_results["embedding_map"]
    assert half_map["tasks"] == full_map["tasks"] and half_map["specs"] == full_map["specs"]
    assert np.asarray(half_map["vectors"]["xy"]).shape == (len(half_map["tasks"]), 2)
    points = collect_prompt_points(half, tasks, 1, prompts_per_task=2, shots=2)
    full_points = collect_prompt_points(full, tasks, 1, prompts_per_task=2, shots=2)
    for name in ("vectors", "embeddings"):
        array, expected = getattr(points, name), getattr(full_points, name)
        assert array.dtype == np.float32
        assert np.linalg.norm(array - expected) / np.linalg.norm(expected) < RELATIVE_TOLERANCE

    # Greedy answers of a random model are near ties: compare what the conflict counted, not whom.
    rows = [(row["task_a"], row["task_b"], row["context"], row["items"]) for row in half_results["conflict"]]
    assert rows == [(r["task_a"], r["task_b"], r["context"], r["items"]) for r in full_results["conflict"]]
    for row in half_results["conflict"]:
        assert sum(row["baseline"].values()) == sum(row["patched"].values()) == row["items"]


# --------------------------------------------------------------------------- another device, faked


def _tensors_in(value: Any) -> Iterator[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, list | tuple):
        for item in value:
            yield from _tensors_in(item)
    elif isinstance(value, dict):
        for item in value.values():
            yield from _tensors_in(item)


def _copies_to_cpu(func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
    if func is torch.Tensor.cpu:
        return True
    if func is not torch.Tensor.to:
        return False
    targets = [*args[1:], kwargs.get("device")]
    return any(
        (isinstance(target, str) and target.startswith("cpu"))
        or (isinstance(target, torch.device) and target.type == "cpu")
        for target in targets
    )


class OnAnotherDevice(torch.Tensor):
    """A CPU tensor that behaves as one on an accelerator does.

    Combining it with an ordinary (CPU) tensor of one or more dimensions raises, as combining cuda
    and cpu tensors does; `.cpu()` and `.to("cpu")` give an ordinary tensor back; `.numpy()`
    refuses. 0-dim tensors and index tensors mix freely, as they do with CUDA tensors.
    """

    @classmethod
    def __torch_function__(
        cls,
        func: Callable[..., Any],
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        kwargs = kwargs or {}
        if func is torch.Tensor.numpy:
            raise TypeError("can't convert a tensor on another device to numpy: copy it to the CPU first")
        if _copies_to_cpu(func, args, kwargs):
            with torch._C.DisableTorchFunctionSubclass():
                return func(*args, **kwargs).clone()
        if func is not torch.Tensor.__getitem__:
            tensors = list(_tensors_in((args, kwargs)))
            mixed = any(isinstance(t, OnAnotherDevice) for t in tensors) and any(
                not isinstance(t, OnAnotherDevice) and t.dim() > 0 for t in tensors
            )
            if mixed:
                raise RuntimeError(f"Expected all tensors to be on the same device ({func.__name__})")
        return super().__torch_function__(func, types, args, kwargs)


def on_another_device(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.as_subclass(OnAnotherDevice)


def test_the_fake_device_refuses_what_a_gpu_refuses() -> None:
    elsewhere, here = on_another_device(torch.ones(3)), torch.ones(3)
    with pytest.raises(RuntimeError, match="same device"):
        _ = elsewhere + here
    with pytest.raises(RuntimeError, match="same device"):
        here += elsewhere
    with pytest.raises(RuntimeError, match="same device"):
        torch.stack([elsewhere, here])
    with pytest.raises(TypeError, match="numpy"):
        elsewhere.numpy()
    assert type(elsewhere * torch.tensor(2.0)) is OnAnotherDevice  # 0-dim tensors mix
    assert type(elsewhere[torch.tensor([0, 2])]) is OnAnotherDevice  # so do index tensors
    assert type(elsewhere.to(torch.float16)) is OnAnotherDevice  # a dtype change stays put
    for copied in (elsewhere.cpu(), elsewhere.to("cpu"), elsewhere.to(device="cpu", dtype=torch.float32)):
        assert type(copied) is torch.Tensor and torch.equal(copied + here, torch.full((3,), 2.0))


def lens_elsewhere(monkeypatch: pytest.MonkeyPatch, dtype: torch.dtype = torch.float32) -> None:
    """Make the analyses' logit lens return its logits "on another device" (and in `dtype`)."""

    def lens(handle: ModelHandle, residual: torch.Tensor) -> torch.Tensor:
        return on_another_device(logit_lens(handle, residual).to(dtype))

    monkeypatch.setattr(lens_phases_module, "logit_lens", lens)
    monkeypatch.setattr(vector_tokens_module, "logit_lens", lens)


@pytest.mark.parametrize("dtype", [torch.float32, BF16])
def test_lens_phases_aggregate_on_the_cpu_in_float32_whatever_device_the_lens_runs_on(
    tasks: list[Task], monkeypatch: pytest.MonkeyPatch, dtype: torch.dtype
) -> None:
    # "Atlantis" has no token in the tiny vocabulary: its input curve is the zeros of a word without
    # a token, which must be made where the other prompts' curves are.
    capital = tasks[0]
    atlantis = Item("Atlantis", "Paris", images=capital.items[0].images)
    task = replace(capital, items=(*capital.items, atlantis), splits={**capital.splits, "test": (8, 5, 6)})
    handle = tiny_handle("llava")
    expected = lens_phases(handle, task, max_prompts=3, shots=2).as_dict()
    lens_elsewhere(monkeypatch, dtype)
    moved = lens_phases(handle, task, max_prompts=3, shots=2).as_dict()
    for spec, curves in expected["curves"].items():
        assert curves["prompts_without_token"]["input"] == 1  # Atlantis
        for kind in ("probability", "relative"):
            for phase, curve in curves[kind].items():
                assert all(type(value) is float for value in moved["curves"][spec][kind][phase])
                tolerance = 1e-6 if dtype == torch.float32 else RELATIVE_TOLERANCE
                np.testing.assert_allclose(moved["curves"][spec][kind][phase], curve, rtol=tolerance, atol=1e-6)


def test_analyses_take_vectors_and_lens_output_from_another_device(
    tasks: list[Task], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    handle = tiny_handle("llava")
    vectors = analysis_vectors(handle, tasks, llm=handle, settings=SETTINGS)
    expected = run_analyses(
        handle, tasks, layer=1, vectors=vectors, cache=StepCache(tmp_path / "here"), settings=SETTINGS, progress=False
    )
    lens_elsewhere(monkeypatch)
    # A run's vectors may be read back onto the model's device, and in its dtype.
    elsewhere = {key: on_another_device(vector.to(BF16)) for key, vector in vectors.items()}
    moved = run_analyses(
        handle, tasks, layer=1, vectors=elsewhere, cache=StepCache(tmp_path / "there"), settings=SETTINGS, progress=False
    )
    assert moved.errors == {} and set(moved.results) == set(expected.results)
    assert moved.results["lens"] == expected.results["lens"]
    np.testing.assert_allclose(
        moved.results["similarity"]["matrix_per_layer"], expected.results["similarity"]["matrix_per_layer"], atol=0.02
    )
    assert [row["items"] for row in moved.results["conflict"]] == [row["items"] for row in expected.results["conflict"]]
