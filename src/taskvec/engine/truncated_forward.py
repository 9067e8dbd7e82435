"""Forward passes that stop after the last decoder layer.

The engine reads residuals and computes logits itself (final norm + unembedding of the rows it
needs), so it skips the model's own unembedding: with a 262k-word vocabulary that matrix is the
largest single read of a forward pass on a CPU.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.cache_utils import Cache

from taskvec.engine.layer_outputs import hidden_from_output
from taskvec.models.handle import ModelHandle


class StopForward(Exception):
    """Raised from a hook once everything wanted from a forward pass has been read."""


def run_to_last_layer(handle: ModelHandle, inputs: dict[str, Any]) -> tuple[torch.Tensor, Cache | None]:
    """The last decoder layer's output at the last position, [batch, hidden], and the KV cache.

    The cache is taken from the decoder layers' own arguments, so each family keeps the cache type
    its forward creates (sliding-window layers, hybrid caches).
    """
    captured: dict[str, Any] = {}

    def grab_cache(_module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        for value in (*args, *kwargs.values()):
            if isinstance(value, Cache):
                captured["cache"] = value

    def grab_output(_module: Any, _args: Any, output: Any) -> None:
        captured["hidden"] = hidden_from_output(output)[:, -1]
        raise StopForward

    last_layer = handle.layers[-1]
    hooks = [
        last_layer.register_forward_pre_hook(grab_cache, with_kwargs=True),
        last_layer.register_forward_hook(grab_output),
    ]
    try:
        handle.model(**inputs)
    except StopForward:
        pass
    finally:
        for hook in hooks:
            hook.remove()
    return captured["hidden"], captured.get("cache")
