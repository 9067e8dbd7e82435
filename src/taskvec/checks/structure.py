"""Invariants of what the engine reads and where: the decode step's position ids, attention heads, the
attention-output norm, the answer marker's column, and the sweep's memory budget."""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator
from typing import Any

import torch

from taskvec.checks.measure import Measurement, full_forward, relative_error
from taskvec.checks.prompts import CheckPrompts, NotApplicable, PromptSource
from taskvec.engine import (
    attention_output,
    attention_output_norm,
    head_contribution,
    record_heads,
    sweep_layers,
)
from taskvec.engine.decode_positions import prompt_position_ids
from taskvec.engine.positions import token_pieces
from taskvec.engine.shared_prefix import RowPatch, one_pass_reason_against, patched_logits
from taskvec.engine.sweep_memory import (
    DEFAULT_CPU_BUDGET,
    cache_bytes,
    cache_bytes_by_device,
    chunk_size,
    default_budget,
)
from taskvec.engine.token_inputs import token_columns
from taskvec.models import ModelHandle
from taskvec.models.handle import resolve_attribute
from taskvec.prompts import CHAT_TEMPLATE, DEFAULT_TEMPLATE, has_chat_template, query_marker_columns
from taskvec.prompts.chat import user_turn_frame

# ------------------------------------------------------------------------------ decode positions


def position_encoders(text_model: torch.nn.Module) -> list[torch.nn.Module]:
    """The modules that turn position ids into the text model's position encoding: rotary embedding
    modules, else (learned absolute positions, GPT-2's `wpe`) embedding tables other than the
    token embedding."""
    rotary = [module for module in text_model.modules() if type(module).__name__.endswith("RotaryEmbedding")]
    if rotary:
        return rotary
    tokens = text_model.get_input_embeddings()  # type: ignore[operator]
    return [
        module
        for module in text_model.modules()
        if isinstance(module, torch.nn.Embedding) and module is not tokens
    ]


@contextlib.contextmanager
def recorded_position_ids(handle: ModelHandle) -> Iterator[list[torch.Tensor]]:
    """Every tensor of position ids the text model's position encoding receives, in call order."""
    path = handle.architecture.text_model_path
    if path is None:
        raise NotApplicable(f"{handle.architecture.family} names no text model (text_model_path)")
    encoders = position_encoders(resolve_attribute(handle.model, path))
    if not encoders:
        raise NotApplicable("no position encoding module in the text model")
    calls: list[torch.Tensor] = []

    def record(module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        bound = inspect.signature(module.forward).bind(*args, **kwargs).arguments
        ids = bound["position_ids"] if "position_ids" in bound else bound["input"]
        calls.append(ids.detach().cpu().clone())

    hooks = [encoder.register_forward_pre_hook(record, with_kwargs=True) for encoder in encoders]
    try:
        yield calls
    finally:
        for hook in hooks:
            hook.remove()


@torch.no_grad()
def decode_positions_equal_full_forward(prompts: PromptSource, modality: str) -> Measurement:
    """The one-pass sweep's decode step numbers its token as a full forward numbers the prompt's last
    token: the ids each position encoding receives, compared exactly (deviation: the largest
    difference of any id)."""
    handle = prompts.handle
    reason = one_pass_reason_against(handle)
    if reason is not None:
        raise NotApplicable(f"no decode step: {handle.architecture.family} {reason}")
    inputs = prompts.query(modality)
    vectors = prompts.source_vectors
    layers = [0, handle.num_layers - 1]
    with recorded_position_ids(handle) as sweep_calls:
        sweep_layers(handle, inputs, vectors, layers=layers, method="one_pass")
    with recorded_position_ids(handle) as full_calls:
        full_forward(handle, inputs)
    per_forward = len(full_calls)
    decode_calls = sweep_calls[per_forward:]
    if not decode_calls or len(decode_calls) % per_forward:
        return Measurement(
            float("inf"),
            broken=f"{len(sweep_calls)} position encodings in the sweep for {per_forward} per forward",
        )
    deviation = 0
    for step in range(0, len(decode_calls), per_forward):
        for full, decode in zip(full_calls, decode_calls[step : step + per_forward], strict=True):
            expected = full[..., -1:]
            if decode.shape[:-2] != expected.shape[:-2] or decode.shape[-1] != 1:
                return Measurement(
                    float("inf"),
                    broken=f"decode ids {tuple(decode.shape)}, full forward {tuple(expected.shape)}",
                )
            deviation = max(deviation, int((decode - expected.expand_as(decode)).abs().max()))
    style = handle.architecture.position_style
    last = [int(value) for value in prompt_position_ids(handle, inputs)[..., -1].flatten()]
    return Measurement(float(deviation), f"{style} positions, last token {last}")


# ------------------------------------------------------------------------------ attention heads


@torch.no_grad()
def heads_sum_to_attention_output(prompts: PromptSource, modality: str) -> Measurement:
    """Each layer's recorded heads, re-projected one by one and summed (with the bias), equal the
    attention output projection's output (what function vectors read and add)."""
    handle = prompts.handle
    inputs = prompts.batch(modality)
    heads = record_heads(handle, inputs, -1)
    outputs: dict[int, torch.Tensor] = {}
    hooks = []
    for layer in range(handle.num_layers):

        def hook(_module: Any, _args: Any, output: torch.Tensor, layer: int = layer) -> None:
            outputs[layer] = output[:, -1].detach().float().cpu()

        hooks.append(attention_output(handle, layer).register_forward_hook(hook))
    try:
        full_forward(handle, inputs)
    finally:
        for registered in hooks:
            registered.remove()
    deviations = []
    for layer, recorded in enumerate(heads):
        if layer not in outputs:  # a layer the forward skipped records zeros
            continue
        shares = [
            head_contribution(handle, layer, head, recorded[:, 0, head]) for head in range(recorded.shape[2])
        ]
        total = torch.stack(shares).sum(dim=0)
        bias = getattr(attention_output(handle, layer), "bias", None)
        if isinstance(bias, torch.Tensor):
            total = total + bias.detach().float().cpu()
        deviations.append(relative_error(total, outputs[layer]))
    return Measurement(max(deviations), f"{len(deviations)} layers of {heads[0].shape[2]} heads")


@torch.no_grad()
def attention_norm_receives_the_attention_output(prompts: PromptSource, modality: str) -> Measurement:
    """The norm the table maps heads through (Gemma 2-4's post_attention_layernorm) is the module
    that receives the attention output; a family without one has no norm receiving it."""
    handle = prompts.handle
    inputs = prompts.query(modality)
    projected: dict[int, torch.Tensor] = {}
    received: dict[tuple[int, str], torch.Tensor] = {}
    hooks = []
    for layer, decoder_layer in enumerate(handle.layers):

        def record_projection(_module: Any, _args: Any, output: torch.Tensor, layer: int = layer) -> None:
            projected[layer] = output.detach().float().cpu()

        hooks.append(attention_output(handle, layer).register_forward_hook(record_projection))
        for name, module in decoder_layer.named_children():
            if "norm" not in name.lower():
                continue

            def record_norm(
                _module: Any, args: tuple[Any, ...], layer: int = layer, name: str = name
            ) -> None:
                if args and isinstance(args[0], torch.Tensor):
                    received[(layer, name)] = args[0].detach().float().cpu()

            hooks.append(module.register_forward_pre_hook(record_norm))
    try:
        full_forward(handle, inputs)
    finally:
        for hook in hooks:
            hook.remove()
    deviations, mapped = [0.0], 0
    for layer, output in projected.items():
        norm = attention_output_norm(handle, layer)
        if norm is not None:
            mapped += 1
            names = [name for name, module in handle.layers[layer].named_children() if module is norm]
            if not names or (layer, names[0]) not in received:
                return Measurement(float("inf"), broken=f"layer {layer}'s attention output norm never ran")
            deviations.append(relative_error(received[(layer, names[0])], output))
            continue
        receivers = [
            name
            for (at, name), value in received.items()
            if at == layer and value.shape == output.shape and relative_error(value, output) < 1e-3
        ]
        if receivers:
            return Measurement(
                float("inf"),
                broken=f"layer {layer}'s {receivers[0]} normalises the attention output; the table maps none",
            )
    what = (
        f"{mapped} layers map heads through their norm" if mapped else "no attention-output norm, none found"
    )
    return Measurement(max(deviations), what)


# ------------------------------------------------------------------------------ answer marker


def _visible(text: str) -> str:
    """The characters that carry text: no whitespace, no control characters."""
    return "".join(character for character in text if character.isprintable() and not character.isspace())


def answer_marker_where_the_template_puts_it(prompts: PromptSource, modality: str) -> Measurement:
    """The query's answer marker is found in every row of a batch, and what follows it is what the
    template puts after it: nothing under qa, the end of the user turn and the assistant header under
    chat. Deviation: the characters that differ."""
    if not isinstance(prompts, CheckPrompts):
        raise NotApplicable("the prompts were given encoded: no template wrote them")
    handle = prompts.handle
    templates = [DEFAULT_TEMPLATE, *([CHAT_TEMPLATE] if has_chat_template(handle) else [])]
    checked = []
    tokenizer = handle.tokenizer
    for template in templates:
        batch_prompts = CheckPrompts(handle, template)
        batch = batch_prompts.batch(modality)
        columns = query_marker_columns(handle, batch, template.marker)
        expected = ""
        if template.chat:
            _before, after = user_turn_frame(handle)
            expected = _visible(
                tokenizer.decode(
                    tokenizer(after, add_special_tokens=False)["input_ids"], skip_special_tokens=True
                )
            )
        for ids, column in zip(batch["input_ids"], columns, strict=True):
            following = _visible("".join(token_pieces(tokenizer, ids[column + 1 :].tolist())))
            if following != expected:
                return Measurement(
                    float(max(len(following), len(expected))),
                    broken=f"under {template.name}, {following!r} follows the marker, not {expected!r}",
                )
        checked.append(template.name)
    return Measurement(0.0, f"templates {', '.join(checked)}")


# ------------------------------------------------------------------------------ memory


@torch.no_grad()
def sweep_memory_within_budget(prompts: PromptSource, modality: str) -> Measurement:
    """The memory budget a layer sweep of the query picks on this device, and the peak its
    cache copies reach (measured by CUDA's allocator on a GPU, counted from the cache's size on the
    CPU). Deviation: that peak over the budget."""
    handle = prompts.handle
    if one_pass_reason_against(handle) is not None:
        raise NotApplicable("no shared prefix pass: the sweep copies no cache")
    inputs = prompts.query(modality)
    prefix = full_forward_with_cache(handle, token_columns(inputs, slice(None, -1)))
    if prefix is None:
        raise NotApplicable("the model returns no cache from a forward")
    rows = handle.num_layers
    per_row = cache_bytes(prefix)
    chunk = chunk_size(prefix, rows, None)
    devices = {device for device in cache_bytes_by_device(prefix) if device.type == "cuda"}
    if not devices:
        budget = DEFAULT_CPU_BUDGET
        peak = chunk * per_row
        how = "copies counted"
    else:
        budget = min(default_budget(device) for device in devices)
        for device in devices:
            torch.cuda.reset_peak_memory_stats(device)
        before = sum(torch.cuda.memory_allocated(device) for device in devices)
        vectors = prompts.source_vectors
        patched_logits(handle, inputs, [RowPatch(0, layer, vectors[layer]) for layer in range(rows)])
        peak = sum(torch.cuda.max_memory_allocated(device) for device in devices) - before
        how = "peak allocated"
    detail = (
        f"budget {_mib(budget)}, {per_row // 1024} KiB of cache per row, {chunk} of {rows} rows at once, "
        f"{how} {_mib(peak)}"
    )
    return Measurement(peak / budget, detail)


def full_forward_with_cache(handle: ModelHandle, inputs: dict[str, Any]) -> Any:
    """The KV cache of a forward over `inputs` (None when the model returns none)."""
    return getattr(handle.model(**inputs, use_cache=True), "past_key_values", None)


def _mib(value: float) -> str:
    return f"{value / 2**20:.1f} MiB"
