"""Record the residual stream (decoder-layer outputs) at chosen positions, all layers, one pass."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from taskvec.engine.devices import to_cpu_float32
from taskvec.engine.layer_outputs import hidden_from_output
from taskvec.engine.patching import Patch, patch_at
from taskvec.engine.positions import per_row_positions
from taskvec.engine.truncated_forward import StopForward
from taskvec.models.handle import ModelHandle


@torch.no_grad()
def record_residuals(
    handle: ModelHandle,
    inputs: dict[str, Any],
    positions: int | Sequence[int] | torch.Tensor = -1,
    layers: Sequence[int] | None = None,
    patches: Sequence[Patch] = (),
) -> torch.Tensor:
    """Residuals after each decoder layer: [batch, len(layers), n_positions, hidden], float32, CPU.

    `positions` is one index for all rows, a list for all rows, or a [batch, n] tensor of per-row
    indices (negative counts from the end). Layers above the highest requested one are not run.
    A layer the model's forward skips (Mllama's cross-attention layers on a prompt without images)
    leaves the residual stream as it was: its residual is that of the closest layer below it.
    """
    wanted = list(range(handle.num_layers)) if layers is None else [i % handle.num_layers for i in layers]
    batch = inputs["input_ids"].shape[0]
    per_row = per_row_positions(positions, batch)
    recorded: dict[int, torch.Tensor] = {}
    top = max(wanted)

    def make_hook(layer_index: int) -> Any:
        def hook(_module: Any, _args: Any, output: Any) -> None:
            hidden = hidden_from_output(output)
            length = hidden.shape[1]
            absolute = torch.where(per_row < 0, per_row + length, per_row).to(hidden.device)
            rows = torch.arange(batch, device=hidden.device).unsqueeze(1)
            # Kept on the layer's device until the pass ends: a copy to the CPU here would make
            # every layer wait for the accelerator to catch up.
            recorded[layer_index] = hidden[rows, absolute].detach()
            if layer_index == top:
                raise StopForward  # layers above are not needed

        return hook

    # Patch hooks are registered first so that a patched layer records its patched output.
    with patch_at(handle, patches):
        hooks = [handle.layers[i].register_forward_hook(make_hook(i)) for i in range(top + 1)]
        try:
            handle.model(**inputs, use_cache=False)
        except StopForward:
            pass
        finally:
            for registered in hooks:
                registered.remove()
    # With a device map the layers' outputs sit on different devices: each is copied on its own.
    return torch.stack([to_cpu_float32(_residual_after(recorded, i)) for i in wanted], dim=1)


def _residual_after(recorded: dict[int, torch.Tensor], layer: int) -> torch.Tensor:
    ran = [index for index in recorded if index <= layer]
    if not ran:
        raise ValueError(f"the forward pass ran none of decoder layers 0..{layer}: no residual to record")
    return recorded[max(ran)]
