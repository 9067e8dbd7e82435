"""bf16 on the CPU, and tensors "on another device": the engine and the analyses whatever the model runs in.

Users run bf16 (and 4-bit) models on GPUs. A bf16 copy of each tiny model catches, on this CPU-only
suite, float32 tensors meeting bf16 weights, `.numpy()` of a bf16 tensor and results returned in
the model's dtype: every engine path and every analysis must return float32 CPU results that agree
with the float32 model's to bf16 precision. What bf16 cannot catch, CPU tensors mixed into tensors
on an accelerator, a tensor subclass standing in for "on another device" does (`OnAnotherDevice`).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import (
    BF16_TOLERANCE,
    TINY_ANALYSIS_SETTINGS,
    assert_analysis_results_agree,
    assert_engine_outputs_agree,
    assert_float32_on_cpu,
    engine_outputs,
    engine_query,
    first_token_forcing_vector,
    last_logits,
    relative_error,
    run_tiny_analyses,
    tiny_handle,
)
from tiny_models import FAMILIES, VLM_FAMILIES
from tiny_tasks import make_tiny_tasks

from taskvec.analysis import (
    EMBEDDING_MAP,
    LENS,
    VectorKey,
    analysis_vectors,
    collect_prompt_points,
    lens_phases,
)
from taskvec.analysis.document import AnalysisDocument
from taskvec.engine import Patch, logit_lens, patch_at, record_residuals
from taskvec.models import ModelHandle
from taskvec.tasks import Item, Task

# `taskvec.analysis` exports functions named like these modules; patch the modules themselves.
lens_phases_module = importlib.import_module("taskvec.analysis.lens_phases")
vector_tokens_module = importlib.import_module("taskvec.analysis.vector_tokens")

BF16 = torch.bfloat16
# Families the analyses run on in bf16: a text model and the VLM layouts that differ most.
ANALYSIS_FAMILIES = ("llama", "llava", "qwen2_vl", "idefics2", "gemma3", "fuyu")
ENGINE_CASES = [(family, family in VLM_FAMILIES) for family in FAMILIES]


@pytest.mark.parametrize(("family", "with_images"), ENGINE_CASES, ids=[case[0] for case in ENGINE_CASES])
def test_every_engine_path_runs_in_bf16_and_returns_float32_close_to_fp32(
    family: str, with_images: bool
) -> None:
    full, half = tiny_handle(family), tiny_handle(family, BF16)
    assert half.dtype == BF16
    forcing, target = first_token_forcing_vector(full)
    outputs = engine_outputs(half, with_images, forcing)
    assert_engine_outputs_agree(outputs, engine_outputs(full, with_images, forcing), BF16_TOLERANCE)
    for name, tensor in outputs.items():
        if name != "generated":
            assert_float32_on_cpu(tensor)
    assert int(outputs["generated"][0, 0]) == target
    # The lens of the last layer is the model's own output, in bf16 as in float32.
    assert relative_error(outputs["lens"], outputs["logits"]) < BF16_TOLERANCE

    # The float32 copy of a bf16 residual is exact, so patching it back must change no bit: a patch
    # that left the residual stream in float32 would.
    inputs = engine_query(half, with_images)
    layer = half.num_layers // 2
    own = record_residuals(half, inputs, -2, layers=[layer])[:, 0, 0]
    with patch_at(half, [Patch(layer, own, position=-2)]):
        assert torch.equal(last_logits(half, inputs), outputs["logits"])


@pytest.fixture(scope="module")
def tasks(tmp_path_factory: pytest.TempPathFactory) -> list[Task]:
    # The two tasks that share their inputs: every analysis has data, the conflict included.
    return make_tiny_tasks(tmp_path_factory.mktemp("images"))[:2]


@pytest.mark.parametrize("family", ANALYSIS_FAMILIES)
def test_every_analysis_runs_in_bf16_close_to_fp32(family: str, tasks: list[Task], tmp_path: Path) -> None:
    full, half = tiny_handle(family), tiny_handle(family, BF16)
    full_vectors, full_run = run_tiny_analyses(full, tasks, tmp_path / "fp32")
    half_vectors, half_run = run_tiny_analyses(half, tasks, tmp_path / "bf16")
    assert half_run.errors == {} and full_run.errors == {}
    assert half_vectors.keys() == full_vectors.keys()
    for key, vector in half_vectors.items():
        assert_float32_on_cpu(vector)
        assert relative_error(vector, full_vectors[key]) < BF16_TOLERANCE, key.label
    assert_analysis_results_agree(half_run, full_run, BF16_TOLERANCE)

    half_map = half_run.result(EMBEDDING_MAP)
    assert half_map is not None
    specs = sorted(set(half_map.specs))
    points = collect_prompt_points(
        half, tasks, 1, specs=specs, prompts_per_task=2, prompts=TINY_ANALYSIS_SETTINGS.prompts
    )
    full_points = collect_prompt_points(
        full, tasks, 1, specs=specs, prompts_per_task=2, prompts=TINY_ANALYSIS_SETTINGS.prompts
    )
    for name in ("vectors", "embeddings"):
        array, expected = getattr(points, name), getattr(full_points, name)
        assert array.dtype == np.float32
        assert np.linalg.norm(array - expected) / np.linalg.norm(expected) < BF16_TOLERANCE


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
    expected = lens_phases(handle, task, max_prompts=3, prompts=TINY_ANALYSIS_SETTINGS.prompts).as_dict()
    lens_elsewhere(monkeypatch, dtype)
    moved = lens_phases(handle, task, max_prompts=3, prompts=TINY_ANALYSIS_SETTINGS.prompts).as_dict()
    for spec, curves in expected["curves"].items():
        assert curves["prompts_without_token"]["input"] == 1  # Atlantis
        for kind in ("probability", "relative"):
            for phase, curve in curves[kind].items():
                assert all(type(value) is float for value in moved["curves"][spec][kind][phase])
                tolerance = 1e-6 if dtype == torch.float32 else BF16_TOLERANCE
                np.testing.assert_allclose(
                    moved["curves"][spec][kind][phase], curve, rtol=tolerance, atol=1e-6
                )


def test_analyses_take_vectors_and_lens_output_from_another_device(
    tasks: list[Task], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    handle = tiny_handle("llava")
    vectors = analysis_vectors(handle, tasks, llm=handle, settings=TINY_ANALYSIS_SETTINGS)

    def run(given: dict[VectorKey, torch.Tensor], cache: Path) -> AnalysisDocument:
        return run_tiny_analyses(handle, tasks, cache, given)[1]

    expected = run(vectors, tmp_path / "here")
    lens_elsewhere(monkeypatch)
    # A run's vectors may be read back onto the model's device, and in its dtype.
    moved = run({key: on_another_device(v.to(BF16)) for key, v in vectors.items()}, tmp_path / "there")
    assert moved.errors == {} and expected.errors == {}
    assert moved.result(LENS) == expected.result(LENS)  # the lens reads no vector
    assert_analysis_results_agree(moved, expected, BF16_TOLERANCE)
