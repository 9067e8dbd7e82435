"""`taskvec check`: every check passes on every tiny family (fp32, bf16), a 4-bit model, a model with
layers offloaded by accelerate and a model loaded by convention; each check fails, naming itself, on
the engine broken on purpose the way it guards against; a run records its checks and stops before any
step when one fails."""

from __future__ import annotations

import contextlib
import dataclasses
import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import tiny_handle
from run_fixtures import tiny_config, write_task_file
from tiny_models import FAMILIES, build_phi3, build_vipllava, save_tiny_checkpoint

from taskvec.checks import (
    EngineCheckFailed,
    EngineChecks,
    checks_before_run,
    format_table,
    invariants,
    run_checks,
    structure,
)
from taskvec.cli import main
from taskvec.engine import shared_prefix
from taskvec.experiments import RunResults, run_experiments
from taskvec.models import ModelHandle
from taskvec.models.convention import ConventionArchitectureWarning
from taskvec.report.checks_section import engine_checks_section


def failing(checks: EngineChecks) -> set[tuple[str, str]]:
    return {(row.check, row.prompts) for row in checks.failures}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("family", FAMILIES)
def test_every_check_passes_on_every_tiny_family(family: str, dtype: torch.dtype) -> None:
    handle = tiny_handle(family, dtype)
    checks = run_checks(handle)
    assert checks.precision == ("fp32" if dtype == torch.float32 else "bf16")
    assert failing(checks) == set(), format_table(checks)
    measured = [row for row in checks.applicable if row.deviation is not None]
    assert measured and all(row.tolerance is not None for row in measured)
    assert {row.check for row in checks.rows} >= {"residuals", "lens", "own-value-patch", "padded-batch"}


# ------------------------------------------------------------------ the engine broken on purpose


class LensWithoutFinalNorm(ModelHandle):
    """A handle whose lens would skip the model's final norm."""

    @property
    def final_norm(self) -> torch.nn.Module:
        return torch.nn.Identity()


def rewrapped(handle: ModelHandle, cls: type[ModelHandle]) -> ModelHandle:
    return cls(handle.model, handle.processor, handle.architecture, handle.name)


@contextmanager
def right_padding(handle: ModelHandle) -> Iterator[ModelHandle]:
    previous = handle.tokenizer.padding_side
    handle.tokenizer.padding_side = "right"
    try:
        yield handle
    finally:
        handle.tokenizer.padding_side = previous


def positions_off_by_one(monkeypatch: pytest.MonkeyPatch) -> None:
    numbered = shared_prefix.prompt_position_ids
    monkeypatch.setattr(shared_prefix, "prompt_position_ids", lambda *args: numbered(*args) + 1)


def patches_one_layer_late(monkeypatch: pytest.MonkeyPatch) -> None:
    patch_at = invariants.patch_at

    def late(handle: ModelHandle, patches: Any, first_call_only: bool = False) -> Any:
        moved = [dataclasses.replace(patch, layer=patch.layer % handle.num_layers + 1) for patch in patches]
        return patch_at(handle, moved, first_call_only)

    monkeypatch.setattr(invariants, "patch_at", late)


@pytest.mark.parametrize("family", ["llama", "qwen2_vl"])
def test_position_ids_off_by_one_fail_the_decode_positions_check(
    family: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    positions_off_by_one(monkeypatch)
    checks = run_checks(tiny_handle(family), only=["decode-positions"])
    assert checks.rows and all(row.status == "fail" and row.deviation == 1 for row in checks.rows)
    assert "engine check decode-positions (text) fails on tiny-" in checks.failures[0].failure_line(
        checks.model
    )


def test_the_wrong_layer_path_fails_the_residuals_check() -> None:
    """The vision tower's encoder layers taken for the language model's decoder layers."""
    shared = tiny_handle("llava")
    wrong = dataclasses.replace(shared.architecture, layers_path="model.vision_tower.encoder.layers")
    checks = run_checks(ModelHandle(shared.model, shared.processor, wrong, "wrong-path"), only=["residuals"])
    assert failing(checks) == {("residuals", "text"), ("residuals", "image")}
    assert all("fails on wrong-path" in row.failure_line(checks.model) for row in checks.failures)


def test_right_padding_fails_the_padded_batch_check() -> None:
    with right_padding(tiny_handle("llava")) as handle:
        checks = run_checks(handle, only=["padded-batch"])
    assert failing(checks) == {("padded-batch", "text"), ("padded-batch", "image")}
    assert all(row.deviation is not None and row.deviation > 0.01 for row in checks.failures)


def test_a_patch_one_layer_late_fails_the_own_value_check(monkeypatch: pytest.MonkeyPatch) -> None:
    patches_one_layer_late(monkeypatch)
    checks = run_checks(tiny_handle("gemma3_text"), only=["own-value-patch"])
    assert failing(checks) == {("own-value-patch", "text")}


def test_patches_that_never_land_fail_the_own_value_check(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(invariants, "patch_at", lambda *_args, **_kwargs: contextlib.nullcontext())
    checks = run_checks(tiny_handle("llama"), only=["own-value-patch"])
    assert failing(checks) == {("own-value-patch", "text")}
    assert checks.failures[0].deviation == 0 and "patches do not land" in checks.failures[0].detail


def test_a_table_missing_the_attention_output_norm_fails_the_attention_norm_check() -> None:
    shared = tiny_handle("gemma2")
    without = dataclasses.replace(shared.architecture, attention_output_norm=None)
    checks = run_checks(
        ModelHandle(shared.model, shared.processor, without, "no-norm"), only=["attention-norm"]
    )
    assert failing(checks) == {("attention-norm", "text")}
    assert "post_attention_layernorm normalises the attention output" in checks.failures[0].detail


def test_a_lens_without_the_final_norm_fails_the_lens_check() -> None:
    checks = run_checks(rewrapped(tiny_handle("gemma2"), LensWithoutFinalNorm), only=["lens", "residuals"])
    assert failing(checks) == {("lens", "text"), ("residuals", "text")}


def test_a_marker_found_one_token_early_fails_the_answer_marker_check(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    found = structure.query_marker_columns
    monkeypatch.setattr(structure, "query_marker_columns", lambda *args: [c - 1 for c in found(*args)])
    checks = run_checks(tiny_handle("llama"), only=["answer-marker"])
    assert failing(checks) == {("answer-marker", "text")}
    assert "':' follows the marker, not ''" in checks.failures[0].detail


def test_a_check_that_raises_fails_with_its_error(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*_: Any, **__: Any) -> Any:
        raise RuntimeError("the sweep could not run")

    monkeypatch.setattr(invariants, "sweep_layers", broken)
    checks = run_checks(tiny_handle("llama"), only=["sweep"])
    assert failing(checks) == {("sweep", "text")}
    assert checks.failures[0].deviation is None and "could not run" in checks.failures[0].detail


# ------------------------------------------------------------------ models as users load them


def test_every_check_passes_on_a_4bit_model(tmp_path: Path) -> None:
    pytest.importorskip("bitsandbytes")
    from test_loading import save_wide_llama

    from taskvec.models import load_model

    handle = load_model(save_wide_llama(tmp_path / "llama"), device="cpu", dtype="bf16", quantization="4bit")
    checks = run_checks(handle)
    assert checks.precision == "4bit"
    assert not checks.failures, format_table(checks)


def test_every_check_passes_on_a_model_with_layers_offloaded(tmp_path: Path) -> None:
    from test_gpu import dispatched_handle, layer_placements

    def placements(handle: ModelHandle) -> dict[str, Any]:
        layers = ["disk" if index == 1 else "cpu" for index in range(handle.num_layers)]
        return layer_placements(handle, layers, norm="disk", unembedding="cpu")

    handle = dispatched_handle("llava", placements, rest="cpu", offload_dir=tmp_path / "offload")
    assert handle.layers[1].self_attn.q_proj.weight.device.type == "meta"
    checks = run_checks(handle)
    assert not checks.failures, format_table(checks)
    assert {row.prompts for row in checks.rows} == {"text", "image"}


@pytest.mark.parametrize("build", [build_vipllava, build_phi3], ids=["vipllava", "phi3"])
def test_every_check_passes_on_a_model_loaded_by_convention(build: Callable[[], Any]) -> None:
    tiny = build()
    with pytest.warns(ConventionArchitectureWarning):
        handle = ModelHandle.wrap(tiny.model, tiny.processor, name="by-convention")
    checks = run_checks(handle)
    assert not checks.failures, format_table(checks)


# ------------------------------------------------------------------ the command and the run


def test_the_command_prints_one_row_per_check_and_json(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    directory = save_tiny_checkpoint("llama", tmp_path / "llama")
    assert main(["check", "--model", str(directory), "--device", "cpu", "--only", "lens", "sweep"]) == 0
    printed = capsys.readouterr().out
    assert "engine checks on this model: 2 of 2 pass" in printed
    assert "deviation" in printed and "tolerance" in printed
    assert main(["check", "--model", str(directory), "--device", "cpu", "--json", "--only", "lens"]) == 0
    document = json.loads(capsys.readouterr().out)
    (checks,) = document["checks"]
    assert checks["precision"] == "fp32"
    assert [(row["check"], row["status"]) for row in checks["rows"]] == [("lens", "pass")]
    assert set(checks["rows"][0]) >= {"what", "deviation", "tolerance", "seconds"}


def test_the_command_exits_non_zero_naming_a_failing_check(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    directory = save_tiny_checkpoint("llama", tmp_path / "llama")
    positions_off_by_one(monkeypatch)
    assert main(["check", "--model", str(directory), "--device", "cpu", "--only", "decode-positions"]) == 1
    error = capsys.readouterr().err
    assert "engine check decode-positions (text) fails on" in error and "deviation 1 > tolerance 0" in error


def test_the_chat_template_on_a_model_without_one_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    directory = save_tiny_checkpoint("llama", tmp_path / "llama")
    assert main(["check", "--model", str(directory), "--device", "cpu", "--template", "chat"]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("taskvec: error: ") and "has no chat template" in error and "\n" not in error


def test_a_run_records_its_checks_and_the_report_shows_them(tmp_path: Path) -> None:
    from taskvec.report import write_report

    handle = tiny_handle("llava")
    config = tiny_config(write_task_file(tmp_path), seeds=(0,), function_vectors=False, ensemble_examples=())
    out = tmp_path / "out"
    run_experiments(handle, config, out, progress=False, check=True)
    results = RunResults.read(out / "results.json")
    (checks,) = results.engine_checks
    assert checks.check_set == "run" and checks.passed and checks.model == handle.name
    assert {row.check for row in checks.rows} == {
        "residuals",
        "own-value-patch",
        "sweep",
        "padded-batch",
        "decode-positions",
        "lens",
        "answer-marker",
    }
    page = write_report(out).read_text(encoding="utf-8")
    assert f"engine checks on this model: {len(checks.rows)} of {len(checks.rows)} pass" in page

    declined = dataclasses.replace(results, engine_checks=checks_before_run([handle], enabled=False))
    assert "not run (--no-check)" in engine_checks_section(declined)


def test_a_failing_check_stops_the_run_before_any_step(tmp_path: Path) -> None:
    config = tiny_config(write_task_file(tmp_path), seeds=(0,), function_vectors=False, ensemble_examples=())
    out = tmp_path / "out"
    with right_padding(tiny_handle("llava")) as handle, pytest.raises(EngineCheckFailed) as raised:
        run_experiments(handle, config, out, progress=False)
    message = str(raised.value)
    assert "\n" not in message
    assert "padded-batch (text)" in message and "tiny-llava" in message and "deviation" in message
    assert not (out / "cache").exists() or not any((out / "cache").iterdir())
    assert not (out / "results.json").exists()


def test_checks_declined_are_recorded_without_measuring() -> None:
    with right_padding(tiny_handle("llava")) as handle:
        (checks,) = checks_before_run([handle], enabled=False)
    assert checks.declined and not checks.rows and not checks.passed
    assert checks.headline() == "engine checks on this model: not run (--no-check)"


def test_prompts_given_encoded_check_a_model_without_a_processor() -> None:
    """bench/gpu.py's way: random-weight models have no tokenizer, so prompts come as token ids."""
    from conftest import random_image
    from tiny_models import build_tiny, make_inputs

    from taskvec.checks.prompts import EncodedPrompts

    tiny = build_tiny("qwen2_vl")
    handle = ModelHandle(tiny.model, None, tiny.architecture, "no-processor")
    texts = [dict(make_inputs(tiny, [text])) for text in ("Q:Spain\nA:", "Q:Italy\nA:Rome\n\nQ:Japan\nA:")]
    image = dict(make_inputs(tiny, ["Q:<image>\nA:"], [[random_image(1)]]))
    checks = run_checks(
        handle, prompts=EncodedPrompts(handle, {"text": texts}, {"text": texts[1], "image": image})
    )
    assert not checks.failures, format_table(checks)
    skipped = {(row.check, row.prompts) for row in checks.rows if row.status == "skip"}
    assert ("answer-marker", "text") in skipped and ("padded-batch", "image") in skipped
    assert {(row.check, row.prompts) for row in checks.applicable} >= {
        ("decode-positions", "image"),
        ("sweep", "image"),
    }


def test_prompts_given_encoded_keep_their_token_types_in_the_batch() -> None:
    """PaliGemma's token_type_ids mark its bidirectional prefix: the batch of prompts given encoded
    carries them, left padded, else it masks otherwise than each prompt alone (5.8e-3 apart)."""
    from taskvec.checks.prompts import EncodedPrompts

    handle = tiny_handle("paligemma")
    texts = [handle.build_inputs([text]) for text in ("Q:Spain\nA:", "Q:Italy\nA:Rome\n\nQ:Japan\nA:")]
    prompts = EncodedPrompts(handle, {"text": texts}, {"text": texts[1]})
    batch = prompts.batch("text")
    assert set(batch) == {"input_ids", "attention_mask", "token_type_ids"}
    assert bool((batch["attention_mask"] == 0).any()), "the prompts should differ in length"
    checks = run_checks(handle, prompts=prompts, only=["padded-batch"])
    assert [row.status for row in checks.rows] == ["pass"], format_table(checks)
