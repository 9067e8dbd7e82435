"""What heads add to the residual stream: the table's attention-output norm is the module that
receives the attention output projection's output in a real forward, on every family, and the heads'
residual contribution is the first-order change of what the residual stream receives."""

from __future__ import annotations

import copy

import pytest
import tiny_models
import torch
import transformers
from conftest import tiny_handle
from tiny_models import FAMILIES

from taskvec.engine import (
    attention_output,
    attention_output_gate,
    attention_output_norm,
    head_contribution,
    head_layout,
    heads_in_residual,
)
from taskvec.models import ModelHandle

NORMALISED = {"gemma2", "gemma3", "gemma3_text", "gemma4"}


def _first_self_attention_layer(handle: ModelHandle) -> int:
    # Mllama's cross-attention layers do not run on a text-only forward.
    for index, layer in enumerate(handle.layers):
        if not hasattr(layer, "cross_attn"):
            return index
    raise AssertionError("no self-attention layer")


@pytest.mark.parametrize("family", FAMILIES)
def test_the_table_names_the_norm_the_attention_output_goes_through(family: str) -> None:
    handle = tiny_handle(family)
    layer = _first_self_attention_layer(handle)
    decoder_layer = handle.layers[layer]
    projected: list[torch.Tensor] = []
    normalised: dict[str, torch.Tensor] = {}

    def record_projection(_module: torch.nn.Module, _args: object, output: torch.Tensor) -> None:
        projected.append(output.detach())

    def record_norm(name: str):  # type: ignore[no-untyped-def]
        def hook(_module: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            normalised[name] = args[0].detach()

        return hook

    hooks = [attention_output(handle, layer).register_forward_hook(record_projection)]
    norms = {name: module for name, module in decoder_layer.named_children() if "norm" in name}
    hooks += [module.register_forward_pre_hook(record_norm(name)) for name, module in norms.items()]
    try:
        with torch.no_grad():
            handle.model(**handle.build_inputs(["Q: France\nA:"]))
    finally:
        for hook in hooks:
            hook.remove()
    receivers = [name for name, value in normalised.items() if torch.equal(value, projected[0])]
    norm = attention_output_norm(handle, layer)
    if family in NORMALISED:
        assert norm is not None and receivers == [name for name, module in norms.items() if module is norm]
    else:
        assert norm is None and receivers == []


@pytest.mark.parametrize("family", FAMILIES)
def test_heads_in_residual_is_the_first_order_change_of_what_the_residual_receives(family: str) -> None:
    handle = tiny_handle(family)
    layout = head_layout(handle)
    torch.manual_seed(0)
    for layer in range(handle.num_layers):
        means = torch.randn(layout.heads, layout.head_dims[layer])
        heads = [0, layout.heads - 1]
        mapped = heads_in_residual(handle, layer, heads, means)
        share = sum(head_contribution(handle, layer, head, means[head]) for head in heads)
        norm = attention_output_norm(handle, layer)
        if norm is None:
            torch.testing.assert_close(mapped, share * attention_output_gate(handle, layer))
            continue
        # Central differences on copies of the layer's own modules (Gemma's norm computes in float32).
        projection = copy.deepcopy(attention_output(handle, layer)).double()
        norm64 = copy.deepcopy(norm).double()
        step = 1e-3
        more, less = means.double().clone(), means.double().clone()
        more[heads] *= 1 + step
        less[heads] *= 1 - step
        with torch.no_grad():
            difference = norm64(projection(more.reshape(1, -1))) - norm64(projection(less.reshape(1, -1)))
        torch.testing.assert_close(mapped.double(), (difference / (2 * step))[0], rtol=1e-3, atol=1e-3)
        assert not torch.allclose(mapped, share, rtol=0.1), "the norm changed nothing: the test is idle"


def test_mllama_cross_attention_heads_reach_the_residual_through_the_tanh_gate() -> None:
    handle = tiny_handle("mllama")
    cross = next(index for index, layer in enumerate(handle.layers) if hasattr(layer, "cross_attn"))
    gate = handle.layers[cross].cross_attn_attn_gate
    expected = float(torch.tanh(gate.detach()).reshape(-1)[0])
    assert attention_output_gate(handle, cross) == pytest.approx(expected)
    assert attention_output_gate(handle, _first_self_attention_layer(handle)) == 1.0


def test_a_vlm_class_wrapping_a_gemma_3_language_model_maps_heads_through_its_norm() -> None:
    # The default VLM's layout: LLaVA's class, Gemma 3's decoder layers.
    processor = tiny_models._llava_processor()
    config = transformers.LlavaConfig(
        text_config=tiny_models._text("gemma3_text", 2, vocab_size=len(processor.tokenizer)),
        vision_config=tiny_models._clip_vision(),
        image_token_index=processor.tokenizer.convert_tokens_to_ids("<image>"),
    )
    torch.manual_seed(0)
    handle = ModelHandle.wrap(transformers.LlavaForConditionalGeneration(config).eval(), processor)
    assert all(attention_output_norm(handle, layer) is not None for layer in range(handle.num_layers))
    assert attention_output_norm(tiny_handle("llava"), 0) is None  # the same class on Llama layers
