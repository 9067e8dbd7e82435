"""Read and replace single attention heads: the per-head slices of each attention output projection's input.

Function vectors (Todd et al. 2024) are sums of a few heads' outputs at the last token. A head's
output is its slice of the input of the layer's attention output projection (`o_proj`, GPT-2's
`c_proj`, Persimmon's `dense`), which holds the heads side by side: [batch, seq, heads * head_dim].
Heads are read and replaced there with forward pre-hooks; the architecture table says where the
projection sits in each family (`Architecture.attention_output_paths`).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from taskvec.engine.devices import compute_dtype, execution_device, to_cpu_float32
from taskvec.engine.patching import Patch
from taskvec.engine.positions import per_row_positions
from taskvec.engine.truncated_forward import StopForward
from taskvec.models.convention import module_at
from taskvec.models.handle import ModelHandle


class AttentionOutputNotFoundError(LookupError):
    """A decoder layer has none of its architecture's attention output projection paths."""


class HeadShapeError(ValueError):
    """A projection's input, or a head value, does not have the layout heads x head_dim."""


@dataclass(frozen=True)
class HeadLayout:
    """How each decoder layer's attention output projection input splits into heads.

    `head_dims[l]` is layer l's head size: Gemma 4's full-attention layers have larger heads than its
    sliding ones, so one size for the model would cut their heads in the wrong places.
    """

    heads: int
    head_dims: tuple[int, ...]

    @property
    def uniform_head_dim(self) -> int | None:
        """The head size when every layer has the same one (None otherwise)."""
        return self.head_dims[0] if len(set(self.head_dims)) == 1 else None


def attention_output(handle: ModelHandle, layer: int) -> torch.nn.Module:
    """Decoder layer `layer`'s attention output projection: the first of the table's paths it has."""
    decoder_layer = handle.layers[_layer_index(handle, layer)]
    paths = handle.architecture.attention_output_paths
    for path in paths:
        module = module_at(decoder_layer, path)
        if module is not None:
            return module
    raise AttentionOutputNotFoundError(
        f"{handle.architecture.family}: decoder layer {layer} ({type(decoder_layer).__name__}) has no "
        f"attention output projection at any of {list(paths)} (Architecture.attention_output_paths)"
    )


def head_layout(handle: ModelHandle) -> HeadLayout:
    """Heads per layer (the text config's num_attention_heads) and each layer's head size, read from
    its projection's input width, which is what the model actually cuts."""
    heads = int(handle.text_config.num_attention_heads)
    head_dims = []
    for layer in range(handle.num_layers):
        width = _input_width(handle, layer, attention_output(handle, layer))
        if width % heads:
            raise HeadShapeError(
                f"{handle.architecture.family}: layer {layer}'s attention output projection takes "
                f"{width} values, not a multiple of its {heads} heads"
            )
        head_dims.append(width // heads)
    return HeadLayout(heads, tuple(head_dims))


@torch.no_grad()
def record_heads(
    handle: ModelHandle,
    inputs: dict[str, Any],
    positions: int | Sequence[int] | torch.Tensor = -1,
    *,
    layers: Sequence[int] | None = None,
) -> list[torch.Tensor]:
    """Each head's output at chosen positions, one pass: per requested layer (in order), a float32
    CPU tensor [batch, n_positions, heads, head_dim].

    A list, not one tensor, because head sizes may differ between layers (Gemma 4); when they do not
    (`head_layout(handle).uniform_head_dim`), `torch.stack(result, dim=1)` gives [batch, layers,
    n_positions, heads, head_dim]. `positions` follows `record_residuals`: one index for all rows, a
    list for all rows, or a [batch, n] tensor of per-row indices (negative counts from the end).
    Layers above the highest requested one are not run. Inside `patch_heads` the patched values are
    recorded. A layer the model's forward skips (Mllama's cross-attention layers on a prompt without
    images) added nothing: its heads record zeros.
    """
    wanted = list(range(handle.num_layers)) if layers is None else [_layer_index(handle, i) for i in layers]
    layout = head_layout(handle)
    batch = inputs["input_ids"].shape[0]
    per_row = per_row_positions(positions, batch)
    recorded: dict[int, torch.Tensor] = {}
    top = max(wanted)

    def make_hook(layer: int) -> Any:
        def hook(_module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            heads_input = _heads_input(handle, layer, layout, args, kwargs)
            length = heads_input.shape[1]
            absolute = torch.where(per_row < 0, per_row + length, per_row).to(heads_input.device)
            rows = torch.arange(batch, device=heads_input.device).unsqueeze(1)
            # Kept on the layer's device until the pass ends, as record_residuals does.
            recorded[layer] = heads_input[rows, absolute].detach()
            if layer == top:
                raise StopForward  # nothing above is needed

        return hook

    hooks = [
        attention_output(handle, layer).register_forward_pre_hook(make_hook(layer), with_kwargs=True)
        for layer in set(wanted)
    ]
    try:
        handle.model(**inputs, use_cache=False)
    except StopForward:
        pass
    finally:
        for registered in hooks:
            registered.remove()
    result = []
    for layer in wanted:
        shape = (batch, per_row.shape[1], layout.heads, layout.head_dims[layer])
        values = recorded.get(layer)
        result.append(torch.zeros(shape) if values is None else to_cpu_float32(values).reshape(shape))
    return result


@dataclass(frozen=True)
class HeadPatch:
    """Replace head `head`'s output in decoder layer `layer` with `value`.

    `value` is [head_dim] (same for every row) or [rows, head_dim]. `position` is one index for every
    row (negative counts from the end, so -1 is the last token of a left-padded batch) or one per
    row. `rows` limits the patch to some batch rows; with a per-row value, its rows follow `rows`.
    """

    layer: int
    head: int
    value: torch.Tensor
    position: int | Sequence[int] = -1
    rows: Sequence[int] | None = None

    def apply(self, heads_input: torch.Tensor, head_dim: int) -> torch.Tensor:
        """The projection input [batch, length, heads * head_dim] with this head replaced (a new
        tensor), the value in the activation's device and dtype (as `Patch.apply` does)."""
        heads = heads_input.shape[-1] // head_dim
        if not 0 <= self.head < heads:
            raise IndexError(f"head {self.head} out of range for layer {self.layer}'s {heads} heads")
        if self.value.shape[-1] != head_dim:
            raise HeadShapeError(
                f"a head value of {self.value.shape[-1]} values cannot replace a head of layer "
                f"{self.layer}, whose heads have {head_dim}"
            )
        columns = slice(self.head * head_dim, (self.head + 1) * head_dim)
        # The head's slice is a [batch, length, head_dim] stream: Patch places values in it by row and
        # position exactly as it places residuals.
        replaced = Patch(self.layer, self.value, self.position, rows=self.rows).apply(
            heads_input[..., columns]
        )
        patched = heads_input.clone()
        patched[..., columns] = replaced
        return patched


@contextmanager
def patch_heads(handle: ModelHandle, patches: Sequence[HeadPatch]) -> Iterator[None]:
    """Apply the head patches to every forward pass inside the block.

    A patched head changes its projection's output, and so every later computation of its
    position; earlier positions are untouched (attention is causal).
    """
    if not patches:  # every decode step passes its head patches, mostly none: no layout needed
        yield
        return
    layout = head_layout(handle)
    by_layer: dict[int, list[HeadPatch]] = {}
    for patch in patches:
        by_layer.setdefault(_layer_index(handle, patch.layer), []).append(patch)
    hooks = []
    for layer, layer_patches in by_layer.items():

        def hook(
            _module: Any,
            args: tuple[Any, ...],
            kwargs: dict[str, Any],
            layer: int = layer,
            layer_patches: list[HeadPatch] = layer_patches,
        ) -> tuple[tuple[Any, ...], dict[str, Any]]:
            heads_input = _heads_input(handle, layer, layout, args, kwargs)
            for patch in layer_patches:
                heads_input = patch.apply(heads_input, layout.head_dims[layer])
            return _with_heads_input(args, kwargs, heads_input)

        projection = attention_output(handle, layer)
        hooks.append(projection.register_forward_pre_hook(hook, with_kwargs=True))
    try:
        yield
    finally:
        for registered in hooks:
            registered.remove()


@torch.no_grad()
def head_contribution(handle: ModelHandle, layer: int, head: int, value: torch.Tensor) -> torch.Tensor:
    """What head `head` of `layer` adds to its projection's output when its output is `value`:
    [hidden] for a [head_dim] value ([n, hidden] for [n, head_dim]), float32 on the CPU.

    The projection of a vector that is zero but for that head, minus the projection of zero, so a
    bias (GPT-2, Persimmon) is not counted as any head's. Computed by the projection itself, in its
    own dtype and device, so it holds for nn.Linear, GPT-2's Conv1D and quantized layers alike.
    This is the head's share of the attention block's output; where a norm (Gemma 2-4's
    post_attention_layernorm) or a gate (Mllama's cross-attention) follows, the residual stream
    receives that block output normalised or scaled, which is not a sum over heads.
    """
    index = _layer_index(handle, layer)
    projection = attention_output(handle, index)
    layout = head_layout(handle)
    head_dim = layout.head_dims[index]
    if not 0 <= head < layout.heads:
        raise IndexError(f"head {head} out of range for layer {layer}'s {layout.heads} heads")
    if value.shape[-1] != head_dim:
        raise HeadShapeError(
            f"a head value of {value.shape[-1]} values does not fit layer {layer}, "
            f"whose heads have {head_dim}"
        )
    device = execution_device(projection) or handle.device
    dtype = compute_dtype(projection) or handle.dtype
    values = value.reshape(-1, head_dim)
    # One extra all-zero row: the projection of zero, subtracted from each value's row.
    projected = torch.zeros(len(values) + 1, layout.heads * head_dim, device=device, dtype=dtype)
    projected[:-1, head * head_dim : (head + 1) * head_dim] = values.to(device=device, dtype=dtype)
    output = to_cpu_float32(projection(projected))
    contribution = output[:-1] - output[-1]
    return contribution.reshape(*value.shape[:-1], contribution.shape[-1])


def _layer_index(handle: ModelHandle, layer: int) -> int:
    if not -handle.num_layers <= layer < handle.num_layers:
        raise IndexError(f"layer {layer} out of range for a model with {handle.num_layers} layers")
    return layer % handle.num_layers


def _input_width(handle: ModelHandle, layer: int, projection: torch.nn.Module) -> int:
    # nn.Linear (and its quantized subclasses) say `in_features`; GPT-2's Conv1D says `nx`.
    for name in ("in_features", "nx"):
        width = getattr(projection, name, None)
        if isinstance(width, int):
            return width
    raise HeadShapeError(
        f"{handle.architecture.family}: layer {layer}'s attention output projection "
        f"({type(projection).__name__}) has neither in_features nor nx: its input width is unknown"
    )


def _heads_input(
    handle: ModelHandle, layer: int, layout: HeadLayout, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> torch.Tensor:
    """The projection's input from a pre-hook's arguments, checked to be [batch, seq, heads * head_dim]."""
    heads_input = args[0] if args else next(iter(kwargs.values()))
    width = layout.heads * layout.head_dims[layer]
    if not isinstance(heads_input, torch.Tensor) or heads_input.dim() != 3 or heads_input.shape[-1] != width:
        shape = tuple(heads_input.shape) if isinstance(heads_input, torch.Tensor) else type(heads_input)
        raise HeadShapeError(
            f"{handle.architecture.family}: layer {layer}'s attention output projection was given {shape}, "
            f"not [batch, seq, {width}] ({layout.heads} heads of {layout.head_dims[layer]})"
        )
    return heads_input


def _with_heads_input(
    args: tuple[Any, ...], kwargs: dict[str, Any], heads_input: torch.Tensor
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    if args:
        return (heads_input, *args[1:]), kwargs
    name = next(iter(kwargs))
    return args, {**kwargs, name: heads_input}
