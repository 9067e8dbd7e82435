"""Every `taskvec` command takes --json and then prints one JSON document on stdout."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import pytest
from run_fixtures import write_task_file
from tiny_models import save_tiny_checkpoint

import taskvec.models
import taskvec.vlm.card
import taskvec.vlm.recipe
from taskvec.cli import build_parser, main

# The arguments a command requires besides --json; a new command that requires some is added here.
REQUIRED_ARGUMENTS: dict[str, list[str]] = {
    "extract": ["--task", "country-capital", "--out", "v.safetensors"],
    "patch": ["--vector", "v.safetensors", "--layer", "0", "--text", "France"],
    "sweep": ["--vector", "v.safetensors", "--task", "country-capital"],
    "lens": ["--task", "country-capital"],
    "heads": ["--task", "country-capital"],
    "report": ["run-dir"],
    "export-vlm": ["out-dir"],
}


def subcommands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def test_every_command_takes_json() -> None:
    commands = subcommands()
    assert {"models", "tasks", "demo", "extract", "patch", "sweep", "lens", "report", "run"} <= set(commands)
    for name, parser in commands.items():
        flags = {flag for action in parser._actions for flag in action.option_strings}
        assert "--json" in flags, f"taskvec {name} has no --json"
        args = parser.parse_args([*REQUIRED_ARGUMENTS.get(name, []), "--json"])
        assert args.json is True, name
        assert parser.parse_args(REQUIRED_ARGUMENTS.get(name, [])).json is False, name


def printed_json(capsys: pytest.CaptureFixture[str]) -> Any:
    return json.loads(capsys.readouterr().out)


def test_models_and_tasks_print_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["models", "--json"]) == 0
    listed = printed_json(capsys)
    assert listed["architectures"] and {"default", "default-vlm"} <= {
        n for m in listed["named"] for n in m["names"]
    }
    assert main(["tasks", "--json"]) == 0
    assert "country-capital" in [task["name"] for task in printed_json(capsys)]


@pytest.fixture(scope="module")
def tiny_llava_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_checkpoint("llava", tmp_path_factory.mktemp("models") / "tiny-llava")


def test_demo_prints_json_on_a_tiny_model(
    tiny_llava_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    task = write_task_file(tmp_path / "task")
    argv = ["demo", "--model", str(tiny_llava_dir), "--task", str(task), "--shots", "2", "--limit", "2"]
    assert main([*argv, "--json"]) == 0
    result = printed_json(capsys)
    assert result["task"] == "country-capital" and len(result["validation_accuracy_per_layer"]) == 3


def test_report_prints_the_paths_it_wrote(
    tiny_llava_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    argv = ["run", "--model", str(tiny_llava_dir), "--llm", "none", "--tasks", str(write_task_file(tmp_path))]
    argv += ["--quick", "--shots", "2", "--ensemble-examples", "0", "2", "--out", str(out), "--no-analyses"]
    assert main(argv) == 0
    capsys.readouterr()
    assert main(["report", str(out), "--json"]) == 0
    assert printed_json(capsys) == {"report": str(out / "report.html"), "analysis": None}
    assert (out / "report.html").is_file()


def test_run_prints_paths_and_summaries_and_its_tables_go_to_stderr(
    tiny_llava_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    task = write_task_file(tmp_path / "task")
    out = tmp_path / "run"
    argv = ["run", "--model", str(tiny_llava_dir), "--llm", "none", "--tasks", str(task), "--quick"]
    argv += ["--shots", "2", "--ensemble-examples", "0", "2", "--out", str(out), "--no-analyses", "--json"]
    assert main(argv) == 0
    captured = capsys.readouterr()
    document = json.loads(captured.out)
    assert "Main table" in captured.err
    assert document["run_dir"] == str(out) and document["report"] is None
    assert document["results"] == str(out / "results.json") and Path(document["summary_csv"]).is_file()
    conditions = {summary["condition"] for summary in document["summaries"]}
    assert {"no-context-text", "text-icl", "image->text"} <= conditions
    assert all(0.0 <= summary["mean"] <= 1.0 for summary in document["summaries"])


def test_export_vlm_prints_the_directory(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from conftest import tiny_handle

    # The real default VLM takes a minute to assemble; the command's output does not depend on it.
    monkeypatch.setattr(taskvec.models, "load_model", lambda *args, **kwargs: tiny_handle("llava"))
    assert main(["export-vlm", str(tmp_path / "vlm"), "--json"]) == 0
    assert printed_json(capsys) == {
        "out": str(tmp_path / "vlm"),
        "model_class": "LlavaForConditionalGeneration",
    }
    assert (tmp_path / "vlm" / "config.json").is_file()


@pytest.mark.parametrize("finished", [False, True])
def test_train_vlm_prints_where_its_parts_are(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, finished: bool
) -> None:
    # Training takes over an hour; what the command prints depends only on the record it returns.
    record = {"finished": finished, "recognition": {"country": 0.9}}
    monkeypatch.setattr(taskvec.vlm.recipe, "train_default_vlm", lambda *args, **kwargs: record)
    monkeypatch.setattr(taskvec.vlm.card, "write_model_card", lambda *args, **kwargs: None)
    out = tmp_path / "vlm-run"
    assert main(["train-vlm", "--out", str(out), "--threads", "1", "--json"]) == 0
    expected = (
        {"finished": True, "parts": str(out / "parts"), "shipped_to": None, "recognition": {"country": 0.9}}
        if finished
        else {"finished": False, "checkpoint": str(out / "checkpoint")}
    )
    assert printed_json(capsys) == expected
