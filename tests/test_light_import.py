"""Importing the library is light: no training code, no transformers, until a command needs them."""

from __future__ import annotations

import argparse
import subprocess
import sys


def _modules_after(statement: str) -> set[str]:
    """The modules a fresh interpreter holds after running `statement`."""
    shown = "import sys; print('\\n'.join(sys.modules))"
    result = subprocess.run(
        [sys.executable, "-c", f"{statement}; {shown}"], capture_output=True, text=True, check=True
    )
    return set(result.stdout.split())


def test_importing_taskvec_loads_no_training_code_and_no_transformers() -> None:
    loaded = _modules_after("import taskvec")
    assert not {name for name in loaded if name.startswith("taskvec.vlm")}
    assert "transformers" not in loaded
    assert "torch" not in loaded


def test_importing_the_models_loads_no_vlm_package() -> None:
    loaded = _modules_after("import taskvec.models")
    assert not {name for name in loaded if name.startswith("taskvec.vlm")}


def test_the_default_vlm_is_a_named_model_built_by_its_package() -> None:
    from taskvec.models.loading import named_model
    from taskvec.vlm.recipe import DEFAULT_VLM_NAME

    entry = named_model("default-vlm")
    assert entry is not None and DEFAULT_VLM_NAME in entry.names and entry.base_lm == "default"
    assert named_model("default") is not None and named_model("no-such-model") is None


def test_the_tasks_command_imports_no_torch() -> None:
    """`taskvec tasks` builds only its own flags: the other commands' flags import torch."""
    code = (
        "import sys; from taskvec.cli import main; main(['tasks', '--json']); "
        "print('\\n'.join(sys.modules), file=sys.stderr)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "country-capital" in result.stdout
    loaded = set(result.stderr.split())
    assert "torch" not in loaded and "transformers" not in loaded


def test_a_commands_flags_are_there_when_it_parses_or_shows_help() -> None:
    from taskvec.cli import build_parser

    assert build_parser(lazy=True).parse_args(["demo", "--shots", "2"]).shots == 2
    actions = build_parser(lazy=True)._actions
    commands = next(a for a in actions if isinstance(a, argparse._SubParsersAction))
    assert "--mean-prompts" in commands.choices["heads"].format_help()
