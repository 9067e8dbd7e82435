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
from taskvec.function_vectors.settings import FunctionVectorSettings
from taskvec.models.load_options import LoadOptions
from taskvec.options import (
    CliOption,
    ModelOptions,
    add_options,
    nested,
    option,
    option_flags,
    options_from_args,
    options_instance,
    to_argv,
)
from taskvec.prompts.settings import PromptSettings

# A value other than the default for every RunConfig field (valid with the other fields at default).
NON_DEFAULTS: dict[str, Any] = {
    "tasks": ("country-capital", "food-color"),
    "strict": True,
    "seeds": (0, 1),
    "prompts": PromptSettings(shots=1, template="chat", batch_size=4),
    "val_limit": 4,
    "test_limit": 7,
    "max_new_tokens": 3,
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
    "function_vector": FunctionVectorSettings(
        shots=4, mean_prompts=50, effect_prompts=10, heads=5, scales=(0.5, 3.0)
    ),
    "fv_seeds": None,
}
# The flags of RunConfig's nested settings (the prompts' and the function vectors').
NESTED_FLAGS = {
    "prompts": {"--shots", "--template", "--batch-size"},
    "function_vector": {
        "--fv-shots",
        "--fv-mean-prompts",
        "--fv-effect-prompts",
        "--fv-heads",
        "--fv-scales",
    },
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
    flags = NESTED_FLAGS.get(name) or {option_flags(RunConfig)[name]}
    assert argv[0] in flags | {"--no-" + flag.removeprefix("--") for flag in flags}
    assert parsed_config(*argv) == config


def test_all_options_together_round_trip() -> None:
    prompts = dataclasses.replace(NON_DEFAULTS["prompts"], shots=2)
    config = RunConfig(
        **{**NON_DEFAULTS, "prompts": prompts, "ensemble_examples": (0, 2, 4), "layer_sweep_seeds": 2}
    )
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


@pytest.mark.parametrize(
    "cls", [RunConfig, RunCommandOptions, ModelOptions, LoadOptions, PromptSettings, FunctionVectorSettings]
)
def test_help_shows_the_dataclass_default(cls: type) -> None:
    parser = argparse.ArgumentParser()
    add_options(parser, cls)
    actions = {action.dest: action for action in parser._actions}
    for field in dataclasses.fields(cls):
        if dataclasses.is_dataclass(field.default):
            continue  # nested settings: their own fields are checked as their class
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
        (["--shots", "0"], "argument --shots: expected an integer of at least 1, got '0'"),
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


def test_a_config_built_in_code_refuses_what_the_flags_refuse() -> None:
    with pytest.raises(ValueError, match="shots must be at least 1, got 0"):
        RunConfig(prompts=PromptSettings(shots=0))
    with pytest.raises(ValueError, match="fv_heads must be at least 1, got 0"):
        RunConfig(function_vector=FunctionVectorSettings(heads=0))


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


@dataclasses.dataclass(frozen=True)
class Inner:
    shots: int = option(5, "demonstrations")
    style: str | None = option(None, "a style")
    scales: tuple[float, ...] = option((1.0,), "scales")


@dataclasses.dataclass(frozen=True)
class Outer:
    name: str = option("a", "a name")
    inner: Inner = nested(Inner())
    fv: Inner = nested(Inner(shots=10), prefix="fv-")


@dataclasses.dataclass(frozen=True)
class Deep:
    outer: Outer = nested(Outer(), prefix="x-")


def outer_args(*argv: str, cls: type = Outer) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_options(parser, cls)
    return parser.parse_args(list(argv))


def test_a_nested_dataclass_gives_its_fields_as_flags_with_its_prefix() -> None:
    parser = argparse.ArgumentParser()
    add_options(parser, Outer)
    flags = {flag for action in parser._actions for flag in action.option_strings} - {"-h", "--help"}
    assert flags == {"--name", "--shots", "--style", "--scales", "--fv-shots", "--fv-style", "--fv-scales"}
    assert option_flags(Outer)["fv_shots"] == "--fv-shots"
    helps = {action.dest: action.help for action in parser._actions}
    assert helps["fv_shots"] == "demonstrations (default: 10)"  # the nested default instance's value
    assert helps["shots"] == "demonstrations (default: 5)"
    assert option_flags(Deep)["x_fv_shots"] == "--x-fv-shots"  # prefixes add up


def test_nested_options_come_back_as_nested_instances() -> None:
    given = options_from_args(Outer, outer_args("--fv-shots", "3", "--style", "noto"))
    assert given == {"inner": Inner(style="noto"), "fv": Inner(shots=3)}
    assert options_from_args(Outer, outer_args()) == {}
    assert options_instance(Outer, outer_args("--fv-scales", "2", "4")) == Outer(
        fv=Inner(shots=10, scales=(2.0, 4.0))
    )
    deep = options_instance(Deep, outer_args("--x-fv-shots", "2", "--x-name", "b", cls=Deep))
    assert deep == Deep(Outer(name="b", fv=Inner(shots=2)))


def test_nested_options_round_trip_and_fill_their_defaults() -> None:
    config = Outer(name="b", inner=Inner(scales=(3.0,)), fv=Inner(shots=3, style="plain"))
    argv = to_argv(config)
    assert argv == ["--name", "b", "--scales", "3.0", "--fv-shots", "3", "--fv-style", "plain"]
    assert options_instance(Outer, outer_args(*argv)) == config
    assert to_argv(Outer()) == []  # fv's shots=10 is its default, not a change
    parser = argparse.ArgumentParser()
    add_options(parser, Outer, fill_defaults=True)
    filled = parser.parse_args([])
    assert (filled.shots, filled.fv_shots, filled.fv_scales) == (5, 10, (1.0,))


@dataclasses.dataclass(frozen=True)
class Partly:
    inner: Inner = nested(Inner(style="noto"), only=("shots",))


def test_a_nested_field_can_put_only_some_of_its_fields_on_the_command_line() -> None:
    assert option_flags(Partly) == {"shots": "--shots"}
    assert options_instance(Partly, outer_args("--shots", "2", cls=Partly)) == Partly(
        Inner(shots=2, style="noto")
    )
    assert to_argv(Partly(Inner(shots=2, style="noto"))) == ["--shots", "2"]
    with pytest.raises(ValueError, match="not on the command line"):
        to_argv(Partly(Inner(style="plain")))
    with pytest.raises(TypeError, match="no fields"):
        nested(Inner(), only=("shot",))


def test_only_puts_the_named_fields_on_the_command_line() -> None:
    parser = argparse.ArgumentParser()
    add_options(parser, PromptSettings, only=("template",))
    assert [action.dest for action in parser._actions] == ["help", "template"]
    assert options_instance(PromptSettings, parser.parse_args(["--template", "chat"])) == PromptSettings(
        template="chat"
    )
    with pytest.raises(TypeError, match="no options"):
        add_options(argparse.ArgumentParser(), PromptSettings, only=("shot",))


SHARED_FLAGS = ("--shots", "--seed", "--style", "--template", "--batch-size")
# Per command, the arguments it requires besides the flags under test, and the shared flags it uses.
REQUIRED = {
    "demo": [],
    "extract": ["--task", "t", "--out", "v.safetensors"],
    "patch": ["--vector", "v", "--layer", "0", "--text", "x"],
    "sweep": ["--vector", "v", "--task", "t"],
    "heads": ["--task", "t"],
    "lens": ["--task", "t"],
    "check": [],
}
USED = {
    "demo": {"--shots", "--seed", "--template"},
    "extract": set(SHARED_FLAGS),
    "patch": {"--template"},
    "sweep": {"--style", "--template"},
    "heads": set(SHARED_FLAGS),
    "lens": set(SHARED_FLAGS),
    "check": {"--template"},
}


def _commands() -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def _shown(action: argparse.Action) -> tuple[Any, ...]:
    return (action.help, action.default, action.metavar, action.choices, action.nargs)


def test_every_commands_prompt_flags_are_generated_from_the_settings() -> None:
    """--shots/--seed/--style/--template/--batch-size of every command but run (RunConfig) and
    train-vlm (its --seed seeds training, not prompts) are PromptSettings' flags (heads' --shots:
    FunctionVectorSettings'): the same help, default, metavar and choices."""
    reference = argparse.ArgumentParser()
    add_options(reference, PromptSettings, fill_defaults=True)
    generated = {a.option_strings[0]: a for a in reference._actions if a.option_strings[0] in SHARED_FLAGS}
    fv_reference = argparse.ArgumentParser()
    add_options(fv_reference, FunctionVectorSettings, fill_defaults=True)
    fv_shots = next(a for a in fv_reference._actions if "--shots" in a.option_strings)
    commands = _commands()
    assert set(commands) - set(REQUIRED) == {"models", "tasks", "report", "train-vlm", "export-vlm", "run"}
    for name, used in USED.items():
        found = set()
        for action in commands[name]._actions:
            for flag in set(action.option_strings) & set(SHARED_FLAGS):
                found.add(flag)
                expected = fv_shots if name == "heads" and flag == "--shots" else generated[flag]
                assert _shown(action) == _shown(expected), (name, flag)
        assert found == used, name


@pytest.mark.parametrize("command", ["demo", "extract", "lens"])
def test_shots_and_seed_parse_into_prompt_settings(command: str) -> None:
    from taskvec.cli import _prompt_settings

    args = build_parser().parse_args([command, *REQUIRED[command], "--seed", "3", "--shots", "2"])
    assert _prompt_settings(args) == PromptSettings(shots=2, seed=3)


def test_heads_takes_the_protocols_shots_and_the_prompt_seed() -> None:
    from taskvec.cli import _function_vector_settings, _prompt_settings

    args = build_parser().parse_args(["heads", "--task", "t", "--seed", "3", "--shots", "2", "--heads", "4"])
    assert _function_vector_settings(args) == FunctionVectorSettings(shots=2, heads=4)
    assert _prompt_settings(args) == PromptSettings(shots=2, seed=3)  # one --shots: the protocol's
    defaults = build_parser().parse_args(["heads", "--task", "t"])
    assert _function_vector_settings(defaults) == FunctionVectorSettings()
