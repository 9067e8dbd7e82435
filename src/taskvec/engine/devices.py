"""Moving tensors to where the engine's modules compute, and results back to the CPU.

Where a module computes is `taskvec.models.devices` (the handle needs it too, for its inputs).
"""

from __future__ import annotations

import torch

from taskvec.models.devices import compute_dtype, execution_device

__all__ = ["compute_dtype", "execution_device", "to_cpu_float32", "to_module_input"]


def to_module_input(
    tensor: torch.Tensor, module: torch.nn.Module, *fallbacks: torch.nn.Module
) -> torch.Tensor:
    """The tensor on the module's execution device and in its compute dtype.

    A module without weights (a parameter-free norm) takes the device and dtype of the first fallback
    module that has them, else keeps the tensor's own.
    """
    candidates = (module, *fallbacks)
    device = next((d for d in map(execution_device, candidates) if d is not None), tensor.device)
    dtype = next((d for d in map(compute_dtype, candidates) if d is not None), tensor.dtype)
    return tensor.to(device=device, dtype=dtype)


def to_cpu_float32(tensor: torch.Tensor) -> torch.Tensor:
    """A float32 CPU copy (or the tensor itself when it already is one): what results are returned as."""
    return tensor.detach().to(device="cpu", dtype=torch.float32)
