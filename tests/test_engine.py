"""The engine on tiny random models of every family: recording, patching, sweeps, lens, generation."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from conftest import random_image, tiny_handle
from PIL import Image
from tiny_models import FAMILIES, LM_FAMILIES, VLM_FAMILIES

from taskvec.engine import (
    Patch,
    generate_greedy,
    generate_greedy_ids,
    logit_lens,
    patch_at,
    record_residuals,
    sweep_layers,
)
from taskvec.models import ModelHandle

TEXT_PROMPTS = ["Q:France\nA:Paris\n\nQ:Japan\nA:", "Q:Egypt\nA:"]
IMAGE_PROMPTS = ["Q:<image>\nA:Paris\n\nQ:<image>\nA:", "Q:<image>\nA:"]


def prompts_and_images(with_images: bool) -> tuple[list[str], list[list[Image.Image]] | None]:
    """Two prompts of different lengths, and their images (two in the first prompt, one in the second)."""
    if not with_images:
        return TEXT_PROMPTS, None
    return IMAGE_PROMPTS, [[random_image(1), random_image(2)], [random_image(3)]]


def batch_for(handle: ModelHandle, with_images: bool) -> dict[str, Any]:
    if with_images and not handle.architecture.multi_image:
        return handle.build_inputs(IMAGE_PROMPTS[1:] * 2, [[random_image(3)], [random_image(4)]])
    return handle.build_inputs(*prompts_and_images(with_images))


def single_query(handle: ModelHandle, with_images: bool) -> dict[str, Any]:
    if with_images:
        return handle.build_inputs(["Q:<image>\nA:"], [[random_image(5)]])
    return handle.build_inputs(["Q:France\nA:Paris\n\nQ:Spain\nA:"])


CASES = [(family, False) for family in FAMILIES] + [(family, True) for family in VLM_FAMILIES]
CASE_IDS = [f"{family}-{'image' if images else 'text'}" for family, images in CASES]


@torch.no_grad()
def clean_forward(handle: ModelHandle, inputs: dict[str, Any]) -> Any:
    return handle.model(**inputs, output_hidden_states=True, use_cache=False)


@pytest.mark.parametrize(("family", "with_images"), CASES, ids=CASE_IDS)
def test_recorded_residuals_equal_hidden_states(family: str, with_images: bool) -> None:
    handle = tiny_handle(family)
    inputs = batch_for(handle, with_images)
    positions = [-1, -3]
    residuals = record_residuals(handle, inputs, positions)
    hidden_states = clean_forward(handle, inputs).hidden_states
    assert residuals.shape == (2, handle.num_layers, 2, handle.hidden_size)
    # Mllama skips its cross-attention layers on a prompt without images, and hidden_states leaves
    # them out; the engine reports such a layer's output as its input.
    skipped = set() if with_images else set(getattr(handle.text_config, "cross_attention_layers", None) or ())
    ran = [layer for layer in range(handle.num_layers) if layer not in skipped]
    for entry, layer in enumerate(ran[:-1], start=1):  # hidden_states[k] is the k-th layer run's output
        torch.testing.assert_close(
            residuals[:, layer], hidden_states[entry][:, positions], atol=1e-5, rtol=1e-4
        )
    for layer in sorted(skipped):
        torch.testing.assert_close(residuals[:, layer], residuals[:, layer - 1], atol=0, rtol=0)
    # The last entry of hidden_states has the final norm applied; the recorded residual must not.
    normed = handle.final_norm(residuals[:, -1])
    torch.testing.assert_close(normed, hidden_states[-1][:, positions], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize(("family", "with_images"), CASES, ids=CASE_IDS)
def test_logit_lens_of_last_layer_equals_model_logits(family: str, with_images: bool) -> None:
    handle = tiny_handle(family)
    inputs = batch_for(handle, with_images)
    residuals = record_residuals(handle, inputs, -1)
    logits = clean_forward(handle, inputs).logits[:, -1]
    torch.testing.assert_close(logit_lens(handle, residuals[:, -1, 0]), logits, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(("family", "with_images"), CASES, ids=CASE_IDS)
def test_patching_a_position_with_its_own_value_changes_nothing(family: str, with_images: bool) -> None:
    handle = tiny_handle(family)
    inputs = batch_for(handle, with_images)
    layer = handle.num_layers // 2
    own = record_residuals(handle, inputs, -2, layers=[layer])[:, 0, 0]
    clean = clean_forward(handle, inputs).logits[:, -1]
    with patch_at(handle, [Patch(layer, own, position=-2)]):
        patched = clean_forward(handle, inputs).logits[:, -1]
    torch.testing.assert_close(patched, clean, atol=1e-5, rtol=1e-4)
    # A different vector at layer 0 must reach the last position through attention.
    other = own + torch.randn(own.shape, generator=torch.Generator().manual_seed(0)) * own.norm()
    with patch_at(handle, [Patch(0, other, position=-2)]):
        changed = clean_forward(handle, inputs).logits[:, -1]
    assert not torch.allclose(changed, clean, atol=1e-4), "a real patch must change the logits"


@pytest.mark.parametrize("mode", ["replace", "add"])
@pytest.mark.parametrize(("family", "with_images"), CASES, ids=CASE_IDS)
def test_fast_sweeps_equal_the_naive_per_layer_loop(family: str, with_images: bool, mode: str) -> None:
    handle = tiny_handle(family)
    inputs = single_query(handle, with_images)
    generator = torch.Generator().manual_seed(0)
    vectors = torch.randn(handle.num_layers, handle.hidden_size, generator=generator)
    naive = sweep_layers(handle, inputs, vectors, mode=mode, method="naive")  # type: ignore[arg-type]
    assert naive.shape[0] == handle.num_layers
    assert not torch.allclose(naive[0], naive[-1], atol=1e-4), "layers must differ for the test to mean much"
    batched = sweep_layers(handle, inputs, vectors, mode=mode, method="batched")  # type: ignore[arg-type]
    torch.testing.assert_close(batched, naive, atol=1e-4, rtol=1e-4)
    if handle.architecture.bidirectional_prompt:
        with pytest.raises(ValueError, match="one-pass"):
            sweep_layers(handle, inputs, vectors, method="one_pass")
        return
    one_pass = sweep_layers(handle, inputs, vectors, mode=mode, method="one_pass")  # type: ignore[arg-type]
    torch.testing.assert_close(one_pass, naive, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(
    "family", ["llama", "gpt2", "gemma3_text", "qwen2_vl", "llava", "gemma3", "paligemma"]
)
def test_patched_generation_equals_the_cache_free_reference_loop(family: str) -> None:
    handle = tiny_handle(family)
    with_images = family in VLM_FAMILIES
    inputs = single_query(handle, with_images)
    vector = torch.randn(handle.hidden_size, generator=torch.Generator().manual_seed(1)) * 4
    layer, steps = 1, 4
    query_length = inputs["input_ids"].shape[1]
    generated = generate_greedy(handle, inputs, [Patch(layer, vector, position=-1)], max_new_tokens=steps)

    # The reference protocol: no KV cache; every step re-runs the whole sequence with the patch
    # re-applied at the query's last position.
    sequence = inputs
    new_ids: list[int] = []
    for _ in range(steps):
        with torch.no_grad(), patch_at(handle, [Patch(layer, vector, position=query_length - 1)]):
            logits = handle.model(**sequence, use_cache=False).logits[0, -1]
        next_id = int(logits.argmax())
        new_ids.append(next_id)
        sequence = extend_by_one_token(sequence, next_id, family)
    assert generated == handle.tokenizer.batch_decode([new_ids], skip_special_tokens=True)


def extend_by_one_token(inputs: dict[str, Any], token_id: int, family: str) -> dict[str, Any]:
    """Append a generated token to every token-aligned input, as generate() would see it."""
    input_ids = inputs["input_ids"]
    length = input_ids.shape[1]
    # PaliGemma marks generated (suffix) tokens with token type 1; other families use 0 (text).
    appended = {
        "input_ids": token_id,
        "attention_mask": 1,
        "position_ids": length,
        "token_type_ids": 1 if family == "paligemma" else 0,
        "mm_token_type_ids": 0,
    }
    extended = dict(inputs)
    for key, value in inputs.items():
        if isinstance(value, torch.Tensor) and value.shape == input_ids.shape:
            extended[key] = torch.cat([value, torch.full_like(value[:, :1], appended[key])], dim=1)
    return extended


@pytest.mark.parametrize("family", LM_FAMILIES)
def test_patch_rows_and_positions_apply_per_row(family: str) -> None:
    handle = tiny_handle(family)
    inputs = handle.build_inputs(TEXT_PROMPTS)
    clean = clean_forward(handle, inputs).logits[:, -1]
    vector = torch.randn(handle.hidden_size, generator=torch.Generator().manual_seed(2)) * 4
    with patch_at(handle, [Patch(0, vector, position=-1, rows=[1])]):
        patched = clean_forward(handle, inputs).logits[:, -1]
    torch.testing.assert_close(patched[0], clean[0], atol=1e-5, rtol=1e-4)
    assert not torch.allclose(patched[1], clean[1], atol=1e-4)


# ------------------------------------------------------------------ a prefix LM's prompt (PaliGemma)


@pytest.mark.parametrize("with_images", [False, True], ids=["text", "image"])
def test_a_paligemma_batch_equals_each_prompt_alone(with_images: bool) -> None:
    """PaliGemma's prompt attends both ways, as far as token_type_ids mark it (0); a left-padded batch
    marks the same prefix as each prompt alone, whether the processor writes the marks (with images)
    or the handle does (text alone)."""
    handle = tiny_handle("paligemma")
    prompts, images = prompts_and_images(with_images)
    batch = handle.build_inputs(prompts, images)
    assert bool((batch["attention_mask"] == 0).any()), "the prompts should differ in length"
    alone = [
        handle.build_inputs([prompt], None if images is None else [images[row]])
        for row, prompt in enumerate(prompts)
    ]
    together = clean_forward(handle, batch).logits[:, -1]
    each = torch.cat([clean_forward(handle, inputs).logits[:, -1] for inputs in alone])
    torch.testing.assert_close(together, each, atol=1e-5, rtol=1e-4)
    generated = generate_greedy_ids(handle, batch, max_new_tokens=3)
    for row, inputs in enumerate(alone):
        assert torch.equal(generated[row], generate_greedy_ids(handle, inputs, max_new_tokens=3)[0])


def test_a_paligemma_text_prompt_does_not_depend_on_the_attention_implementation() -> None:
    """A text prompt's prefix is in its inputs: without token_type_ids, sdpa given no mask attends
    both ways and eager's causal mask one way (7e-3 apart on the tiny PaliGemma)."""
    handle = tiny_handle("paligemma")
    eager = copy.deepcopy(handle.model)
    eager.set_attn_implementation("eager")  # type: ignore[operator]
    inputs = handle.build_inputs(TEXT_PROMPTS[:1])
    with torch.no_grad():
        expected = handle.model(**inputs).logits
        torch.testing.assert_close(eager(**inputs).logits, expected, atol=1e-5, rtol=1e-4)


def test_a_paligemma_image_prompt_gets_its_processors_own_inputs() -> None:
    """With images the processor writes token_type_ids itself (0 over the whole prompt): the handle
    passes its inputs on unchanged, but for the training labels it derives from them."""
    handle = tiny_handle("paligemma")
    prompts, images = prompts_and_images(True)
    assert images is not None
    ours = handle.build_inputs(prompts[1:], images[1:])
    theirs = handle.processor(text=prompts[1:], images=images[1:], padding=True, return_tensors="pt")
    assert set(ours) == set(theirs) - {"labels"}
    for key, value in theirs.items():
        if key != "labels":
            torch.testing.assert_close(ours[key], value, atol=0, rtol=0)
    assert not bool(ours["token_type_ids"].any())
