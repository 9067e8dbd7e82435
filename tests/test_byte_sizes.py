"""Byte sizes on the command line (taskvec.byte_sizes) and the `--sweep-memory` option that takes one."""

from __future__ import annotations

import json

import pytest

from taskvec.byte_sizes import format_byte_size, parse_byte_size
from taskvec.cli import build_parser, main
from taskvec.experiments.config import RunConfig
from taskvec.options import options_from_args, to_argv
from taskvec.typed_json import from_json, to_json

GIB = 2**30


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("1073741824", GIB),
        ("0", 0),
        ("8GiB", 8 * GIB),
        ("8gib", 8 * GIB),
        ("8 GiB", 8 * GIB),
        ("8G", 8 * GIB),
        ("2.5G", 5 * GIB // 2),
        (".5K", 512),
        ("500MB", 500 * 10**6),
        ("500mb", 500 * 10**6),
        ("1.5kB", 1500),
        ("3KiB", 3072),
        ("2T", 2 * 2**40),
        ("1TB", 10**12),
        ("512B", 512),
        ("2.", 2),
        # Exact beyond a float's 53 bits (and a default Decimal's 28 digits).
        ("123456789012345678901234567890.5k", 123456789012345678901234567890 * 1024 + 512),
    ],
)
def test_sizes_parse(text: str, size: int) -> None:
    assert parse_byte_size(text) == size


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "expected a size in bytes (e.g. 8GiB"),
        ("lots", "expected a size in bytes"),
        ("-1G", "expected a size in bytes"),
        ("1e9", "expected a size in bytes"),
        ("1..5G", "expected a size in bytes"),
        ("8GiB of it", "expected a size in bytes"),
        ("8XB", "unknown unit 'XB' in '8XB'; use one of B, K, M"),
        ("4Gb/s", "expected a size in bytes"),
        ("1.5", "'1.5' is 1.5 bytes, not a whole number of bytes"),
        ("0.0005kB", "is 0.5 bytes, not a whole number"),
    ],
)
def test_junk_is_refused_with_the_accepted_forms(text: str, message: str) -> None:
    with pytest.raises(ValueError) as error:
        parse_byte_size(text)
    assert message in str(error.value)


@pytest.mark.parametrize(
    ("size", "text"),
    [
        (0, "0"),
        (1, "1"),
        (1000, "1kB"),
        (1024, "1KiB"),
        (8 * GIB, "8GiB"),
        (500 * 10**6, "500MB"),
        (12345, "12345"),
    ],
)
def test_sizes_format_exactly(size: int, text: str) -> None:
    assert format_byte_size(size) == text
    assert parse_byte_size(text) == size


def test_format_refuses_negative_sizes() -> None:
    with pytest.raises(ValueError, match="not negative"):
        format_byte_size(-1)


def test_sweep_memory_is_a_run_option(capsys: pytest.CaptureFixture[str]) -> None:
    args = build_parser().parse_args(["run", "--sweep-memory", "8GiB"])
    assert RunConfig(**options_from_args(RunConfig, args)).sweep_memory == 8 * GIB
    assert RunConfig().sweep_memory is None
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "--sweep-memory BYTES" in help_text
    assert "half the free GPU memory" in help_text


def test_sweep_memory_round_trips_through_argv_and_results_json() -> None:
    config = RunConfig(sweep_memory=3 * GIB + 1)
    argv = to_argv(config)
    assert argv[0] == "--sweep-memory"
    args = build_parser().parse_args(["run", *argv])
    assert RunConfig(**options_from_args(RunConfig, args)) == config
    # results.json stores the config through typed_json; a file written before the option reads as None.
    assert from_json(RunConfig, json.loads(json.dumps(to_json(config)))) == config
    older = {key: value for key, value in to_json(RunConfig()).items() if key != "sweep_memory"}
    assert from_json(RunConfig, older).sweep_memory is None


@pytest.mark.parametrize("command", ["run", "sweep"])
def test_bad_sweep_memory_is_an_argparse_error(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    required = ["--vector", "v.safetensors", "--task", "country-capital"] if command == "sweep" else []
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args([command, *required, "--sweep-memory", "a lot"])
    assert exit_info.value.code == 2
    assert "argument --sweep-memory: expected a size in bytes" in capsys.readouterr().err


def test_zero_sweep_memory_is_refused() -> None:
    with pytest.raises(ValueError, match="sweep_memory must be at least 1 byte"):
        RunConfig(sweep_memory=0)


def test_sweep_command_takes_a_byte_size() -> None:
    args = build_parser().parse_args(["sweep", "--vector", "v", "--task", "t", "--sweep-memory", "500MB"])
    assert args.sweep_memory == 500 * 10**6
    assert build_parser().parse_args(["sweep", "--vector", "v", "--task", "t"]).sweep_memory is None
    with pytest.raises(SystemExit):
        build_parser().parse_args(["sweep", "--vector", "v", "--task", "t", "--sweep-memory", "0"])
