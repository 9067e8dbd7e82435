"""Per-family image defaults, and models outside the table (by transformers' common layout)."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers
from conftest import random_image
from PIL import Image
from tiny_models import (
    BUILDERS,
    FAMILIES,
    TinyModel,
    build_opt,
    build_phi3,
    build_tiny,
    build_tokenizer,
    build_vipllava,
)

from taskvec.engine import record_residuals, sweep_layers
from taskvec.models import ARCHITECTURES, ModelHandle, UnsupportedArchitectureError, architecture_for_class
from taskvec.models.architectures import Architecture
from taskvec.models.convention import ConventionArchitectureWarning, resolve_architecture

PROMPT = "Q:<image>\nA:"


def image_token_count(tiny: TinyModel, inputs: Any) -> int:
    token = tiny.architecture.image_token or ""
    # Qwen's table token wraps the expanded one in vision start/end markers.
    expanded = "<|image_pad|>" if "<|image_pad|>" in token else token
    return int((inputs["input_ids"] == tiny.tokenizer.convert_tokens_to_ids(expanded)).sum())


def process(tiny: TinyModel, image: Image.Image, **kwargs: Any) -> Any:
    prompt = PROMPT.replace("<image>", tiny.architecture.image_token or "")
    return tiny.processor(text=[prompt], images=[[image]], return_tensors="pt", **kwargs)


# ------------------------------------------------------------------------------------ image defaults

FAMILIES_WITH_IMAGE_DEFAULTS = [entry.family for entry in ARCHITECTURES if entry.image_defaults]


def test_the_paper_families_have_image_defaults() -> None:
    assert set(FAMILIES_WITH_IMAGE_DEFAULTS) == {"idefics3", "smolvlm", "qwen2_vl", "qwen2_5_vl", "qwen3_vl"}
    idefics2 = build_tiny("idefics2").architecture
    assert dict(idefics2.image_processor_defaults) == {"do_image_splitting": False}


@pytest.mark.parametrize("family", FAMILIES_WITH_IMAGE_DEFAULTS)
def test_image_defaults_are_accepted_and_change_the_model_inputs(family: str) -> None:
    tiny = build_tiny(family)
    image = random_image(0, size=40)
    plain = process(tiny, image)
    defaults = process(tiny, image, **dict(tiny.architecture.image_defaults))
    assert image_token_count(tiny, defaults) != image_token_count(tiny, plain)
    assert defaults["pixel_values"].shape != plain["pixel_values"].shape
    with torch.no_grad():
        logits = tiny.model(**defaults).logits
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize(("family", "tokens"), [("qwen2_vl", 64), ("qwen2_5_vl", 64), ("qwen3_vl", 49)])
def test_qwen_pixel_bounds_give_every_image_the_tokens_of_a_224px_one(family: str, tokens: int) -> None:
    """The tiny Qwen processors have the checkpoints' patch geometry, so these are the real counts."""
    tiny = build_tiny(family)
    defaults = dict(tiny.architecture.image_defaults)
    square = Image.new("RGB", (224, 224), "red")
    assert image_token_count(tiny, process(tiny, square)) == tokens  # already so without the bounds
    for size in ((24, 24), (448, 448), (300, 200)):
        image = Image.new("RGB", size, "red")
        counted = image_token_count(tiny, process(tiny, image, **defaults))
        assert tokens * 3 // 4 <= counted <= tokens, (size, counted)
    assert image_token_count(tiny, process(tiny, Image.new("RGB", (448, 448), "red"))) == 4 * tokens


@pytest.mark.parametrize("family", ["idefics3", "smolvlm"])
def test_idefics3_style_without_splitting_is_one_image_of_image_seq_len_tokens(family: str) -> None:
    tiny = build_tiny(family)
    image = random_image(1, size=40)
    split = process(tiny, image)
    whole = process(tiny, image, **dict(tiny.architecture.image_defaults))
    assert (
        split["pixel_values"].shape[1] > 1 and image_token_count(tiny, split) > tiny.processor.image_seq_len
    )
    assert whole["pixel_values"].shape[1] == 1
    assert image_token_count(tiny, whole) == tiny.processor.image_seq_len


def test_idefics2_counts_image_tokens_from_its_image_processor_setting() -> None:
    """Why Idefics2's default is an image-processor attribute, not a call argument: the processor
    expands <image> from `image_processor.do_image_splitting`, so the call argument alone leaves 5
    sub-images' worth of tokens for the 1 image it now sends."""
    tiny = BUILDERS["idefics2"](0)  # uncached: a handle may set the attribute on the shared processor
    assert tiny.processor.image_processor.do_image_splitting  # as the checkpoint's processor has it
    image = random_image(2, size=40)
    call_only = process(tiny, image, do_image_splitting=False)
    assert call_only["pixel_values"].shape[1] == 1
    assert image_token_count(tiny, call_only) == 5 * tiny.processor.image_seq_len
    with torch.no_grad(), pytest.raises(ValueError, match="do not match"):
        tiny.model(**call_only)

    for name, value in tiny.architecture.image_processor_defaults:
        setattr(tiny.processor.image_processor, name, value)
    whole = process(tiny, image)
    assert image_token_count(tiny, whole) == tiny.processor.image_seq_len
    with torch.no_grad():
        assert torch.isfinite(tiny.model(**whole).logits).all()


@pytest.mark.parametrize(("splitting", "tokens"), [(True, 320), (False, 64)])
def test_idefics2_checkpoint_geometry_gives_the_papers_token_counts(splitting: bool, tokens: int) -> None:
    tokenizer = build_tokenizer(add_bos=True)
    image_processor = transformers.Idefics2ImageProcessorPil(do_image_splitting=splitting)
    processor = transformers.Idefics2Processor(
        image_processor=image_processor, tokenizer=tokenizer, image_seq_len=64
    )
    inputs = processor(text=[PROMPT], images=[[Image.new("RGB", (224, 224), "red")]], return_tensors="pt")
    assert int((inputs["input_ids"] == tokenizer.convert_tokens_to_ids("<image>")).sum()) == tokens


def test_llava_next_has_no_processor_argument_that_lowers_its_tokens() -> None:
    """What the table's LLaVA-NeXT note says: pinpoints given to the processor change the tiles it
    sends, not the tokens it writes, and the model (which tiles by its config) cannot read them."""
    tiny = build_tiny("llava_next")
    assert "no processor keyword lowers it" in tiny.architecture.notes
    image = random_image(3, size=32)
    tiled = process(tiny, image)
    fewer = process(tiny, image, image_grid_pinpoints=[[16, 16]])
    assert fewer["pixel_values"].shape[1] < tiled["pixel_values"].shape[1]
    assert image_token_count(tiny, fewer) == image_token_count(tiny, tiled)
    with torch.no_grad(), pytest.raises(RuntimeError):
        tiny.model(**fewer)


# ------------------------------------------------------------------------- architectures by convention


@pytest.mark.parametrize("family", FAMILIES)
def test_table_classes_resolve_to_their_entry_without_a_warning(family: str) -> None:
    tiny = build_tiny(family)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert resolve_architecture(tiny.model, tiny.processor) is tiny.architecture


def resolved_by_convention(tiny: TinyModel, family: str) -> Architecture:
    with pytest.warns(ConventionArchitectureWarning) as caught:
        architecture = resolve_architecture(tiny.model, tiny.processor)
    message = str(caught[0].message)
    assert family in message and "by convention, not in the table" in message
    return architecture


def test_an_image_text_model_outside_the_table_resolves_by_convention() -> None:
    tiny = build_vipllava()
    architecture = resolved_by_convention(tiny, "vipllava")
    assert (architecture.family, architecture.model_class) == ("vipllava", "VipLlavaForConditionalGeneration")
    assert architecture.layers_path == "model.language_model.layers"
    assert architecture.norm_path == "model.language_model.norm"
    assert architecture.unembed_path == "lm_head"
    assert architecture.image_token == "<image>"
    assert architecture.vision_paths == ("model.vision_tower", "model.multi_modal_projector")
    assert architecture.position_style == "rotary" and not architecture.bidirectional_prompt


def test_a_causal_lm_outside_the_table_resolves_by_convention() -> None:
    tiny = build_phi3()
    architecture = resolved_by_convention(tiny, "phi3")
    assert (architecture.layers_path, architecture.norm_path) == ("model.layers", "model.norm")
    assert not architecture.is_vision_language and architecture.vision_paths == ()


@pytest.mark.parametrize(
    ("build", "with_image"), [(build_vipllava, True), (build_vipllava, False), (build_phi3, False)]
)
def test_a_convention_handle_passes_the_engine_checks(build: Any, with_image: bool) -> None:
    tiny = build()
    with pytest.warns(ConventionArchitectureWarning):
        handle = ModelHandle(tiny.model, tiny.processor, resolve_architecture(tiny.model, tiny.processor))
    if with_image:
        batch = handle.build_inputs(
            [PROMPT, f"The capital city {PROMPT}"], [[random_image(4)], [random_image(5)]]
        )
    else:
        batch = handle.build_inputs(["Q:France\nA:Paris\n\nQ:Japan\nA:", "Q:Egypt\nA:"])
    residuals = record_residuals(handle, batch, [-1, -2])
    with torch.no_grad():
        hidden_states = handle.model(**batch, output_hidden_states=True, use_cache=False).hidden_states
    for layer in range(handle.num_layers - 1):
        torch.testing.assert_close(
            residuals[:, layer], hidden_states[layer + 1][:, [-1, -2]], atol=1e-5, rtol=1e-4
        )
    torch.testing.assert_close(
        handle.final_norm(residuals[:, -1]), hidden_states[-1][:, [-1, -2]], atol=1e-5, rtol=1e-4
    )

    query = (
        handle.build_inputs([PROMPT], [[random_image(6)]])
        if with_image
        else handle.build_inputs(["Q:Spain\nA:"])
    )
    vectors = torch.randn(handle.num_layers, handle.hidden_size, generator=torch.Generator().manual_seed(0))
    naive = sweep_layers(handle, query, vectors, method="naive")
    assert not torch.allclose(naive[0], naive[-1], atol=1e-4)
    torch.testing.assert_close(
        sweep_layers(handle, query, vectors, method="one_pass"), naive, atol=1e-4, rtol=1e-4
    )


def vipllava_without_norm() -> tuple[torch.nn.Module, Any]:
    tiny = build_vipllava()
    tiny.model.model.language_model.norm = None
    return tiny.model, tiny.processor


def vipllava_missing_a_layer() -> tuple[torch.nn.Module, Any]:
    tiny = build_vipllava()
    del tiny.model.model.language_model.layers[-1]
    return tiny.model, tiny.processor


def vipllava_with_a_tokenizer_for_processor() -> tuple[torch.nn.Module, Any]:
    return build_vipllava().model, build_tokenizer()


def vipllava_without_vision_modules() -> tuple[torch.nn.Module, Any]:
    tiny = build_vipllava()
    tiny.model.model.vision_tower = None
    tiny.model.model.multi_modal_projector = None
    return tiny.model, tiny.processor


def opt() -> tuple[torch.nn.Module, Any]:
    tiny = build_opt()
    return tiny.model, tiny.processor


@pytest.mark.parametrize(
    ("broken", "model_class", "problem"),
    [
        (vipllava_without_norm, "VipLlavaForConditionalGeneration", "no model.language_model.norm"),
        (
            vipllava_missing_a_layer,
            "VipLlavaForConditionalGeneration",
            "model.language_model.layers has 1 layers but the text config says 2",
        ),
        (
            vipllava_with_a_tokenizer_for_processor,
            "VipLlavaForConditionalGeneration",
            "has no image_token string (found None)",
        ),
        (
            vipllava_without_vision_modules,
            "VipLlavaForConditionalGeneration",
            "no model.vision_tower nor model.multi_modal_projector",
        ),
        (
            opt,
            "OPTForCausalLM",
            "no model.language_model (image-text layout); no model.layers (causal-LM layout)",
        ),
    ],
)
def test_a_model_off_the_layout_is_refused_naming_what_is_wrong(
    broken: Any, model_class: str, problem: str
) -> None:
    model, processor = broken()
    with pytest.raises(UnsupportedArchitectureError) as raised:
        resolve_architecture(model, processor)
    message = str(raised.value)
    assert repr(model_class) in message and problem in message


def test_positions_the_convention_cannot_number_are_refused() -> None:
    """A decoder stack without a rotary embedding may have learned absolute positions, which
    left-padded batches would shift: the convention does not guess."""
    tiny = build_phi3()
    tiny.model.model.rotary_emb = None
    with pytest.raises(UnsupportedArchitectureError, match=r"no model\.rotary_emb"):
        resolve_architecture(tiny.model, tiny.processor)


def test_a_family_is_refused_on_a_transformers_release_that_cannot_run_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Llama 4's forward fails in transformers before 5.25: such a release is refused in one line
    naming what to install, before the processor or any weight loads."""
    from taskvec.models import load_model
    from taskvec.models.loading import check_transformers_version

    llama4 = architecture_for_class("Llama4ForConditionalGeneration")
    assert llama4.min_transformers == "5.25"
    check_transformers_version("tiny-llama4", llama4)  # the installed (locked) release runs it
    model_dir = tmp_path / "tiny-llama4"
    build_tiny("llama4").model.save_pretrained(model_dir)  # no processor: the refusal comes first
    monkeypatch.setattr(transformers, "__version__", "5.24.0")
    refusal = r"llama4 needs transformers 5\.25 or later, and 5\.24\.0 is installed"
    with pytest.raises(ValueError, match=refusal):
        load_model(str(model_dir))
