"""Where a module computes, and in which dtype, when a model is spread over devices or quantized.

With `device_map` (accelerate's dispatch) each block carries a hook that moves its inputs to the
block's execution device, and blocks offloaded to the CPU or disk keep their weights on the meta
device between calls; code must then ask the hook, not the weights, where a module runs.
Quantized linear layers store integer weights, so a module's compute dtype is that of its
floating-point parameters.
"""

from __future__ import annotations

from typing import Any

import torch


def _hook_execution_device(module: torch.nn.Module) -> torch.device | None:
    hook: Any = getattr(module, "_hf_hook", None)
    # accelerate chains several hooks on one module in a SequentialHook, which lists them in `hooks`.
    for candidate in (hook, *getattr(hook, "hooks", ())):
        device = getattr(candidate, "execution_device", None)
        if device is not None:
            return torch.device(device)
    return None


def execution_device(module: torch.nn.Module) -> torch.device | None:
    """The device the module computes on; None when it has neither weights nor a dispatch hook."""
    hooked = _hook_execution_device(module)
    if hooked is not None:
        return hooked
    for tensor in (*module.parameters(), *module.buffers()):
        if tensor.device.type != "meta":
            return tensor.device
    return None


def compute_dtype(module: torch.nn.Module) -> torch.dtype | None:
    """The dtype of the module's first floating-point parameter (None if it has none)."""
    for parameter in module.parameters():
        if parameter.is_floating_point():
            return parameter.dtype
    return None
