"""Command-line options declared once, on the fields of a dataclass.

`option(default, help)` is a `dataclasses.field` that also says how the field appears on the command
line, so one line states an option's name, type, default, flag and help. `add_options` turns a
dataclass's fields into argparse arguments (each help ends with the field's real default, so no
default is written twice), `options_from_args` reads back the values the user gave, and `to_argv`
is the inverse: the arguments that give an instance's non-default values.

Types come from the field annotations: int, float, str; bool as a flag (`--x` when the default is
off, `--x/--no-x` when it is on); `tuple[X, ...]` as one or more values; `Literal[...]` as choices;
`X | None` (with `none_word`, a word such as "all" that gives None). Anything else takes `parse`.

A field declared with `nested(default, prefix=...)` holds another such dataclass: its fields become
flags of the same command (named with the prefix, e.g. "fv-" gives `--fv-shots`), their defaults
those of the nested default instance, and `options_from_args` gives back a nested instance.

Depends on nothing else in taskvec, so any command can use it.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from collections.abc import Callable, Collection, Sequence
from typing import Any, Literal, TypeVar

T = TypeVar("T")

_METADATA_KEY = "taskvec.option"
_NESTED_KEY = "taskvec.nested"


# What a `none_word` converts to inside the namespace: argparse's own None means "not given", so a
# None the user asked for (e.g. `--sweep-seeds all` against a default of 1) needs another marker.
class _ExplicitNone:
    def __repr__(self) -> str:
        return "None"


_EXPLICIT_NONE = _ExplicitNone()


@dataclasses.dataclass(frozen=True)
class CliOption:
    """How one dataclass field appears on the command line; built by `option`."""

    help: str
    flag: str | None = None  # None: "--" + the field name with "-" for "_"
    parse: Callable[[str], Any] | None = None  # one command-line value -> the field's value
    show: Callable[[Any], Sequence[str]] | None = None  # the field's value -> its command-line values
    metavar: str | None = None
    none_word: str | None = None  # the command-line word for None
    collect: Callable[[list[Any]], Any] | None = None  # set: a repeatable flag, its parsed values -> field


def option(
    default: T,
    help: str,
    *,
    flag: str | None = None,
    parse: Callable[[str], Any] | None = None,
    show: Callable[[Any], Sequence[str]] | None = None,
    metavar: str | None = None,
    none_word: str | None = None,
    collect: Callable[[list[Any]], Any] | None = None,
) -> T:
    """A dataclass field with this default that `add_options` puts on the command line.

    help: what the option does; " (default: ...)" is appended from `default`, so do not repeat it.
    flag: the flag when not derived from the field name. parse/show: a custom conversion of one
    command-line value to the field's value and back, for values the annotation cannot describe
    (parse may raise ValueError with a message for the user). none_word: a word that gives None.
    collect: makes the flag repeatable; receives the list of parsed values and returns the field's.
    """
    cli = CliOption(help, flag, parse, show, metavar, none_word, collect)
    return dataclasses.field(default=default, metadata={_METADATA_KEY: cli})


@dataclasses.dataclass(frozen=True)
class _Nested:
    """A field holding an option dataclass whose fields are flags of the command; built by `nested`."""

    prefix: str
    only: tuple[str, ...] | None  # the inner fields on the command line; None: all


def nested(default: T, *, prefix: str = "", only: Sequence[str] | None = None) -> T:
    """A dataclass field holding `default`, an instance of a dataclass declared with `option`, whose
    fields `add_options` puts on the command line: flags and destinations start with `prefix`
    (e.g. "fv-": `--fv-shots`, `args.fv_shots`), defaults are `default`'s values. `only`: the inner
    fields that are flags (the others keep `default`'s values, e.g. set per task by the caller)."""
    if not dataclasses.is_dataclass(default) or isinstance(default, type):
        raise TypeError(f"nested(...) takes an instance of an option dataclass, got {default!r}")
    if only is not None:
        unknown = set(only) - {field.name for field in dataclasses.fields(default)}
        if unknown:
            raise TypeError(f"{type(default).__name__} has no fields {sorted(unknown)}")
    cli = _Nested(prefix, None if only is None else tuple(only))
    return dataclasses.field(default=default, metadata={_NESTED_KEY: cli})


@dataclasses.dataclass(frozen=True)
class _Argument:
    """One field resolved into what argparse needs, and back."""

    name: str  # the namespace attribute: the field's name, after its nested fields' prefixes
    path: tuple[str, ...]  # field names from the outer dataclass down to this field
    flag: str
    default: Any
    cli: CliOption
    boolean: bool
    convert: Callable[[str], Any] | None  # one token -> value (None for booleans)
    choices: tuple[Any, ...] | None
    many: bool  # tuple[X, ...]: nargs="+"
    metavar: str

    def finish(self, value: Any) -> Any:
        """A namespace value (not None) -> the field's value."""
        if value is _EXPLICIT_NONE:
            return None
        if self.cli.collect is not None:
            return self.cli.collect([None if item is _EXPLICIT_NONE else item for item in value])
        if self.many:
            return tuple(value)
        return value

    def tokens(self, value: Any) -> list[str]:
        """The command-line values (after the flag) that give `value`; ValueError if none can."""
        if value is None:
            if self.cli.none_word is None:
                raise ValueError(f"{self.flag} cannot be set to None on the command line")
            return [self.cli.none_word]
        if self.cli.show is not None:
            return [str(token) for token in self.cli.show(value)]
        if self.many:
            return [str(item) for item in value]
        return [str(value)]

    def shown_default(self) -> str:
        if self.boolean:
            return " (default: on)" if self.default else ""
        if self.default is None and self.cli.none_word is None:
            return ""  # the help says what an unset option means
        return f" (default: {' '.join(self.tokens(self.default))})"


def _describe(kind: Any) -> str:
    if kind is int:
        return "an integer"
    if kind is float:
        return "a number"
    if kind is str:
        return "a value"
    if typing.get_origin(kind) is Literal:
        return _alternatives([repr(value) for value in typing.get_args(kind)])
    return getattr(kind, "__name__", str(kind))


def _alternatives(texts: Sequence[str]) -> str:
    """["a", "b", "c"] -> "a, b or c"."""
    return texts[0] if len(texts) == 1 else f"{', '.join(texts[:-1])} or {texts[-1]}"


def _scalar_converter(kinds: Sequence[Any], none_word: str | None) -> Callable[[str], Any]:
    """A token -> the first of `kinds` that accepts it (Literal values match exactly)."""
    for kind in kinds:
        if kind not in (int, float, str) and typing.get_origin(kind) is not Literal:
            raise TypeError(f"no command-line conversion for {kind!r}; give option(parse=...)")
    described = [_describe(kind) for kind in kinds] + ([repr(none_word)] if none_word else [])
    expected = _alternatives(described)

    def convert(token: str) -> Any:
        if none_word is not None and token == none_word:
            return _EXPLICIT_NONE
        for kind in kinds:
            if typing.get_origin(kind) is Literal:
                if token in typing.get_args(kind):
                    return token
                continue
            try:
                return kind(token)
            except ValueError:
                continue
        raise argparse.ArgumentTypeError(f"expected {expected}, got {token!r}")

    return convert


def _custom_converter(parse: Callable[[str], Any], none_word: str | None) -> Callable[[str], Any]:
    def convert(token: str) -> Any:
        if none_word is not None and token == none_word:
            return _EXPLICIT_NONE
        try:
            return parse(token)
        except ValueError as error:
            raise argparse.ArgumentTypeError(str(error)) from error

    return convert


_METAVARS: dict[tuple[Any, ...], str] = {(int,): "N", (float,): "X"}


def _resolve(
    field: dataclasses.Field[Any], hint: Any, prefix: str, path: tuple[str, ...], default: Any
) -> _Argument:
    cli = field.metadata.get(_METADATA_KEY)
    if not isinstance(cli, CliOption):
        raise TypeError(f"field {field.name!r} is not declared with taskvec.options.option(...)")
    flag = "--" + prefix + (cli.flag.removeprefix("--") if cli.flag else field.name.replace("_", "-"))
    name = (prefix + field.name).replace("-", "_")
    kinds: list[Any] = [hint]
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        kinds = [kind for kind in typing.get_args(hint) if kind is not type(None)]
    boolean = kinds == [bool]
    many = len(kinds) == 1 and typing.get_origin(kinds[0]) is tuple and cli.parse is None
    choices: tuple[Any, ...] | None = None
    convert: Callable[[str], Any] | None = None
    if cli.parse is not None:
        convert = _custom_converter(cli.parse, cli.none_word)
    elif boolean:
        if cli.none_word is not None or cli.collect is not None:
            raise TypeError(f"{flag}: a boolean flag takes no none_word or collect")
    elif many:
        element, *rest = typing.get_args(kinds[0])
        if rest != [Ellipsis]:
            raise TypeError(f"{flag}: only tuple[X, ...] is supported, got {kinds[0]!r}")
        convert = _scalar_converter([element], cli.none_word)
    else:
        convert = _scalar_converter(kinds, cli.none_word)
        if len(kinds) == 1 and typing.get_origin(kinds[0]) is Literal and cli.none_word is None:
            choices = typing.get_args(kinds[0])
    element_kinds = list(typing.get_args(kinds[0])[:1]) if many else kinds
    metavar = cli.metavar or _METAVARS.get(tuple(element_kinds), flag.removeprefix("--").upper())
    return _Argument(name, path, flag, default, cli, boolean, convert, choices, many, metavar)


def _arguments(
    cls: type, prefix: str = "", path: tuple[str, ...] = (), defaults: Any = None
) -> list[_Argument]:
    """The command-line arguments of `cls`'s fields, nested dataclasses' fields in their place;
    `defaults` (an instance) overrides the fields' own defaults, as a nested field's default does."""
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"{cls!r} is not a dataclass")
    hints = typing.get_type_hints(cls)
    arguments: list[_Argument] = []
    for field in dataclasses.fields(cls):
        default = field.default if defaults is None else getattr(defaults, field.name)
        inner = field.metadata.get(_NESTED_KEY)
        if isinstance(inner, _Nested):
            within = _arguments(hints[field.name], prefix + inner.prefix, (*path, field.name), default)
            depth = len(path) + 1  # where the inner field's name sits in an argument's path
            arguments += [a for a in within if inner.only is None or a.path[depth] in inner.only]
        else:
            arguments.append(_resolve(field, hints[field.name], prefix, (*path, field.name), default))
    return arguments


def add_options(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup,
    cls: type,
    *,
    fill_defaults: bool = False,
    only: Collection[str] | None = None,
) -> None:
    """One argparse argument per field of the dataclass `cls` (each declared with `option`).

    Unset options are None in the namespace, so `options_from_args` returns only what the user gave
    and a preset can supply its own values for the rest. fill_defaults=True puts each field's default
    in the namespace instead, for code that reads `args.<field>` directly. `only`: the fields a
    command uses (by namespace attribute); the others keep their defaults.
    """
    arguments = _arguments(cls)
    if only is not None:
        unknown = set(only) - {argument.name for argument in arguments}
        if unknown:
            raise TypeError(f"{cls.__name__} has no options {sorted(unknown)}")
        arguments = [argument for argument in arguments if argument.name in only]
    for argument in arguments:
        cli = argument.cli
        help_text = (cli.help + argument.shown_default()).replace("%", "%%")
        kwargs: dict[str, Any] = {"dest": argument.name, "default": None, "help": help_text}
        if argument.boolean:
            kwargs["action"] = argparse.BooleanOptionalAction if argument.default else "store_true"
        else:
            kwargs["type"] = argument.convert
            kwargs["metavar"] = argument.metavar
            if argument.choices is not None:
                kwargs["choices"] = argument.choices
                del kwargs["metavar"]  # argparse shows {a,b,c}
            if cli.collect is not None:
                kwargs["action"] = "append"
            elif argument.many:
                kwargs["nargs"] = "+"
        action = parser.add_argument(argument.flag, **kwargs)
        # Not for a repeatable flag: argparse would append the user's values to the default's.
        if fill_defaults and cli.collect is None:
            action.default = argument.default


def options_from_args(cls: type, namespace: argparse.Namespace) -> dict[str, Any]:
    """{field: value} for the options of `cls` set in the namespace (unset ones are left out); a
    nested field with any option set is its default instance with those options replaced."""
    given: dict[tuple[str, ...], Any] = {}
    for argument in _arguments(cls):
        value = getattr(namespace, argument.name, None)
        if value is not None:
            given[argument.path] = argument.finish(value)
    return _grouped(cls, given)


def _grouped(cls: type, given: dict[tuple[str, ...], Any], defaults: Any = None) -> dict[str, Any]:
    """{(field, inner field, ...): value} -> {field: value or nested instance} for `cls`."""
    overrides: dict[str, Any] = {}
    for field in dataclasses.fields(cls):
        inner = {path[1:]: value for path, value in given.items() if len(path) > 1 and path[0] == field.name}
        if (field.name,) in given:
            overrides[field.name] = given[(field.name,)]
        elif inner:
            default: Any = field.default if defaults is None else getattr(defaults, field.name)
            overrides[field.name] = dataclasses.replace(default, **_grouped(type(default), inner, default))
    return overrides


def options_instance(cls: type[T], namespace: argparse.Namespace) -> T:
    """An instance of `cls` with the options set in the namespace, the fields' defaults elsewhere."""
    return cls(**options_from_args(cls, namespace))


def _value_at(instance: Any, path: tuple[str, ...]) -> Any:
    for name in path:
        instance = getattr(instance, name)
    return instance


def to_argv(instance: Any) -> list[str]:
    """The command-line arguments that give the instance's non-default values (ValueError if a
    value has no command-line form, e.g. seeds that are not 0..N-1)."""
    arguments = _arguments(type(instance))
    flagged = {argument.path: _value_at(instance, argument.path) for argument in arguments}
    if type(instance)(**_grouped(type(instance), flagged)) != instance:
        raise ValueError(f"{instance!r} sets fields that are not on the command line (nested(only=...))")
    argv: list[str] = []
    for argument in arguments:
        value = flagged[argument.path]
        if value == argument.default:
            continue
        if argument.boolean:
            argv.append(argument.flag if value else "--no-" + argument.flag.removeprefix("--"))
        elif argument.cli.collect is not None:
            for token in argument.tokens(value):
                argv += [argument.flag, token]
        else:
            argv += [argument.flag, *argument.tokens(value)]
    return argv


def option_flags(cls: type) -> dict[str, str]:
    """{namespace attribute: its flag} for a dataclass declared with `option` (a field's name,
    after the prefixes of the nested fields it is inside)."""
    return {argument.name: argument.flag for argument in _arguments(cls)}


def at_least(minimum: int) -> Callable[[str], int]:
    """A command-line integer of at least `minimum`, for `option(parse=...)` and argparse's `type=`;
    argparse names the flag: `argument --shots: expected an integer of at least 1, got '0'`."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected an integer of at least {minimum}, got {text!r}")
        return value

    return parse


@dataclasses.dataclass(frozen=True)
class ModelOptions:
    """The options every single-model command shares (demo, extract, patch, sweep, lens); how the
    model loads (device, dtype, quantization, ...) is `taskvec.models.LoadOptions`."""

    model: str = option(
        "default", "'default' (LM), 'default-vlm', a checkpoint directory or a hub id (org/name)"
    )
    json: bool = option(False, "machine-readable output")
