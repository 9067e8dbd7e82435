"""What attention heads add to the residual stream, through whatever follows the attention block.

Where the block's output joins the residual as it is (Llama, Qwen, GPT-2, ...), a head adds its
share of the output projection, and the shares of several heads add up. Gemma 2-4 normalise the
block's output first (`post_attention_layernorm`), and Mllama's cross-attention layers scale it by
tanh of a learnt gate. A norm is not additive, so the heads' effect on the residual stream is taken
to first order at the layer's mean attention output: the norm's Jacobian there applied to the heads'
summed share. On a family without a norm this is exactly the summed share.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from taskvec.engine.devices import compute_dtype, execution_device, to_cpu_float32
from taskvec.engine.heads import attention_output, head_contribution, head_layout
from taskvec.models.convention import module_at
from taskvec.models.handle import ModelHandle


def attention_output_norm(handle: ModelHandle, layer: int) -> torch.nn.Module | None:
    """The norm between decoder layer `layer`'s attention block and the residual stream, or None."""
    norm = handle.architecture.attention_output_norm
    if norm is None:
        return None
    decoder_layer = handle.layers[layer]
    if norm.only_with is not None and module_at(decoder_layer, norm.only_with) is None:
        return None
    return module_at(decoder_layer, norm.path)


def attention_output_gate(handle: ModelHandle, layer: int) -> float:
    """The factor the residual stream receives decoder layer `layer`'s attention output with."""
    path = handle.architecture.attention_output_gate_path
    if path is None:
        return 1.0
    gate = getattr(handle.layers[layer], path, None)
    if not isinstance(gate, torch.Tensor):
        return 1.0
    return float(torch.tanh(gate.detach().float()).reshape(-1)[0])


@torch.no_grad()
def heads_in_residual(
    handle: ModelHandle, layer: int, heads: Sequence[int], layer_means: torch.Tensor
) -> torch.Tensor:
    """What `heads` of `layer` add to the residual stream when each outputs its mean: [hidden].

    `layer_means` is [heads, head_dim], every head's mean output at the position; the means of all
    heads give the point the norm (if any) is linearised at.
    """
    share = torch.zeros(handle.hidden_size)
    for head in heads:
        share += head_contribution(handle, layer, head, layer_means[head])
    norm = attention_output_norm(handle, layer)
    if norm is not None:
        share = _through_norm(norm, _mean_block_output(handle, layer, layer_means), share)
    return share * attention_output_gate(handle, layer)


def _mean_block_output(handle: ModelHandle, layer: int, layer_means: torch.Tensor) -> torch.Tensor:
    """The attention output projection of every head's mean, bias included: [hidden] float32."""
    projection = attention_output(handle, layer)
    layout = head_layout(handle)
    width = layout.heads * layout.head_dims[layer]
    device = execution_device(projection) or handle.device
    dtype = compute_dtype(projection) or handle.dtype
    heads_input = layer_means.reshape(1, width).to(device=device, dtype=dtype)
    return to_cpu_float32(projection(heads_input))[0]


def _through_norm(norm: torch.nn.Module, point: torch.Tensor, direction: torch.Tensor) -> torch.Tensor:
    """The norm's Jacobian at `point` applied to `direction`, in float32 on the CPU.

    Run on float32 copies of the norm's own parameters, so any norm module (Gemma's 1 + weight
    RMSNorm, a LayerNorm) is differentiated as it computes, whatever dtype the model is held in.
    """
    state = {name: value.detach().to("cpu", torch.float32) for name, value in norm.state_dict().items()}

    def normalise(x: torch.Tensor) -> torch.Tensor:
        output: torch.Tensor = torch.func.functional_call(norm, state, (x,))
        return output

    mapped: torch.Tensor = torch.func.jvp(normalise, (point.float(),), (direction.float(),))[1]
    return mapped.float()
