"""Bad input refused in one line before any work: fp16 on a Gemma text model inside any wrapper,
decompression bombs, task names that would leave the run directory, bad counts and layers, and
task files that are nested too deeply, too wide, BOM-prefixed or not UTF-8."""

from __future__ import annotations

import json
import math
import re
import struct
import zlib
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers
from conftest import random_image
from PIL import ImageFile
from run_fixtures import PAIRS, write_task_file
from test_bad_files import model_dir as model_dir  # a fixture, taken by name
from test_bad_files import one_line_error, write_vector
from tiny_models import _clip_vision, _gemma3_text, _init, _llava_processor

from taskvec.cli import build_parser, main
from taskvec.models import load_model
from taskvec.models import loading as model_loading
from taskvec.models.architectures import architecture_for_class
from taskvec.models.handle import ModelHandle
from taskvec.models.loading import NamedModel, check_dtype, text_model_type
from taskvec.prompts import build_query_prompt
from taskvec.prompts.settings import PromptSettings
from taskvec.tasks import Item, Task, TaskFileError, load_task
from taskvec.tasks.images import MAX_IMAGE_SIDE, ImageTooLargeError, open_image

# ------------------------------------------------------------------------------------------ fp16


@pytest.fixture(scope="module")
def llava_on_gemma3(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A LLaVA whose text model is a Gemma 3, as the default VLM is: the outer family is not Gemma."""
    processor = _llava_processor()
    tokenizer = processor.tokenizer
    layer_types = ["sliding_attention", "sliding_attention", "full_attention"]
    config = transformers.LlavaConfig(
        text_config=_gemma3_text(3, len(tokenizer), layer_types),
        vision_config=_clip_vision(),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        image_seq_length=16,
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
    )
    model = _init(transformers.LlavaForConditionalGeneration, config, 0, tokenizer)
    directory = tmp_path_factory.mktemp("models") / "llava-gemma3"
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    return directory


def test_fp16_is_refused_for_a_llava_around_gemma3_before_anything_loads(
    llava_on_gemma3: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def must_not_load(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the processor loaded before the dtype was refused")

    with monkeypatch.context() as patched:
        patched.setattr(model_loading, "_load_processor", must_not_load)
        for dtype in ("fp16", "float16"):
            with pytest.raises(
                ValueError,
                match=r"^llava-gemma3: its text model gemma3_text overflows in fp16 .* bf16 or fp32$",
            ):
                load_model(llava_on_gemma3, dtype=dtype)
    assert load_model(llava_on_gemma3, dtype="bf16").dtype == torch.bfloat16


def test_patch_with_fp16_on_a_llava_around_gemma3_is_one_line(
    llava_on_gemma3: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    vector = write_vector(tmp_path / "vec.safetensors")
    argv = ["patch", "--model", str(llava_on_gemma3), "--vector", str(vector), "--layer", "1", "--text", "x"]
    assert main([*argv, "--dtype", "fp16"]) == 2
    assert one_line_error(capsys) == (
        "taskvec: error: llava-gemma3: its text model gemma3_text overflows in fp16 (its activations "
        "exceed 65504, so answers come out empty); use --dtype bf16 or fp32"
    )
    assert main([*argv, "--dtype", "fp32", "--json"]) == 0
    assert "patched" in json.loads(capsys.readouterr().out)


# Wrappers whose family does not overflow by itself (the table refuses PaliGemma as a family, as
# PaliGemma 2 is built on Gemma 2): only their text model can tell.
WRAPPERS = [
    "LlavaForConditionalGeneration",
    "LlavaOnevisionForConditionalGeneration",
    "Idefics3ForConditionalGeneration",
]


@pytest.mark.parametrize("wrapper", WRAPPERS)
@pytest.mark.parametrize("text_model", ["gemma2", "gemma3_text", "gemma4_text"])
def test_fp16_is_refused_for_any_wrapper_around_an_overflowing_text_model(
    wrapper: str, text_model: str
) -> None:
    config = {"model_type": "wrapper", "text_config": {"model_type": text_model}}
    architecture = architecture_for_class(wrapper)
    with pytest.raises(ValueError, match=f"^model: .*{text_model} overflows in fp16"):
        check_dtype("model", architecture, text_model_type(config), "fp16")
    for dtype in ("bf16", "fp32"):
        check_dtype("model", architecture, text_model_type(config), dtype)


def test_fp16_stays_allowed_where_nothing_overflows() -> None:
    llava = architecture_for_class("LlavaForConditionalGeneration")
    configs: list[dict[str, Any]] = [
        {"text_config": {"model_type": "llama"}},
        {"text_config": {}},  # transformers reads a text config without model_type as a Llama
        {"model_type": "llama"},
    ]
    for config in configs:
        check_dtype("model", llava, text_model_type(config), "fp16")
    # Without a text_config, the config's own model_type is the text model's (a causal LM's).
    with pytest.raises(ValueError, match="gemma2 overflows in fp16"):
        check_dtype("model", llava, text_model_type({"model_type": "gemma2"}), "fp16")


def test_a_named_model_on_gemma3_is_refused_in_fp16(
    llava_on_gemma3: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def load(options: Any) -> ModelHandle:
        model = transformers.LlavaForConditionalGeneration.from_pretrained(llava_on_gemma3)
        return ModelHandle.wrap(model, transformers.AutoProcessor.from_pretrained(llava_on_gemma3), name="x")

    named = (*model_loading.NAMED_MODELS, NamedModel(("tiny-named-vlm",), load))
    monkeypatch.setattr(model_loading, "NAMED_MODELS", named)
    with pytest.raises(ValueError, match=r"^tiny-named-vlm: its text model gemma3_text overflows in fp16"):
        load_model("tiny-named-vlm", dtype="fp16")


@pytest.mark.slow
def test_the_default_vlm_is_refused_in_fp16_before_its_weights_load(monkeypatch: pytest.MonkeyPatch) -> None:
    from taskvec.vlm import recipe

    def must_not_load(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the default VLM's weights loaded before fp16 was refused")

    monkeypatch.setattr(recipe, "load_vlm_from_parts", must_not_load)
    with pytest.raises(ValueError, match=r"^default-vlm: its text model gemma3_text overflows in fp16"):
        load_model("default-vlm", dtype="fp16")


# ---------------------------------------------------------------------------- decompression bombs


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def write_black_png(path: Path, width: int, height: int) -> Path:
    """A valid RGB PNG of black pixels, written without holding its pixels: the zlib stream repeats
    one fully flushed segment (each restarts the compressor, so any number of them decode in a row)
    and ends with the checksum of all zeros. 12000 x 12000 is a 420 KB file of 432 MB of pixels."""
    row_bytes = 1 + 3 * width  # a filter byte, then the pixels
    rows_per_segment = math.gcd(height, 100)
    compressor = zlib.compressobj(9)
    block = bytes(row_bytes * rows_per_segment)
    first = compressor.compress(block) + compressor.flush(zlib.Z_FULL_FLUSH)
    segment = compressor.compress(block) + compressor.flush(zlib.Z_FULL_FLUSH)
    assert first.endswith(segment)
    ending = compressor.flush(zlib.Z_FINISH)[:-4]  # without the checksum of two segments
    total = row_bytes * height
    checksum = struct.pack(">I", ((total % 65521) << 16) | 1)  # adler32 of `total` zero bytes
    stream = first + segment * (height // rows_per_segment - 1) + ending + checksum
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", stream) + _chunk(b"IEND", b"")
    )
    return path


def test_the_black_png_is_a_real_image(tmp_path: Path) -> None:
    path = write_black_png(tmp_path / "small.png", 40, 300)
    with open_image(path) as image:
        pixels = image.convert("RGB")
    assert pixels.size == (40, 300) and pixels.getextrema() == ((0, 0), (0, 0), (0, 0))


@pytest.fixture
def never_decoded(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if any image's pixels are decoded."""

    def load(self: Any) -> Any:
        raise AssertionError(f"decoded an image of {self.size}")

    monkeypatch.setattr(ImageFile.ImageFile, "load", load)


def bomb_task(directory: Path, side: int) -> tuple[Path, Path]:
    image = write_black_png(directory / "bomb.png", side, side)
    lines = [json.dumps({"input": f"item{i}", "output": "x", "image": "bomb.png"}) for i in range(3)]
    task = directory / "bombs.jsonl"
    task.write_text("\n".join(lines))
    return task, image


# 12000: inside PIL's own limit, where it only warns; 20000: past it, where PIL raises its own error.
@pytest.mark.parametrize("side", [12000, 20000])
def test_a_decompression_bomb_in_a_task_file_is_refused_before_decoding(
    side: int, tmp_path: Path, never_decoded: None, capsys: pytest.CaptureFixture[str]
) -> None:
    task, image = bomb_task(tmp_path, side)
    assert image.stat().st_size < 1_500_000
    expected = f"{image}: image of {side} x {side} pixels, over taskvec's limit of 16,777,216 pixels"
    with pytest.raises(TaskFileError, match=re.escape(f"{task}: line 1 (input 'item0'): {expected}")):
        load_task(task)
    # The task loads before the model: no model is needed to refuse it.
    assert main(["extract", "--model", str(tmp_path / "no-model"), "--task", str(task), "--out", "v"]) == 2
    line = one_line_error(capsys)
    assert line.startswith(f"taskvec: error: {task}: line 1") and f"{side} x {side} pixels" in line


def test_patch_refuses_a_decompression_bomb_given_as_image(
    tmp_path: Path, never_decoded: None, capsys: pytest.CaptureFixture[str]
) -> None:
    image = write_black_png(tmp_path / "bomb.png", 12000, 12000)
    vector = write_vector(tmp_path / "vec.safetensors")
    argv = ["patch", "--model", str(tmp_path / "no-model"), "--vector", str(vector), "--layer", "1"]
    assert main([*argv, "--image", str(image)]) == 2
    assert one_line_error(capsys) == (
        f"taskvec: error: {image}: image of 12000 x 12000 pixels, over taskvec's limit of 16,777,216 "
        "pixels (4096 x 4096); shrink it first"
    )


def test_prompts_refuse_a_bomb_that_replaced_a_checked_image(tmp_path: Path, never_decoded: None) -> None:
    path = tmp_path / "flag.png"
    random_image(0).save(path)
    item = Item("France", "Paris", images={"image": path})
    write_black_png(path, 12000, 12000)
    with pytest.raises(ImageTooLargeError, match="12000 x 12000 pixels"):
        build_query_prompt(item, modality="image")


def test_the_report_shows_no_thumbnail_of_a_bomb(tmp_path: Path, never_decoded: None) -> None:
    from taskvec.report.html import thumbnail_uri

    assert thumbnail_uri(write_black_png(tmp_path / "bomb.png", 12000, 12000)) is None


def test_the_pixel_limit_is_exact(tmp_path: Path, never_decoded: None) -> None:
    with open_image(write_black_png(tmp_path / "largest.png", MAX_IMAGE_SIDE, MAX_IMAGE_SIDE)) as image:
        assert image.size == (MAX_IMAGE_SIDE, MAX_IMAGE_SIDE)
    wider = write_black_png(tmp_path / "wider.png", MAX_IMAGE_SIDE + 1, MAX_IMAGE_SIDE)
    with pytest.raises(ImageTooLargeError, match="4097 x 4096 pixels"), open_image(wider):
        pass


# --------------------------------------------------------------------------- task names and paths

UNSAFE_NAMES = [
    "../../../escaped",
    "/tmp/absolute-task",
    "a/b",
    "back\\slash",
    "..",
    ".",
    "nul\x00byte",
    "line\nbreak",
    "lone\ud800surrogate",
    "x" * 256,
]


@pytest.mark.parametrize(
    "name",
    UNSAFE_NAMES,
    ids=["dotdot", "absolute", "slash", "backslash", "parent", "self", "nul", "newline", "surrogate", "long"],
)
def test_a_task_name_that_is_not_a_folder_name_is_refused(name: str, tmp_path: Path) -> None:
    task = tmp_path / "task.json"
    task.write_text(json.dumps({"name": name, "answers": dict(PAIRS)}))
    with pytest.raises(TaskFileError, match=re.escape(f"{task}: task name {name!r} ")):
        load_task(task)
    items = (Item("France", "Paris"),)
    with pytest.raises(ValueError, match=re.escape(f"task name {name!r} ")):
        Task(name, "", items, {"test": (0,)})


def test_names_with_spaces_and_punctuation_load(tmp_path: Path) -> None:
    task = tmp_path / "task.json"
    task.write_text(json.dumps({"name": "country capital (v2), 2024", "answers": dict(PAIRS)}))
    assert load_task(task).name == "country capital (v2), 2024"
    with pytest.raises(ValueError, match="task name '' is empty"):
        Task("", "", (Item("France", "Paris"),))


def files_outside(root: Path, out: Path) -> set[Path]:
    """The files under `root` but not under `out`."""
    return {path for path in root.rglob("*") if path.is_file() and out not in path.parents}


@pytest.mark.parametrize("name", ["../../../escaped", "ABSOLUTE"])
def test_run_refuses_a_task_name_outside_the_run_directory_and_writes_nothing(
    name: str, model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    work = tmp_path / "work"
    work.mkdir()
    if name == "ABSOLUTE":
        name = str(tmp_path / "elsewhere")
    task = work / "task.json"
    task.write_text(json.dumps({"name": name, "answers": dict(PAIRS)}))
    out = work / "deep" / "out"
    before = files_outside(tmp_path, out)
    argv = ["run", "--model", str(model_dir), "--llm", "none", "--tasks", str(task), "--out", str(out)]
    quick = ["--seeds", "1", "--shots", "2", "--ensemble-examples", "0", "2", "--val-limit", "4"]
    assert (
        main([*argv, *quick, "--test-limit", "3", "--no-function-vectors", "--no-analyses", "--quiet"]) == 2
    )
    assert one_line_error(capsys).startswith(
        f"taskvec: error: {task}: task name {name!r} contains a path separator"
    )
    assert files_outside(tmp_path, out) == before
    assert not any(out.rglob("*.safetensors")) and not (out / "cache").exists()


# ----------------------------------------------------------------------------- counts and layers

ARGPARSE_REFUSALS = [
    (["demo", "--limit", "-3"], "argument --limit: expected an integer of at least 1, got '-3'"),
    (
        ["sweep", "--vector", "v", "--task", "t", "--limit", "0"],
        "argument --limit: expected an integer of at least 1, got '0'",
    ),
    (
        ["extract", "--task", "t", "--out", "v", "--limit", "-1"],
        "argument --limit: expected an integer of at least 1",
    ),
    (["demo", "--shots", "0"], "argument --shots: expected an integer of at least 1, got '0'"),
    (
        ["extract", "--task", "t", "--out", "v", "--shots", "-2"],
        "argument --shots: expected an integer of at least 1, got '-2'",
    ),
    (["lens", "--task", "t", "--shots", "0"], "argument --shots: expected an integer of at least 1"),
    (["heads", "--task", "t", "--shots", "0"], "argument --shots: expected an integer of at least 1"),
    (["heads", "--task", "t", "--heads", "0"], "argument --heads: expected an integer of at least 1"),
    (
        ["heads", "--task", "t", "--mean-prompts", "0"],
        "argument --mean-prompts: expected an integer of at least 1",
    ),
    (
        ["heads", "--task", "t", "--effect-prompts", "-1"],
        "argument --effect-prompts: expected an integer of at least 1",
    ),
    (["lens", "--task", "t", "--prompts", "0"], "argument --prompts: expected an integer of at least 1"),
    (["demo", "--max-new-tokens", "0"], "argument --max-new-tokens: expected an integer of at least 1"),
    (
        ["patch", "--vector", "v", "--layer", "1", "--text", "x", "--max-new-tokens", "0"],
        "argument --max-new-tokens: expected an integer of at least 1",
    ),
    (["run", "--threads", "0"], "argument --threads: expected an integer of at least 1, got '0'"),
    (["run", "--workers", "0"], "argument --workers: expected an integer of at least 1"),
    (["train-vlm", "--threads", "-1"], "argument --threads: expected an integer of at least 1"),
    (
        ["demo", "--image-width", "-224"],
        "argument --image-width: expected an integer of at least 0, got '-224'",
    ),
    (["demo", "--shots", "two"], "argument --shots: expected an integer, got 'two'"),
]


@pytest.mark.parametrize(
    ("argv", "message"), ARGPARSE_REFUSALS, ids=[" ".join(argv) for argv, _ in ARGPARSE_REFUSALS]
)
def test_counts_out_of_range_name_their_option(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(argv)
    assert exit_info.value.code == 2
    last_line = capsys.readouterr().err.splitlines()[-1]
    assert last_line.startswith(f"taskvec {argv[0]}: error: ") and message in last_line


def test_the_library_refuses_counts_the_command_line_cannot_give(model_dir: Path) -> None:
    from taskvec.experiments.demo import run_demo
    from taskvec.vectors import extract_vector

    handle = load_model(model_dir)
    task = load_task("country-capital")
    with pytest.raises(ValueError, match="shots must be at least 1, got 0"):
        extract_vector(handle, task, "text-icl", settings=PromptSettings(shots=0))
    with pytest.raises(ValueError, match="limit must be at least 1 query"):
        extract_vector(handle, task, "text-icl", limit=-3)
    with pytest.raises(ValueError, match="limit must be at least 1 test item"):
        run_demo(handle, task, limit=-3, progress=False)


def test_run_refuses_a_layer_out_of_range_before_any_step(
    model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    task = write_task_file(tmp_path / "data")
    out = tmp_path / "out"
    argv = ["run", "--model", str(model_dir), "--llm", "none", "--tasks", str(task), "--out", str(out)]
    quick = ["--seeds", "1", "--shots", "2", "--ensemble-examples", "0", "2", "--no-function-vectors"]
    status = main([*argv, *quick, "--no-analyses", "--quiet", "--layer", "999"])
    # No step ran: nothing cached, no vector extracted, no results.
    assert [part for part in ("cache", "vectors", "results.json") if (out / part).exists()] == []
    assert status == 2
    assert one_line_error(capsys) == (
        "taskvec: error: layer 999 (--layer) is out of range for a model of 3 layers (0 to 2, or -3 to -1)"
    )


# ------------------------------------------------------------------------------- task file formats


def test_deeply_nested_json_names_the_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    nested = tmp_path / "nested.json"
    nested.write_text("[" * 100_000 + "]" * 100_000)
    lines = tmp_path / "nested.jsonl"
    lines.write_text(json.dumps({"input": "a", "output": "b"}) + "\n" + '{"input": ' + "[" * 100_000 + "\n")
    with pytest.raises(TaskFileError, match=f"^{re.escape(str(nested))}: JSON nested too deeply to read$"):
        load_task(nested)
    with pytest.raises(TaskFileError, match=f"^{re.escape(str(lines))}: line 2: JSON nested too deeply"):
        load_task(lines)
    assert main(["extract", "--model", str(tmp_path / "no-model"), "--task", str(nested), "--out", "v"]) == 2
    assert one_line_error(capsys) == f"taskvec: error: {nested}: JSON nested too deeply to read"


def test_a_csv_field_over_csv_s_limit_names_the_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "wide.csv"
    path.write_text("input,output\nFrance,Paris\n" + "x" * 200_000 + ",y\n")
    expected = f"{path}: line 3: unreadable CSV (field larger than field limit (131072))"
    with pytest.raises(TaskFileError, match=f"^{re.escape(expected)}$"):
        load_task(path)


def test_a_csv_with_a_byte_order_mark_loads(tmp_path: Path) -> None:
    rows = "input,output\r\n" + "".join(f"{country},{capital}\r\n" for country, capital in PAIRS)
    path = tmp_path / "excel.csv"
    path.write_bytes(b"\xef\xbb\xbf" + rows.encode("utf-8"))
    task = load_task(path)
    assert [(item.input, item.output) for item in task.items] == PAIRS
    as_json = tmp_path / "capitals.json"
    as_json.write_bytes(b"\xef\xbb\xbf" + json.dumps(dict(PAIRS)).encode("utf-8"))
    assert len(load_task(as_json)) == len(PAIRS)


@pytest.mark.parametrize(
    ("name", "content"),
    [
        ("latin.csv", "input,output\nS\xe3o Tom\xe9,x\n"),
        ("latin.jsonl", '{"input": "S\xe3o Tom\xe9", "output": "x"}\n'),
        ("latin.json", '{"S\xe3o Tom\xe9": "x"}'),
    ],
)
def test_a_file_that_is_not_utf8_is_named(name: str, content: str, tmp_path: Path) -> None:
    path = tmp_path / name
    path.write_bytes(content.encode("latin-1"))
    expected = f"{path}: not UTF-8 text (invalid continuation byte at byte "
    with pytest.raises(TaskFileError, match=f"^{re.escape(expected)}\\d+\\); save it as UTF-8$"):
        load_task(path)
