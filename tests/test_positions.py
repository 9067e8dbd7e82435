"""The one-pass sweep's decode step numbers its token exactly as a full forward of the prompt does.

Logits cannot show a wrong position on tiny random models (a stale M-RoPE offset moves them by about
1e-5), so these tests capture the position ids the text model's position encoding receives, in the
sweep's decode step and in a full forward of the whole prompt, and compare them exactly.
"""

from __future__ import annotations

import warnings
from dataclasses import replace
from typing import Any

import pytest
import torch
from conftest import random_image, tiny_handle
from tiny_models import BUILDERS, FAMILIES, VLM_FAMILIES

from taskvec.checks.structure import recorded_position_ids
from taskvec.engine import sweep_layers
from taskvec.models import ModelHandle

CASES = [(family, False) for family in FAMILIES] + [(family, True) for family in VLM_FAMILIES]
CASE_IDS = [f"{family}-{'image' if images else 'text'}" for family, images in CASES]


def one_pass_applies(handle: ModelHandle) -> bool:
    return handle.architecture.cached_step and not handle.architecture.bidirectional_prompt


def skip_unless_one_pass(handle: ModelHandle) -> None:
    if not one_pass_applies(handle):
        pytest.skip(f"{handle.architecture.family} sweeps by the batched path (no decode step)")


def freshly_built_handle(family: str) -> ModelHandle:
    """A new model instance: no state left by the forwards other tests ran on the shared one."""
    tiny = BUILDERS[family](0)
    return ModelHandle.wrap(tiny.model, tiny.processor, name=f"fresh-{family}")


def text_prompt(handle: ModelHandle) -> dict[str, Any]:
    return handle.build_inputs(["Q:France\nA:Paris\n\nQ:Spain\nA:"])


def image_prompt(handle: ModelHandle, seed: int = 5, size: int = 24) -> dict[str, Any]:
    return handle.build_inputs(["Q:<image>\nA:Paris\n\nQ:Spain\nA:"], [[random_image(seed, size)]])


def prompt(handle: ModelHandle, with_images: bool) -> dict[str, Any]:
    return image_prompt(handle) if with_images else text_prompt(handle)


def layer_vectors(handle: ModelHandle) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return torch.randn(handle.num_layers, handle.hidden_size, generator=generator)


@torch.no_grad()
def assert_decode_step_numbered_like_a_full_forward(handle: ModelHandle, inputs: dict[str, Any]) -> None:
    """The sweep's decode step gives each row the last column of the full forward's position ids,
    and its logits equal the naive loop's."""
    vectors = layer_vectors(handle)
    with recorded_position_ids(handle) as sweep_calls:
        one_pass = sweep_layers(handle, inputs, vectors, method="one_pass")
    with recorded_position_ids(handle) as full_calls:
        handle.model(**inputs, use_cache=False)
    # The sweep runs the prompt minus its last token, then decode steps (one, or one per group of
    # rows skipping the same layers below their patch): as many calls each as a full forward.
    per_forward = len(full_calls)
    decode_calls = sweep_calls[per_forward:]
    assert decode_calls and len(decode_calls) % per_forward == 0
    decoded_rows = 0
    for step in range(0, len(decode_calls), per_forward):
        step_calls = decode_calls[step : step + per_forward]
        step_rows = step_calls[0].shape[-2]
        for full, decode in zip(full_calls, step_calls, strict=True):
            expected = full[..., -1:]
            assert decode.shape == (*expected.shape[:-2], step_rows, 1)
            assert decode.dtype == expected.dtype
            assert torch.equal(decode, expected.expand_as(decode)), (
                f"decode step positions {decode[..., 0, 0].tolist()}, "
                f"full forward {expected.flatten().tolist()}"
            )
        decoded_rows += step_rows
    assert decoded_rows == handle.num_layers
    naive = sweep_layers(handle, inputs, vectors, method="naive")
    torch.testing.assert_close(one_pass, naive, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(("family", "with_images"), CASES, ids=CASE_IDS)
def test_decode_step_positions_equal_the_full_forward(family: str, with_images: bool) -> None:
    handle = tiny_handle(family)
    skip_unless_one_pass(handle)
    inputs = prompt(handle, with_images)
    assert_decode_step_numbered_like_a_full_forward(handle, inputs)
    if "position_ids" in inputs:  # learned absolute positions: the model's own numbering too
        without = {key: value for key, value in inputs.items() if key != "position_ids"}
        assert_decode_step_numbered_like_a_full_forward(handle, without)


@pytest.mark.parametrize(("family", "with_images"), CASES, ids=CASE_IDS)
def test_decode_step_positions_on_a_freshly_built_model(family: str, with_images: bool) -> None:
    handle = freshly_built_handle(family)
    skip_unless_one_pass(handle)
    assert_decode_step_numbered_like_a_full_forward(handle, prompt(handle, with_images))


@pytest.mark.parametrize("with_images", [False, True], ids=["then-text", "then-another-image"])
@pytest.mark.parametrize("family", VLM_FAMILIES)
@torch.no_grad()
def test_decode_step_positions_after_an_image_prompt(family: str, with_images: bool) -> None:
    """Whatever an earlier image prompt left on the model must not number the next prompt."""
    handle = freshly_built_handle(family)
    skip_unless_one_pass(handle)
    earlier = image_prompt(handle, seed=11, size=128)
    handle.model(**earlier, use_cache=False)
    sweep_layers(handle, earlier, layer_vectors(handle), method="one_pass")
    assert_decode_step_numbered_like_a_full_forward(handle, prompt(handle, with_images))


@pytest.mark.parametrize("family", VLM_FAMILIES)
def test_decode_step_positions_with_two_images_of_different_sizes(family: str) -> None:
    """Text after a second image continues from both images' grids; Mllama's last token sees only
    some of the images' tiles (the last row of cross_attention_mask)."""
    handle = tiny_handle(family)
    skip_unless_one_pass(handle)
    if not handle.architecture.multi_image:
        pytest.skip(f"{family} takes one image per prompt")
    inputs = handle.build_inputs(
        ["Q:<image>\nA:Paris\n\nQ:<image>\nA:"], [[random_image(3, 40), random_image(4, 16)]]
    )
    assert_decode_step_numbered_like_a_full_forward(handle, inputs)


def assert_auto_sweeps_as_the_table_says(handle: ModelHandle) -> None:
    inputs = text_prompt(handle)
    forwards = 0

    def count(*_: Any) -> None:
        nonlocal forwards
        forwards += 1

    hook = handle.model.register_forward_pre_hook(count)
    try:
        auto = sweep_layers(handle, inputs, layer_vectors(handle))
    finally:
        hook.remove()
    if one_pass_applies(handle):
        # The prompt minus its last token, then decode steps: one, or one per group of rows that
        # skip the same layers below their patch (engine/layer_skipping.py).
        assert 2 <= forwards <= 1 + handle.num_layers, "one pass: the prompt's prefix, then decode steps"
        return
    assert forwards == 1, "batched: one forward of the whole prompt, a row per layer"
    batched = sweep_layers(handle, inputs, layer_vectors(handle), method="batched")
    torch.testing.assert_close(auto, batched, atol=0.0, rtol=0.0)
    with pytest.raises(ValueError, match="one-pass sweep does not apply"):
        sweep_layers(handle, inputs, layer_vectors(handle), method="one_pass")


@pytest.mark.parametrize("family", FAMILIES)
@torch.no_grad()
def test_auto_sweeps_one_pass_only_where_the_table_allows_it(family: str) -> None:
    assert_auto_sweeps_as_the_table_says(tiny_handle(family))


@torch.no_grad()
def test_a_family_without_an_exact_cached_step_sweeps_batched() -> None:
    shared = tiny_handle("llama")
    handle = ModelHandle(shared.model, shared.processor, replace(shared.architecture, cached_step=False))
    assert_auto_sweeps_as_the_table_says(handle)


@pytest.mark.parametrize(("family", "with_images"), CASES, ids=CASE_IDS)
def test_one_pass_sweep_passes_the_cache_under_its_current_name(family: str, with_images: bool) -> None:
    handle = tiny_handle(family)
    skip_unless_one_pass(handle)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sweep_layers(handle, prompt(handle, with_images), layer_vectors(handle), method="one_pass")
    deprecated = [str(warning.message) for warning in caught if "past_key_values" in str(warning.message)]
    assert not deprecated, deprecated
