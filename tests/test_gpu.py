"""The engine and the analyses on CUDA, and on models spread over devices with accelerate's dispatch.

Tests marked `gpu` run when torch.cuda.is_available() (conftest skips them otherwise): the tiny
models on one GPU in float32 and bf16, loaded with `device_map="auto"` over every visible GPU, split
layer by layer over all GPUs with some blocks offloaded to the CPU, and quantized to 4-bit NF4.
Each must give what the float32 CPU model gives, to the precision of its dtype.

The dispatch plumbing itself runs everywhere: on a CPU-only machine a model dispatched with
blocks offloaded to disk (weights on the meta device between calls, accelerate's hooks moving
tensors, as on a multi-GPU machine) must give exactly what the plain model gives.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers
from accelerate import dispatch_model
from conftest import (
    BF16_TOLERANCE,
    TINY_ANALYSIS_SETTINGS,
    assert_analysis_results_agree,
    assert_engine_outputs_agree,
    assert_lens_results_agree,
    converted_model,
    engine_outputs,
    first_token_forcing_vector,
    relative_error,
    run_tiny_analyses,
    sweep_methods,
    tiny_handle,
)
from tiny_models import VLM_FAMILIES, build_tiny
from tiny_tasks import make_tiny_tasks

from taskvec.analysis import AnalysisDocument, lens_phases
from taskvec.engine import record_residuals, sweep_layers
from taskvec.models import ModelHandle
from taskvec.tasks import Task

Placement = str | int | torch.device

# Families whose layouts differ most: a text model, CLIP + Llama, mrope, a perceiver, SigLIP + Gemma
# with bidirectional image attention, and Fuyu's patches without a vision tower.
GPU_FAMILIES = ("llama", "llava", "qwen2_vl", "idefics2", "gemma3", "fuyu")
# Untied unembeddings, so the unembedding can sit on another device than the embedding.
SPREAD_FAMILIES = ("llama", "llava", "qwen2_vl", "idefics2")
# cuDNN runs float32 convolutions (the vision towers' patch embeddings) in TF32 by default.
FLOAT32_ON_GPU_TOLERANCE = 1e-2
EXACT = 1e-6


@pytest.fixture(scope="module")
def tasks(tmp_path_factory: pytest.TempPathFactory) -> list[Task]:
    return make_tiny_tasks(tmp_path_factory.mktemp("images"))[:2]


def split_device_map(
    model: torch.nn.Module, placements: Mapping[str, Placement], rest: Placement
) -> dict[str, Any]:
    """An accelerate device map putting each module named in `placements` on its device and every
    other module on `rest`; modules that contain a placed one are split into their children."""
    device_map: dict[str, Any] = {}

    def visit(prefix: str, module: torch.nn.Module) -> None:
        own = [
            name
            for name, _ in (*module.named_parameters(recurse=False), *module.named_buffers(recurse=False))
        ]
        # A hook moves a whole module: the weights of a module that is split have no hook to move them.
        assert not own, f"{prefix or 'the model'} holds weights {own} directly and cannot be split"
        for name, child in module.named_children():
            path = f"{prefix}{name}"
            if path in placements:
                device_map[path] = placements[path]
            elif any(placed.startswith(f"{path}.") for placed in placements):
                visit(f"{path}.", child)
            else:
                device_map[path] = rest

    visit("", model)
    missing = set(placements) - set(device_map)
    assert not missing, f"no modules at {sorted(missing)}"
    return device_map


def layer_placements(
    handle: ModelHandle, layer_devices: Sequence[Placement], norm: Placement, unembedding: Placement
) -> dict[str, Placement]:
    """Decoder layer i on layer_devices[i], the final norm and the unembedding where given."""
    architecture = handle.architecture
    placements: dict[str, Placement] = {
        f"{architecture.layers_path}.{index}": device for index, device in enumerate(layer_devices)
    }
    placements[architecture.norm_path] = norm
    placements[architecture.unembed_path] = unembedding
    return placements


def dispatched_handle(
    family: str,
    placements_of: Callable[[ModelHandle], dict[str, Placement]],
    rest: Placement,
    **dispatch: Any,
) -> ModelHandle:
    """The family's tiny float32 model, copied and dispatched by accelerate over the placements
    `placements_of(handle)` returns."""
    tiny = build_tiny(family)
    model = copy.deepcopy(tiny.model)
    plain = ModelHandle.wrap(model, tiny.processor)
    device_map = split_device_map(model, placements_of(plain), rest)
    dispatched = dispatch_model(model, device_map=device_map, **dispatch)
    return ModelHandle.wrap(dispatched, tiny.processor, name=f"tiny-{family}-dispatched")


def lens_result(handle: ModelHandle, task: Task) -> dict[str, Any]:
    """The lens analysis of one task, as run_analyses reports it."""
    return {
        task.name: lens_phases(handle, task, max_prompts=2, prompts=TINY_ANALYSIS_SETTINGS.prompts).as_dict()
    }


# ------------------------------------------------------------------- dispatch plumbing, any machine


def test_split_device_map_places_what_it_is_told_and_covers_every_weight() -> None:
    handle = tiny_handle("llava")
    placements = layer_placements(handle, ["cpu", "disk", "cpu"], norm="disk", unembedding="cpu")
    device_map = split_device_map(handle.model, placements, rest="cpu")
    assert device_map["model.language_model.layers.1"] == device_map["model.language_model.norm"] == "disk"
    assert device_map["model.vision_tower"] == device_map["lm_head"] == "cpu"
    assert "model" not in device_map and "model.language_model" not in device_map  # split, not placed
    covered = [
        name for name in handle.model.state_dict() if any(name.startswith(f"{key}.") for key in device_map)
    ]
    assert len(covered) == len(handle.model.state_dict())


@pytest.mark.parametrize("family", ["llama", "llava", "qwen2_vl", "gemma3_text"])
def test_engine_on_a_model_with_blocks_offloaded_to_disk_equals_the_plain_model(
    family: str, tasks: list[Task], tmp_path: Path
) -> None:
    plain = tiny_handle(family)

    def placements(handle: ModelHandle) -> dict[str, Placement]:
        layers = ["disk" if index == 1 else "cpu" for index in range(handle.num_layers)]
        return layer_placements(handle, layers, norm="disk", unembedding="cpu")

    handle = dispatched_handle(family, placements, rest="cpu", offload_dir=tmp_path / "offload")
    # What the test is about: accelerate's hooks move tensors, and offloaded weights are meta.
    assert all(hasattr(layer, "_hf_hook") for layer in handle.layers)
    assert handle.layers[1].self_attn.q_proj.weight.device.type == "meta"
    assert next(handle.final_norm.parameters()).device.type == "meta"

    with_images = family in VLM_FAMILIES
    forcing, _ = first_token_forcing_vector(plain)
    expected = engine_outputs(plain, with_images, forcing)
    assert_engine_outputs_agree(engine_outputs(handle, with_images, forcing), expected, EXACT)
    assert_lens_results_agree(lens_result(handle, tasks[0]), lens_result(plain, tasks[0]), EXACT)


def test_analyses_on_a_model_with_blocks_offloaded_to_disk_equal_the_plain_model(
    tasks: list[Task], tmp_path: Path
) -> None:
    def placements(handle: ModelHandle) -> dict[str, Placement]:
        return layer_placements(handle, ["cpu", "disk", "cpu"], norm="disk", unembedding="cpu")

    handle = dispatched_handle("llava", placements, rest="cpu", offload_dir=tmp_path / "offload")
    expected = analysis_results(tiny_handle("llava"), tasks, tmp_path / "plain")
    assert_analysis_results_agree(analysis_results(handle, tasks, tmp_path / "offloaded"), expected, EXACT)


def test_a_checkpoint_loaded_with_an_offloading_device_map_runs_the_engine(tmp_path: Path) -> None:
    tiny = build_tiny("llava")
    tiny.model.save_pretrained(tmp_path / "model")
    plain = tiny_handle("llava")
    placements = layer_placements(plain, ["cpu", "disk", "cpu"], norm="disk", unembedding="cpu")
    device_map = split_device_map(plain.model, placements, rest="cpu")
    model = type(tiny.model).from_pretrained(
        tmp_path / "model", device_map=device_map, offload_folder=tmp_path / "offload"
    )
    handle = ModelHandle.wrap(model, tiny.processor)
    assert next(handle.final_norm.parameters()).device.type == "meta"
    forcing, _ = first_token_forcing_vector(plain)
    expected = engine_outputs(plain, True, forcing)
    assert_engine_outputs_agree(engine_outputs(handle, True, forcing), expected, EXACT)


# ------------------------------------------------------------------------------------------- CUDA


def gpus() -> list[torch.device]:
    return [torch.device("cuda", index) for index in range(torch.cuda.device_count())]


def handle_on(family: str, device: torch.device, dtype: torch.dtype) -> ModelHandle:
    tiny = build_tiny(family)
    model = copy.deepcopy(tiny.model if dtype == torch.float32 else converted_model(family, dtype))
    return ModelHandle.wrap(model.to(device), tiny.processor, name=f"tiny-{family}-{device}")


def analysis_results(handle: ModelHandle, tasks: list[Task], cache: Path) -> AnalysisDocument:
    _, document = run_tiny_analyses(handle, tasks, cache)
    assert document.errors == {}
    return document


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("family", GPU_FAMILIES)
def test_engine_on_cuda_matches_the_cpu_model(family: str, dtype: torch.dtype) -> None:
    plain = tiny_handle(family)
    handle = handle_on(family, gpus()[0], dtype)
    assert handle.device == gpus()[0]
    forcing, _ = first_token_forcing_vector(plain)
    with_images = family in VLM_FAMILIES
    outputs = engine_outputs(handle, with_images, forcing)
    tolerance = FLOAT32_ON_GPU_TOLERANCE if dtype == torch.float32 else BF16_TOLERANCE
    assert_engine_outputs_agree(outputs, engine_outputs(plain, with_images, forcing), tolerance)
    assert outputs["residuals"].device.type == "cpu"


@pytest.mark.gpu
@pytest.mark.parametrize("family", GPU_FAMILIES)
def test_analyses_on_cuda_in_bf16_match_the_cpu_model(family: str, tasks: list[Task], tmp_path: Path) -> None:
    expected = analysis_results(tiny_handle(family), tasks, tmp_path / "cpu")
    actual = analysis_results(handle_on(family, gpus()[0], torch.bfloat16), tasks, tmp_path / "cuda")
    assert_analysis_results_agree(actual, expected, BF16_TOLERANCE)


@pytest.mark.gpu
@pytest.mark.parametrize("family", SPREAD_FAMILIES)
def test_device_map_auto_over_every_gpu_matches_the_cpu_model(
    family: str, tasks: list[Task], tmp_path: Path
) -> None:
    tiny = build_tiny(family)
    tiny.model.save_pretrained(tmp_path / "model")
    model = type(tiny.model).from_pretrained(tmp_path / "model", device_map="auto", dtype=torch.bfloat16)
    handle = ModelHandle.wrap(model, tiny.processor)
    plain = tiny_handle(family)
    forcing, _ = first_token_forcing_vector(plain)
    expected = engine_outputs(plain, family in VLM_FAMILIES, forcing)
    assert_engine_outputs_agree(
        engine_outputs(handle, family in VLM_FAMILIES, forcing), expected, BF16_TOLERANCE
    )
    assert_lens_results_agree(lens_result(handle, tasks[0]), lens_result(plain, tasks[0]), BF16_TOLERANCE)


def spread_placements(
    devices: Sequence[torch.device], offload: bool
) -> Callable[[ModelHandle], dict[str, Placement]]:
    """Contiguous blocks of layers per GPU, the final norm on the last GPU and the unembedding on
    the first, away from it; with `offload`, layer 1 and the final norm offloaded to the CPU (their
    weights meta between calls, run on the first GPU)."""

    def placements(handle: ModelHandle) -> dict[str, Placement]:
        count = handle.num_layers
        layers: list[Placement] = [devices[index * len(devices) // count] for index in range(count)]
        norm: Placement = devices[-1]
        if offload:
            layers[1] = norm = "cpu"
        return layer_placements(handle, layers, norm=norm, unembedding=devices[0])

    return placements


def spread_handle(family: str, offload: bool) -> ModelHandle:
    devices = gpus()
    handle = dispatched_handle(
        family, spread_placements(devices, offload), rest=devices[0], main_device=devices[0]
    )
    if len(devices) > 1:
        used = {layer.self_attn.o_proj.weight.device for layer in handle.layers} - {torch.device("meta")}
        assert len(used) > 1, f"the layers must span several GPUs, found {used}"
    return handle


@pytest.mark.gpu
@pytest.mark.parametrize("family", SPREAD_FAMILIES)
def test_engine_on_layers_spread_over_every_gpu_with_cpu_offload_matches_the_cpu_model(family: str) -> None:
    handle = spread_handle(family, offload=True)
    assert next(handle.final_norm.parameters()).device.type == "meta"
    plain = tiny_handle(family)
    forcing, _ = first_token_forcing_vector(plain)
    expected = engine_outputs(plain, family in VLM_FAMILIES, forcing)
    outputs = engine_outputs(handle, family in VLM_FAMILIES, forcing)
    assert_engine_outputs_agree(outputs, expected, FLOAT32_ON_GPU_TOLERANCE)


@pytest.mark.gpu
@pytest.mark.parametrize("family", SPREAD_FAMILIES)
def test_analyses_on_layers_spread_over_every_gpu_match_the_cpu_model(
    family: str, tasks: list[Task], tmp_path: Path
) -> None:
    expected = analysis_results(tiny_handle(family), tasks, tmp_path / "cpu")
    actual = analysis_results(spread_handle(family, offload=False), tasks, tmp_path / "spread")
    assert_analysis_results_agree(actual, expected, FLOAT32_ON_GPU_TOLERANCE)


@pytest.mark.gpu
@pytest.mark.parametrize("family", ["llama", "llava"])
def test_a_4bit_model_on_cuda_runs_every_engine_path(family: str, tasks: list[Task], tmp_path: Path) -> None:
    pytest.importorskip("bitsandbytes")
    tiny = build_tiny(family)
    tiny.model.save_pretrained(tmp_path / "model")
    quantization = transformers.BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16
    )
    model = type(tiny.model).from_pretrained(
        tmp_path / "model",
        quantization_config=quantization,
        device_map={"": gpus()[0].index},
        dtype=torch.bfloat16,
    )
    handle = ModelHandle.wrap(model, tiny.processor)
    assert type(handle.layers[0].self_attn.q_proj).__name__ == "Linear4bit"
    forcing, target = first_token_forcing_vector(tiny_handle(family))
    outputs = engine_outputs(handle, family in VLM_FAMILIES, forcing)
    assert outputs["residuals"].dtype == torch.float32 and outputs["residuals"].device.type == "cpu"
    assert int(outputs["generated"][0, 0]) == target
    # Quantized weights are other weights: compare the paths with each other, not with float32.
    for method in sweep_methods(handle):
        assert relative_error(outputs[f"sweep {method}"], outputs["sweep naive"]) < BF16_TOLERANCE, method
    inputs = handle.build_inputs(["Q:France\nA:Paris\n\nQ:Spain\nA:"])
    vectors = record_residuals(handle, inputs)[0, :, 0]
    assert sweep_layers(handle, inputs, vectors).dtype == torch.float32
    assert lens_result(handle, tasks[0])[tasks[0].name]["curves"]
