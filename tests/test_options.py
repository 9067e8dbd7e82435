"""Each `taskvec run` option is declared once (taskvec.options): flag, parsing, help and default agree."""

from __future__ import annotations

import argparse
import dataclasses
import re
from pathlib import Path
from typing import Any

import pytest

from taskvec.cli import build_parser, main
from taskvec.cli.run_command import RunCommandOptions, config_from_args
from taskvec.experiments.config import QUICK_TASKS, RunConfig
from taskvec.models.load_options import LoadOptions
from taskvec.options import (
    CliOption,
    ModelOptions,
    add_options,
    option,
    option_flags,
    options_from_args,
    to_argv,
)

# A value other than the default for every RunConfig field (valid with the other fields at default).
NON_DEFAULTS: dict[str, Any] = {
    "tasks": ("country-capital", "food-color"),
    "strict": True,
    "seeds": (0, 1),
    "shots": 1,
    "template": "chat",
    "val_limit": 4,
    "test_limit": 7,
    "max_new_tokens": 3,
    "batch_size": 4,
    "query_batch_size": 16,
    "quick": True,
    "layer_choice": 3,
    "first_candidate_layer": 2,
    "last_candidate_layer": -3,
    "ensemble_examples": (0, 10),
    "layer_sweep_seeds": None,
    "sweep_memory": 8 * 2**30,
    "ensemble_layer_from": "each",
    "ensemble_ignore_case": False,
    "styles": {"country": "noto", "animal-latin": "twemoji"},
    "metric": "exact",
    "examples_per_condition": 0,
    "bootstrap_samples": 200,
    "query_independent_share": 0.75,
    "function_vectors": False,
    "fv_shots": 4,
    "fv_mean_prompts": 50,
    "fv_effect_prompts": 10,
    "fv_heads": 5,
    "fv_seeds": None,
    "fv_scales": (0.5, 3.0),
}


def run_args(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(["run", *argv])


def parsed_config(*argv: str) -> RunConfig:
    """The RunConfig of exactly the options given (no --quick preset applied)."""
    return RunConfig(**options_from_args(RunConfig, run_args(*argv)))


def cli_option(field: dataclasses.Field[Any]) -> CliOption:
    return next(value for value in field.metadata.values() if isinstance(value, CliOption))


def test_every_field_is_a_run_option(capsys: pytest.CaptureFixture[str]) -> None:
    assert set(NON_DEFAULTS) == {field.name for field in dataclasses.fields(RunConfig)}
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    help_text = capsys.readouterr().out
    for flag in [*option_flags(RunConfig).values(), *option_flags(RunCommandOptions).values()]:
        assert f"{flag} " in help_text or f"{flag}," in help_text


@pytest.mark.parametrize("name", sorted(NON_DEFAULTS))
def test_each_option_round_trips(name: str) -> None:
    config = RunConfig(**{name: NON_DEFAULTS[name]})
    argv = to_argv(config)
    flag = option_flags(RunConfig)[name]
    assert argv[0] in (flag, "--no-" + flag.removeprefix("--"))
    assert parsed_config(*argv) == config


def test_all_options_together_round_trip() -> None:
    config = RunConfig(**{**NON_DEFAULTS, "shots": 2, "ensemble_examples": (0, 2, 4), "layer_sweep_seeds": 2})
    assert parsed_config(*to_argv(config)) == config
    assert to_argv(RunConfig()) == []


def test_custom_flags_parse_as_documented() -> None:
    config = parsed_config(
        "--seeds", "2", "--style", "country=noto", "--style", "food=plain", "--layer", "4",
        "--sweep-seeds", "all", "--last-candidate-layer", "-4", "--no-ensemble-ignore-case",
    )  # fmt: skip
    assert config.seeds == (0, 1)
    assert config.styles == {"country": "noto", "food": "plain"}
    assert config.layer_choice == 4
    assert config.layer_sweep_seeds is None
    assert config.last_candidate_layer == -4
    assert config.ensemble_ignore_case is False
    assert parsed_config("--layer", "validation").layer_choice == "validation"
    assert parsed_config("--sweep-seeds", "2").layer_sweep_seeds == 2


@pytest.mark.parametrize("cls", [RunConfig, RunCommandOptions, ModelOptions, LoadOptions])
def test_help_shows_the_dataclass_default(cls: type) -> None:
    parser = argparse.ArgumentParser()
    add_options(parser, cls)
    actions = {action.dest: action for action in parser._actions}
    for field in dataclasses.fields(cls):
        help_text = actions[field.name].help or ""
        shown = re.search(r"\(default: ([^()]*)\)$", help_text)
        if isinstance(field.default, bool):
            assert (shown.group(1) if shown else None) == ("on" if field.default else None), field.name
            continue
        if field.default is None and cli_option(field).none_word is None:
            continue  # the help says in words what unset means
        assert shown, f"{field.name}: no default in {help_text!r}"
        flag = actions[field.name].option_strings[0]
        namespace = parser.parse_args([flag, *shown.group(1).split()])
        assert options_from_args(cls, namespace) == {field.name: field.default}, field.name


def test_quick_preset_with_explicit_options() -> None:
    config = config_from_args(run_args("--quick", "--test-limit", "3", "--seeds", "2", "--val-limit", "all"))
    assert config.quick and config.tasks == QUICK_TASKS
    assert config.test_limit == 3 and config.seeds == (0, 1) and config.val_limit is None
    assert config.ensemble_examples == RunConfig.quick_preset().ensemble_examples
    assert config_from_args(run_args()) == RunConfig()
    assert config_from_args(run_args("--quick")) == RunConfig.quick_preset()


def test_command_options_keep_their_defaults() -> None:
    args = run_args()
    assert (args.model, args.llm, args.out, args.threads) == ("default-vlm", "default", "taskvec-run", None)
    assert (args.no_analyses, args.quiet) == (False, False)
    assert RunCommandOptions(**options_from_args(RunCommandOptions, args)) == RunCommandOptions()
    assert LoadOptions(**options_from_args(LoadOptions, args)) == LoadOptions()
    demo = build_parser().parse_args(["demo"])
    assert (demo.model, demo.json) == ("default", False)
    assert LoadOptions(**options_from_args(LoadOptions, demo)) == LoadOptions()
    given = build_parser().parse_args(["lens", "--task", "t", "--device", "cpu", "--quantization", "4bit"])
    assert LoadOptions(**options_from_args(LoadOptions, given)) == LoadOptions(
        device="cpu", quantization="4bit"
    )
    assert build_parser().parse_args(["sweep", "--vector", "v", "--task", "t", "--json"]).json is True


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--seeds", "0"], "argument --seeds: expected a number of seeds (at least 1), got '0'"),
        (["--seeds", "two"], "argument --seeds: expected a number of seeds"),
        (["--style", "country"], "argument --style: expected TASK_OR_FAMILY=STYLE"),
        (["--layer", "top"], "argument --layer: expected 'validation' or an integer, got 'top'"),
        (["--sweep-seeds", "many"], "argument --sweep-seeds: expected an integer or 'all', got 'many'"),
        (["--shots", "2.5"], "argument --shots: expected an integer, got '2.5'"),
        (["--query-independent-share", "most"], "expected a number, got 'most'"),
        (["--metric", "fuzzy"], "--metric: expected 'prefix', 'prefix_ignore_case' or 'exact', got 'fuzzy'"),
        (["--ensemble-examples"], "argument --ensemble-examples: expected at least one argument"),
    ],
)
def test_bad_values_are_argparse_errors(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        run_args(*argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--shots", "0"], "shots must be at least 1, got 0"),
        (["--bootstrap-samples", "50"], "bootstrap_samples must be at least 100"),
        (["--query-independent-share", "0"], "query_independent_share must be in (0, 1]"),
        (["--query-independent-share", "1.5"], "query_independent_share must be in (0, 1]"),
        (["--first-candidate-layer", "5", "--last-candidate-layer", "3"], "no candidate layers"),
        (["--first-candidate-layer", "-1", "--last-candidate-layer", "-3"], "no candidate layers"),
        (["--ensemble-examples", "0", "7"], "multiples of shots=5"),
    ],
)
def test_invalid_configs_fail_before_any_model_loads(
    argv: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["run", "--model", str(tmp_path / "no-model"), "--out", str(tmp_path), *argv]) == 2
    assert message in capsys.readouterr().err


def test_candidate_layers_of_unknown_depth_are_accepted() -> None:
    # 0..-2 is the default; 5..-2 is empty only for models of fewer than 7 layers, known later.
    assert RunConfig(first_candidate_layer=5).last_candidate_layer == -2
    assert RunConfig(first_candidate_layer=-3, last_candidate_layer=-1).first_candidate_layer == -3


def test_a_field_without_option_is_refused() -> None:
    @dataclasses.dataclass(frozen=True)
    class Partial:
        declared: int = option(1, "declared")
        plain: int = 2

    with pytest.raises(TypeError, match="'plain' is not declared"):
        add_options(argparse.ArgumentParser(), Partial)
