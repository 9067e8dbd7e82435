"""The tiny models of every family build, run, generate and expose what the adapters rely on."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import PIL.Image
import pytest
import torch
from tiny_models import (
    BUILDERS,
    FAMILIES,
    IMAGE,
    LM_FAMILIES,
    VLM_FAMILIES,
    TinyModel,
    build_tiny,
    make_inputs,
    resolve,
)
from transformers import BatchFeature, PreTrainedTokenizerFast
from transformers.processing_utils import ProcessorMixin

from taskvec.models import ARCHITECTURES

# transformers' PaliGemmaProcessor calls np.array on tensors (numpy 2 copy-keyword deprecation).
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

ATOL = 1e-4


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Iterator[None]:
    """Tiny tensors gain nothing from intra-op threads, and on a busy 2-core machine the threads
    contend (4x slower here); restore the setting for the other test modules."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# Exactly three new tokens: a random model may well predict eos first.
THREE_GREEDY_TOKENS: dict[str, Any] = {"max_new_tokens": 3, "min_new_tokens": 3, "do_sample": False}

SEQUENCE_KEYS = ("input_ids", "attention_mask", "token_type_ids", "mm_token_type_ids", "cross_attention_mask")


def image(seed: int, size: tuple[int, int] = (24, 24)) -> PIL.Image.Image:
    """A noisy image of one colour per seed (pure noise would look alike to pooled random towers)."""
    random = np.random.RandomState(seed)
    colour = random.randint(0, 256, 3)
    noise = random.randint(-40, 41, (size[1], size[0], 3))
    return PIL.Image.fromarray(np.clip(colour + noise, 0, 255).astype(np.uint8))


def one_prompt(tiny: TinyModel) -> BatchFeature:
    if not tiny.is_vlm:
        return make_inputs(tiny, ["Q:France\nA:"], None)
    return make_inputs(tiny, [f"Q:{IMAGE}\nA:"], [[image(0)]])


def two_prompts(tiny: TinyModel) -> tuple[list[str], list[list[PIL.Image.Image]] | None]:
    """Two prompts of different lengths (and, for VLMs, images of different sizes)."""
    if not tiny.is_vlm:
        return ["Q:France\nA:", "The capital city of the country Q:Japan\nA:"], None
    prompts = [f"Q:{IMAGE}\nA:", f"The capital city of the country Q:{IMAGE}\nA:"]
    return prompts, [[image(1)], [image(2, (28, 20))]]


def text_config(tiny: TinyModel) -> object:
    return tiny.model.config.get_text_config()


def forward_position_ids(tiny: TinyModel, inputs: BatchFeature) -> dict[str, torch.Tensor]:
    """GPT-2 has absolute position embeddings: a left-padded forward needs explicit positions
    (generate computes them itself). Rotary models are invariant to the left-padding offset."""
    if tiny.architecture.position_style != "absolute":
        return {}
    return {"position_ids": (inputs["attention_mask"].cumsum(-1) - 1).clamp(min=0)}


def decode_position_ids(tiny: TinyModel, attention_mask: torch.Tensor) -> torch.Tensor:
    """Position of the newest token, given the attention mask over cache + new token."""
    position = attention_mask.sum(-1, keepdim=True) - 1
    architecture = tiny.architecture
    if architecture.position_style == "mrope":
        # M-RoPE: text after an image continues from the image's largest position, one shift per row
        # that the prefill (with images) stored on the model; positions are (3 axes, batch, length).
        rope_deltas = tiny.model.model.rope_deltas
        position = position + rope_deltas.repeat_interleave(position.shape[0] // rope_deltas.shape[0], dim=0)
        return position.unsqueeze(0).expand(3, -1, -1)
    if tiny.family == "paligemma":
        return position + 1  # PaliGemma positions are 1-indexed
    return position


@pytest.mark.parametrize("family", FAMILIES)
def test_builds_with_layout(family: str) -> None:
    tiny = build_tiny(family)
    assert tiny.family == family
    assert not tiny.model.training
    assert all(p.dtype == torch.float32 for p in tiny.model.parameters())
    assert isinstance(tiny.tokenizer, PreTrainedTokenizerFast)
    assert tiny.tokenizer.padding_side == "left"
    architecture = tiny.architecture
    layers = resolve(tiny.model, architecture.layers_path)
    assert isinstance(layers, torch.nn.ModuleList)
    assert len(layers) == text_config(tiny).num_hidden_layers
    assert 2 <= len(layers) <= 4
    assert isinstance(resolve(tiny.model, architecture.norm_path), torch.nn.Module)
    unembed = resolve(tiny.model, architecture.unembed_path)
    assert isinstance(unembed, torch.nn.Linear)
    assert unembed.out_features >= len(tiny.tokenizer)
    assert 32 <= unembed.in_features <= 64
    if family in VLM_FAMILIES:
        assert isinstance(tiny.processor, ProcessorMixin)
        assert tiny.is_vlm
    else:
        assert tiny.processor is tiny.tokenizer
        assert not tiny.is_vlm


@pytest.mark.parametrize("family", FAMILIES)
def test_table_module_paths_exist(family: str) -> None:
    """The text model holds the decoder layers; the vision tower and projector are modules apart
    from it, and every vision-language model has at least a projector."""
    tiny = build_tiny(family)
    architecture = tiny.architecture
    assert architecture.text_model_path is not None
    text_model = resolve(tiny.model, architecture.text_model_path)
    assert architecture.layers_path.startswith(f"{architecture.text_model_path}.")
    assert architecture.norm_path.startswith(f"{architecture.text_model_path}.")
    text_parameters = {id(p) for p in text_model.parameters()}
    if not tiny.is_vlm:
        assert architecture.vision_paths == ()
        return
    assert architecture.projector_path is not None
    for path in architecture.vision_paths:
        module = resolve(tiny.model, path)
        assert isinstance(module, torch.nn.Module)
        parameters = {id(p) for p in module.parameters()}
        assert parameters and not parameters & text_parameters, path
    if architecture.rope_index_path is not None:
        assert callable(resolve(tiny.model, architecture.rope_index_path))


def test_every_table_entry_has_a_builder() -> None:
    missing = [entry.family for entry in ARCHITECTURES if entry.family not in BUILDERS]
    assert not missing, f"architecture table entries without a tiny builder: {missing}"


def test_every_builder_is_a_table_family() -> None:
    unknown = sorted(set(BUILDERS) - {entry.family for entry in ARCHITECTURES})
    assert not unknown, f"tiny builders for families not in the architecture table: {unknown}"


def test_families_are_distinct_and_complete() -> None:
    assert set(VLM_FAMILIES) | set(LM_FAMILIES) == set(FAMILIES)
    assert not set(VLM_FAMILIES) & set(LM_FAMILIES)
    assert len(FAMILIES) == len(set(FAMILIES)) == len(ARCHITECTURES)
    depths = {len(resolve(build_tiny(f).model, build_tiny(f).architecture.layers_path)) for f in FAMILIES}
    assert depths == {2, 3, 4}


def test_build_is_cached_and_seeded() -> None:
    assert build_tiny("llama") is build_tiny("llama")
    other = build_tiny("llama", seed=1)
    first = next(build_tiny("llama").model.parameters())
    assert not torch.equal(first, next(other.model.parameters()))
    state = torch.random.get_rng_state()
    build_tiny("llama", seed=2)
    assert torch.equal(state, torch.random.get_rng_state())


@pytest.mark.parametrize("family", FAMILIES)
def test_tokenizer_pieces(family: str) -> None:
    tokenizer = build_tiny(family).tokenizer
    ids = tokenizer("Q:France\nA:Paris\n\n", add_special_tokens=False)["input_ids"]
    pieces = [tokenizer.decode([i]) for i in ids]
    if family == "fuyu":
        assert pieces[0] == "\u2581"  # sentencepiece-style start of text, which FuyuProcessor relies on
        pieces = pieces[1:]
    assert pieces == ["Q", ":", "France", "\n", "A", ":", "Paris", "\n", "\n"]
    assert tokenizer.unk_token_id not in ids
    assert tokenizer.pad_token_id == 0


@pytest.mark.parametrize("family", FAMILIES)
def test_forward_hidden_states_and_generate(family: str) -> None:
    tiny = build_tiny(family)
    inputs = one_prompt(tiny)
    if tiny.is_vlm:
        assert "pixel_values" in inputs
    num_layers = len(resolve(tiny.model, tiny.architecture.layers_path))
    with torch.no_grad():
        out = tiny.model(**inputs, output_hidden_states=True)
        generated = tiny.model.generate(**inputs, **THREE_GREEDY_TOKENS)
    length = inputs["input_ids"].shape[1]
    assert out.logits.shape[:2] == (1, length)
    assert torch.isfinite(out.logits).all()
    assert len(out.hidden_states) == num_layers + 1
    assert generated.shape == (1, length + 3)
    assert torch.equal(generated[:, :length], inputs["input_ids"])


@pytest.mark.parametrize("family", FAMILIES)
def test_left_padded_batch_matches_single_prompts(family: str) -> None:
    tiny = build_tiny(family)
    prompts, images = two_prompts(tiny)
    batch = make_inputs(tiny, prompts, images)
    mask = batch["attention_mask"]
    assert mask.shape[0] == 2 and (mask[:, -1] == 1).all()
    assert (mask == 0).any() and (mask[:, 0] == 0).any(), "one row must be left-padded"
    with torch.no_grad():
        logits = tiny.model(**batch, **forward_position_ids(tiny, batch)).logits[:, -1]
        for row, prompt in enumerate(prompts):
            single = make_inputs(tiny, [prompt], None if images is None else [images[row]])
            expected = tiny.model(**single).logits[0, -1]
            torch.testing.assert_close(logits[row], expected, atol=ATOL, rtol=0)
        generated = tiny.model.generate(**batch, **THREE_GREEDY_TOKENS)
    assert generated.shape == (2, batch["input_ids"].shape[1] + 3)


@pytest.mark.parametrize("family", FAMILIES)
def test_final_norm_and_unembedding_reproduce_logits(family: str) -> None:
    """What a logit lens relies on: logits = unembed(norm(residual after the last layer)), with
    Gemma3's soft-capping on top, and hidden_states[-1] is already normalised."""
    tiny = build_tiny(family)
    architecture = tiny.architecture
    layers = resolve(tiny.model, architecture.layers_path)
    norm = resolve(tiny.model, architecture.norm_path)
    unembed = resolve(tiny.model, architecture.unembed_path)
    seen: dict[str, torch.Tensor] = {}

    def keep_output(module: torch.nn.Module, args: Any, output: Any) -> None:
        seen["residual"] = output[0] if isinstance(output, tuple) else output  # v5 layers return a tensor

    handle = layers[-1].register_forward_hook(keep_output)
    try:
        with torch.no_grad():
            out = tiny.model(**one_prompt(tiny), output_hidden_states=True)
            normed = norm(seen["residual"])
            logits = unembed(normed)
    finally:
        handle.remove()
    cap = getattr(text_config(tiny), "final_logit_softcapping", None)
    assert (cap is not None) == (family in ("gemma3_text", "gemma2", "gemma4"))
    if cap is not None:
        logits = cap * torch.tanh(logits / cap)
    torch.testing.assert_close(out.hidden_states[-1], normed, atol=ATOL, rtol=0)
    torch.testing.assert_close(out.logits, logits, atol=ATOL, rtol=0)


def test_gpt2_left_padding_needs_position_ids() -> None:
    tiny = build_tiny("gpt2")
    batch = make_inputs(tiny, *two_prompts(tiny))
    single = make_inputs(tiny, ["Q:France\nA:"])
    with torch.no_grad():
        padded = tiny.model(**batch).logits[0, -1]
        expected = tiny.model(**single).logits[0, -1]
    assert not torch.allclose(padded, expected, atol=ATOL)


@pytest.mark.parametrize("family", FAMILIES)
def test_decode_step_on_repeated_cache_matches_full_forward(family: str) -> None:
    """Prefill all but the last token, repeat the cache for 3 rows, then run the last token with
    explicit position_ids: the recipe of the engine's one-pass layer sweep. Mllama
    also needs the last token's row of cross_attention_mask (see test_mllama_decode_step_...)."""
    tiny = build_tiny(family)
    prompts, images = two_prompts(tiny)
    inputs = make_inputs(tiny, prompts[1:], None if images is None else images[1:])
    rows = 3
    prefix = {k: v[:, :-1] if k in SEQUENCE_KEYS else v for k, v in inputs.items()}
    with torch.no_grad():
        full = tiny.model(**inputs).logits[0, -1]
        cache = tiny.model(**prefix, use_cache=True).cache
        cache.batch_repeat_interleave(rows)
        mask = inputs["attention_mask"].repeat(rows, 1)
        step = tiny.model(
            input_ids=inputs["input_ids"][:, -1:].repeat(rows, 1),
            attention_mask=mask,
            position_ids=decode_position_ids(tiny, mask),
            cache=cache,
            use_cache=True,
            **last_cross_attention_row(inputs, rows),
        ).logits[:, -1]
    if tiny.architecture.bidirectional_prompt:
        # Prefix-LM: the earlier prompt tokens see the last one in a full forward, never when it
        # comes as a separate decode step, unless the full forward marks it as suffix.
        assert not torch.allclose(step[0], full, atol=ATOL)
        token_types = inputs["token_type_ids"].clone()
        token_types[:, -1] = 1
        with torch.no_grad():
            full = tiny.model(**{**inputs, "token_type_ids": token_types}).logits[0, -1]
    for row in range(rows):
        torch.testing.assert_close(step[row], full, atol=ATOL, rtol=0)


def last_cross_attention_row(inputs: BatchFeature, rows: int) -> dict[str, torch.Tensor]:
    """Mllama's cross_attention_mask (batch, tokens, images, tiles) for the last token only."""
    if "cross_attention_mask" not in inputs:
        return {}
    return {"cross_attention_mask": inputs["cross_attention_mask"][:, -1:].repeat_interleave(rows, dim=0)}


def test_mllama_decode_step_needs_the_last_cross_attention_row() -> None:
    """What a hand-built decode step of Mllama needs: given only the token-shaped inputs, the last
    token attends to every tile of every image, even tiles that are padding and images that its
    cross_attention_mask hides; with that mask's last row it is exact again."""
    tiny = build_tiny("mllama")
    inputs = make_inputs(tiny, [f"Q:{IMAGE}\nA:Paris\n\nQ:{IMAGE}\nA:"], [[image(3), image(4, (16, 16))]])
    # The last token sees one tile: the single tile of the second image.
    assert inputs["cross_attention_mask"][0, -1].tolist() == [[0, 0, 0, 0], [1, 0, 0, 0]]
    length = inputs["input_ids"].shape[1]
    prefix = {k: v[:, :-1] if k in SEQUENCE_KEYS else v for k, v in inputs.items()}

    def decode_step(extra: dict[str, torch.Tensor]) -> torch.Tensor:
        cache = tiny.model(**prefix, use_cache=True).cache
        return tiny.model(
            input_ids=inputs["input_ids"][:, -1:],
            attention_mask=inputs["attention_mask"],
            position_ids=torch.tensor([[length - 1]]),
            cache=cache,
            use_cache=True,
            **extra,
        ).logits[0, -1]

    with torch.no_grad():
        full = tiny.model(**inputs).logits[0, -1]
        without_row = decode_step({})
        with_row = decode_step(last_cross_attention_row(inputs, 1))
    assert not torch.allclose(without_row, full, atol=ATOL)
    torch.testing.assert_close(with_row, full, atol=ATOL, rtol=0)


@pytest.mark.parametrize("family", ["gemma3_text", "gemma3", "gemma2", "gemma4"])
def test_gemma_uses_sliding_window_cache(family: str) -> None:
    tiny = build_tiny(family)
    config = text_config(tiny)
    assert config.sliding_window == 8
    assert "sliding_attention" in config.layer_types and "full_attention" in config.layer_types
    inputs = make_inputs(tiny, ["The capital city of the country Q:France\nA:Paris\n\nQ:Japan\nA:"])
    assert inputs["input_ids"].shape[1] > 2 * config.sliding_window
    with torch.no_grad():
        cache = tiny.model(**inputs, use_cache=True).cache
    kinds = [type(layer).__name__ for layer in cache.layers]
    first_shared = config.num_hidden_layers - getattr(config, "num_kv_shared_layers", 0)
    assert first_shared >= 2
    for index, (kind, layer_type) in enumerate(zip(kinds, config.layer_types, strict=True)):
        if index >= first_shared:
            # Gemma4's KV-shared layers read an earlier layer's cache and keep none of their own.
            assert kind == "DummyLayer"
        else:
            assert ("Sliding" in kind) == (layer_type == "sliding_attention")


@pytest.mark.parametrize("family", VLM_FAMILIES)
def test_two_images_in_one_prompt(family: str) -> None:
    tiny = build_tiny(family)
    architecture = tiny.architecture
    prompt = f"Q:{IMAGE}\nA:Paris\n\nQ:{IMAGE}\nA:"
    images = [[image(3), image(4, (20, 28))]]
    if not architecture.multi_image:
        assert "one image per prompt" in architecture.notes
        # The limitation is the processor's own, not make_inputs'.
        with pytest.raises(ValueError, match="number of"):
            tiny.processor(
                text=[prompt.replace(IMAGE, architecture.image_token or "")],
                images=images,
                return_tensors="pt",
            )
        pytest.skip(architecture.notes)
    inputs = make_inputs(tiny, [prompt], images)
    other_second_image = make_inputs(tiny, [prompt], [[image(3), image(5, (20, 28))]])
    with torch.no_grad():
        out = tiny.model(**inputs, output_hidden_states=True)
        other = tiny.model(**other_second_image).logits[0, -1]
        generated = tiny.model.generate(**inputs, **THREE_GREEDY_TOKENS)
    assert torch.isfinite(out.logits).all()
    assert not torch.allclose(out.logits[0, -1], other, atol=ATOL), "the second image must be used"
    assert generated.shape == (1, inputs["input_ids"].shape[1] + 3)


@pytest.mark.parametrize("family", VLM_FAMILIES)
def test_make_inputs_checks_image_counts(family: str) -> None:
    tiny = build_tiny(family)
    with pytest.raises(ValueError):
        make_inputs(tiny, [f"Q:{IMAGE}\nA:"], [[]])


def test_text_models_reject_images() -> None:
    with pytest.raises(ValueError):
        make_inputs(build_tiny("llama"), ["Q:France\nA:"], [[image(0)]])
