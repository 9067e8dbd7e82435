"""Per-head reads and writes of the attention output projection's input, for every family: the heads'
contributions sum to the attention block's output, replacing a head by its own value changes nothing,
replacing it by another changes its position only, and each layer's head size is the model's own
(Gemma 4 with heads of two sizes)."""

from __future__ import annotations

import copy
from dataclasses import replace
from typing import Any

import pytest
import torch
import transformers
from conftest import random_image, tiny_handle
from tiny_models import FAMILIES, VLM_FAMILIES, build_tiny

from taskvec.engine import (
    AttentionOutputNotFoundError,
    HeadPatch,
    HeadShapeError,
    attention_output,
    head_contribution,
    head_layout,
    patch_heads,
    record_heads,
)
from taskvec.models import ModelHandle

CASES = [(family, False) for family in FAMILIES] + [(family, True) for family in VLM_FAMILIES]
CASE_IDS = [f"{family}-{'image' if images else 'text'}" for family, images in CASES]

TEXT_PROMPTS = ["Q:France\nA:", "Q:France\nA:Paris\n\nQ:Spain\nA:"]
IMAGE_PROMPTS = ["Q:<image>\nA:", "Q:what is this <image> called\nA:"]


def batch_of(handle: ModelHandle, with_images: bool) -> dict[str, Any]:
    """Two prompts of different lengths as one left-padded batch."""
    if not with_images:
        return handle.build_inputs(TEXT_PROMPTS)
    return handle.build_inputs(IMAGE_PROMPTS, [[random_image(seed)] for seed in range(len(IMAGE_PROMPTS))])


def gemma4_with_two_head_sizes() -> ModelHandle:
    """The tiny Gemma 4 with full-attention heads twice the size of sliding ones (8 and 16), as the
    checkpoints have (256 and 512): one head size for the whole model would cut them wrongly."""
    tiny = build_tiny("gemma4")
    config = copy.deepcopy(tiny.model.config)
    text = config.text_config
    text.per_layer_config = {
        layer: {"head_dim": 16} for layer, kind in enumerate(text.layer_types) if kind == "full_attention"
    }
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = transformers.Gemma4ForConditionalGeneration(config).float().eval()
    return ModelHandle.wrap(model, tiny.processor, name="tiny-gemma4-two-head-sizes")


def handle_for(family: str) -> ModelHandle:
    return gemma4_with_two_head_sizes() if family == "gemma4-two-head-sizes" else tiny_handle(family)


HEAD_CASES = [*CASES, ("gemma4-two-head-sizes", False), ("gemma4-two-head-sizes", True)]
HEAD_CASE_IDS = [*CASE_IDS, "gemma4-two-head-sizes-text", "gemma4-two-head-sizes-image"]


@torch.no_grad()
def projection_outputs(handle: ModelHandle, inputs: dict[str, Any]) -> dict[int, torch.Tensor]:
    """Each attention output projection's output at the last position, for the layers that ran."""
    outputs: dict[int, torch.Tensor] = {}
    hooks = []
    for layer in range(handle.num_layers):

        def hook(_module: Any, _args: Any, output: torch.Tensor, layer: int = layer) -> None:
            outputs[layer] = output[:, -1].detach().float()

        hooks.append(attention_output(handle, layer).register_forward_hook(hook))
    try:
        handle.model(**inputs, use_cache=False)
    finally:
        for registered in hooks:
            registered.remove()
    return outputs


@torch.no_grad()
def all_logits(handle: ModelHandle, inputs: dict[str, Any]) -> torch.Tensor:
    return handle.model(**inputs, use_cache=False).logits.float()


@pytest.mark.parametrize(("family", "with_images"), HEAD_CASES, ids=HEAD_CASE_IDS)
def test_head_contributions_sum_to_the_attention_output(family: str, with_images: bool) -> None:
    handle = handle_for(family)
    inputs = batch_of(handle, with_images)
    layout = head_layout(handle)
    heads = record_heads(handle, inputs, -1)
    expected = projection_outputs(handle, inputs)
    assert len(heads) == handle.num_layers
    for layer, recorded in enumerate(heads):
        assert recorded.shape == (2, 1, layout.heads, layout.head_dims[layer])
        assert recorded.dtype == torch.float32 and recorded.device.type == "cpu"
        if layer not in expected:
            # Mllama's cross-attention layer, which a forward without images skips.
            assert torch.count_nonzero(recorded) == 0
            continue
        total = sum(
            head_contribution(handle, layer, head, recorded[:, 0, head]) for head in range(layout.heads)
        )
        bias = getattr(attention_output(handle, layer), "bias", None)
        if bias is not None:
            total = total + bias.detach().float()
        assert isinstance(total, torch.Tensor) and total.shape == (2, handle.hidden_size)
        torch.testing.assert_close(total, expected[layer], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize(("family", "with_images"), HEAD_CASES, ids=HEAD_CASE_IDS)
def test_replacing_a_head_by_its_own_value_changes_no_logit(family: str, with_images: bool) -> None:
    handle = handle_for(family)
    inputs = batch_of(handle, with_images)
    clean = all_logits(handle, inputs)
    layers = [0, handle.num_layers - 1]
    recorded = record_heads(handle, inputs, -1, layers=layers)
    patches = [
        HeadPatch(layer, head, values[:, 0, head])
        for layer, values in zip(layers, recorded, strict=True)
        for head in (0, values.shape[2] - 1)
    ]
    with patch_heads(handle, patches):
        patched = all_logits(handle, inputs)
    torch.testing.assert_close(patched, clean, atol=1e-6, rtol=0)


@pytest.mark.parametrize(("family", "with_images"), HEAD_CASES, ids=HEAD_CASE_IDS)
@pytest.mark.parametrize("layer", [0, -1], ids=["first-layer", "last-layer"])
def test_a_random_head_changes_its_position_only(family: str, with_images: bool, layer: int) -> None:
    handle = handle_for(family)
    inputs = batch_of(handle, with_images)
    clean = all_logits(handle, inputs)
    head_dim = head_layout(handle).head_dims[layer]
    value = torch.randn(head_dim, generator=torch.Generator().manual_seed(0)) * 4
    with patch_heads(handle, [HeadPatch(layer, 1, value)]):
        patched = all_logits(handle, inputs)
    # Only row 1, given as a per-row value: row 0 must come out as it went in.
    with patch_heads(handle, [HeadPatch(layer, 1, value.unsqueeze(0), rows=[1])]):
        one_row = all_logits(handle, inputs)
    assert bool(((patched[:, -1] - clean[:, -1]).abs().amax(-1) > 1e-4).all()), "every row's last position"
    assert (one_row[1, -1] - clean[1, -1]).abs().max() > 1e-4, "the patched row's last position"
    torch.testing.assert_close(one_row[0], clean[0], atol=0, rtol=0)
    # A prefix LM (PaliGemma) lets earlier prompt tokens read the patched one in the layers above.
    if not handle.architecture.bidirectional_prompt or layer % handle.num_layers == handle.num_layers - 1:
        # Only the prompts' own tokens: a padding position attends to nothing, and what a family
        # computes there (Gemma 2's soft-capped eager attention) is no output of the prompt.
        real = inputs["attention_mask"].bool()[:, :-1] if "attention_mask" in inputs else None
        earlier, earlier_clean = patched[:, :-1], clean[:, :-1]
        if real is not None:
            earlier, earlier_clean = earlier[real], earlier_clean[real]
        torch.testing.assert_close(earlier, earlier_clean, atol=1e-6, rtol=0)
        own = slice(None) if real is None else real[1]
        torch.testing.assert_close(one_row[1, :-1][own], clean[1, :-1][own], atol=1e-6, rtol=0)


def test_a_patch_at_an_earlier_position_per_row() -> None:
    handle = tiny_handle("llama")
    inputs = batch_of(handle, False)
    clean = all_logits(handle, inputs)
    value = torch.randn(2, head_layout(handle).head_dims[1], generator=torch.Generator().manual_seed(1)) * 4
    with patch_heads(handle, [HeadPatch(1, 2, value, position=[-3, -2])]):
        patched = all_logits(handle, inputs)
    torch.testing.assert_close(patched[0, :-3], clean[0, :-3], atol=1e-6, rtol=0)
    torch.testing.assert_close(patched[1, :-2], clean[1, :-2], atol=1e-6, rtol=0)
    assert (patched[0, -3] - clean[0, -3]).abs().max() > 1e-4
    assert (patched[1, -2] - clean[1, -2]).abs().max() > 1e-4


def test_positions_and_layers_follow_record_residuals() -> None:
    handle = tiny_handle("qwen2")
    inputs = batch_of(handle, False)
    every = torch.stack(record_heads(handle, inputs, list(range(-5, 0))), dim=1)
    assert every.shape == (2, handle.num_layers, 5, 4, 12)
    torch.testing.assert_close(
        torch.stack(record_heads(handle, inputs, [-1, -3]), dim=1), every[:, :, [4, 2]]
    )
    per_row = torch.tensor([[-1], [-2]])
    rows = torch.stack(record_heads(handle, inputs, per_row), dim=1)
    torch.testing.assert_close(rows[0, :, 0], every[0, :, 4])
    torch.testing.assert_close(rows[1, :, 0], every[1, :, 3])
    (last_layer,) = record_heads(handle, inputs, -1, layers=[-1])
    torch.testing.assert_close(last_layer, every[:, -1, [4]])


def test_layers_above_the_highest_requested_are_not_run() -> None:
    handle = tiny_handle("llama")
    calls: list[int] = []
    hook = handle.layers[2].register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        record_heads(handle, batch_of(handle, False), -1, layers=[0, 1])
    finally:
        hook.remove()
    assert not calls


def test_a_patched_head_is_recorded_as_patched() -> None:
    handle = tiny_handle("gpt2")
    inputs = batch_of(handle, False)
    value = torch.arange(8, dtype=torch.float32)
    with patch_heads(handle, [HeadPatch(1, 3, value, rows=[0])]):
        _, recorded = record_heads(handle, inputs, -1, layers=[0, 1])
    torch.testing.assert_close(recorded[0, 0, 3], value)
    assert not torch.equal(recorded[1, 0, 3], value)


@pytest.mark.parametrize(
    ("family", "heads", "head_dim"),
    [("llama", 4, 8), ("gpt2", 4, 8), ("gemma", 4, 12), ("qwen3", 4, 8), ("fuyu", 4, 8), ("mllama", 4, 8)],
)
def test_head_layout_matches_the_config(family: str, heads: int, head_dim: int) -> None:
    handle = tiny_handle(family)
    layout = head_layout(handle)
    config = handle.text_config
    assert layout.heads == heads == config.num_attention_heads
    assert layout.head_dims == (head_dim,) * handle.num_layers
    assert layout.uniform_head_dim == (getattr(config, "head_dim", None) or config.hidden_size // heads)


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_has_a_head_layout(family: str) -> None:
    handle = tiny_handle(family)
    layout = head_layout(handle)
    assert layout.heads == handle.text_config.num_attention_heads
    assert len(layout.head_dims) == handle.num_layers and all(size > 0 for size in layout.head_dims)


def test_gemma4_head_sizes_are_per_layer() -> None:
    handle = gemma4_with_two_head_sizes()
    layout = head_layout(handle)
    per_layer = handle.text_config.per_layer_config
    assert layout.head_dims == tuple(per_layer[layer].head_dim for layer in range(handle.num_layers))
    assert layout.head_dims == (8, 16, 8, 16)
    assert layout.uniform_head_dim is None
    assert head_layout(tiny_handle("gemma4")).head_dims == (8, 8, 8, 8)


def test_mllama_cross_attention_layers_use_their_own_path() -> None:
    handle = tiny_handle("mllama")
    assert attention_output(handle, 0) is handle.layers[0].self_attn.o_proj
    assert attention_output(handle, 1) is handle.layers[1].cross_attn.o_proj


def test_a_layer_without_any_of_the_paths_says_which_were_tried() -> None:
    handle = tiny_handle("llama")
    handle.architecture = replace(handle.architecture, attention_output_paths=("nope", "self_attn.nope"))
    tried = r"llama: decoder layer 1 .*'nope', 'self_attn\.nope'"
    with pytest.raises(AttentionOutputNotFoundError, match=tried):
        attention_output(handle, 1)
    with pytest.raises(AttentionOutputNotFoundError, match="llama"):
        record_heads(handle, batch_of(handle, False))


def test_head_values_of_the_wrong_size_or_head_are_refused() -> None:
    handle = tiny_handle("llama")
    inputs = batch_of(handle, False)
    with (
        pytest.raises(HeadShapeError, match="heads have 8"),
        patch_heads(handle, [HeadPatch(0, 0, torch.zeros(7))]),
    ):
        all_logits(handle, inputs)
    with pytest.raises(IndexError, match="head 4"), patch_heads(handle, [HeadPatch(0, 4, torch.zeros(8))]):
        all_logits(handle, inputs)
    with pytest.raises(HeadShapeError):
        head_contribution(handle, 0, 0, torch.zeros(9))
    with pytest.raises(IndexError):
        head_contribution(handle, 0, -1, torch.zeros(8))
    with pytest.raises(IndexError, match="layer 9"):
        attention_output(handle, 9)


def test_head_contribution_is_linear_and_ignores_the_bias() -> None:
    handle = tiny_handle("gpt2")  # Conv1D with a bias
    projection = attention_output(handle, 0)
    assert type(projection).__name__ == "Conv1D"
    with torch.no_grad():
        projection.bias.add_(1.0)  # type: ignore[operator]
    try:
        value = torch.randn(8, generator=torch.Generator().manual_seed(2))
        single = head_contribution(handle, 0, 2, value)
        assert single.shape == (handle.hidden_size,)
        torch.testing.assert_close(head_contribution(handle, 0, 2, torch.zeros(8)), torch.zeros(32))
        torch.testing.assert_close(
            head_contribution(handle, 0, 2, 2 * value), 2 * single, atol=1e-5, rtol=1e-5
        )
        weight = projection.weight.detach()  # [in, out]
        torch.testing.assert_close(single, value @ weight[16:24], atol=1e-5, rtol=1e-5)
    finally:
        with torch.no_grad():
            projection.bias.sub_(1.0)  # type: ignore[operator]


def test_no_head_patches_need_no_attention_output(monkeypatch: pytest.MonkeyPatch) -> None:
    handle = tiny_handle("llama")
    monkeypatch.setattr(
        handle, "architecture", replace(handle.architecture, attention_output_paths=("nope",))
    )
    inputs = batch_of(handle, False)
    with patch_heads(handle, []):
        all_logits(handle, inputs)  # a sweep's decode step on a model whose heads are out of reach
    with pytest.raises(AttentionOutputNotFoundError), patch_heads(handle, [HeadPatch(0, 0, torch.zeros(8))]):
        all_logits(handle, inputs)
