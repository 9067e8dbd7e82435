"""Rows of an external task file -> checked items (fields, duplicates, images), with clear errors."""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from PIL import UnidentifiedImageError

from taskvec.tasks.images import ImageTooLargeError, open_image
from taskvec.tasks.task import DuplicateInputWarning, Item, TaskFileError

# Other spellings of split names found in public datasets.
SPLIT_ALIASES = {"valid": "val", "validation": "val", "dev": "val", "eval": "test"}
ALIAS_SEPARATOR = "|"
# A file repeating hundreds of inputs (conll2003_location.json of Todd et al. repeats 270) is
# summarised by its first few, so the warning stays readable.
REPEATS_NAMED = 5


@dataclass(frozen=True)
class Record:
    where: str  # "FILE: item [3] (input 'France')" or "FILE: line 4 ...": prefix of every error
    file: Path
    position: str  # "item [3]", "line 4" or "item 'France'": where the row is in `file`
    input: str
    output: str
    aliases: tuple[str, ...] = ()
    image: str | None = None
    split: str | None = None

    def answers(self) -> tuple[str, ...]:
        return (self.output, *self.aliases)


def row_location(file: Path, position: str, row: object) -> str:
    """The prefix of an error about a row, e.g. `FILE: item [3] (input 'France')`; the input is named
    when the row has one and the position does not already name it (as a mapping's key does)."""
    text = row.get("input") if isinstance(row, Mapping) else None
    named = isinstance(text, str) and repr(text) not in position
    return f"{file}: {position}" + (f" (input {text!r})" if named else "")


def text_field(row: Mapping[str, object], key: str, where: str, *, required: bool) -> str | None:
    value = row.get(key)
    if value is None or value == "":
        if required:
            raise TaskFileError(f"{where}: missing field {key!r}")
        return None
    if not isinstance(value, str):
        raise TaskFileError(f"{where}: field {key!r} must be a string, got {type(value).__name__}")
    return value


def string_list(value: object, key: str, where: str) -> tuple[str, ...]:
    if value is None or value == "":
        return ()
    if isinstance(value, str):
        return tuple(part.strip() for part in value.split(ALIAS_SEPARATOR) if part.strip())
    if isinstance(value, list) and all(isinstance(v, str) and v.strip() for v in value):
        return tuple(value)
    raise TaskFileError(
        f"{where}: field {key!r} must be a list of non-empty strings or a '|'-separated string"
    )


def record_from_row(row: object, file: Path, position: str, *, split: str | None = None) -> Record:
    """Check one {input, output, image?, aliases?, split?} row; an output list means output + aliases."""
    where = row_location(file, position, row)
    if not isinstance(row, Mapping):
        kind = type(row).__name__
        raise TaskFileError(f"{where}: expected an object with 'input' and 'output', got {kind}")
    text = text_field(row, "input", where, required=True)
    output_value = row.get("output")
    if isinstance(output_value, list):
        answers = string_list(output_value, "output", where)
        if not answers:
            raise TaskFileError(f"{where}: missing field 'output'")
        output, aliases = answers[0], answers[1:]
    else:
        output, aliases = text_field(row, "output", where, required=True) or "", ()
    row_split = text_field(row, "split", where, required=False) or split
    if row_split is not None:
        row_split = SPLIT_ALIASES.get(row_split.strip().lower(), row_split.strip().lower())
    return Record(
        where=where,
        file=file,
        position=position,
        input=(text or "").strip(),
        output=output.strip(),
        aliases=aliases + string_list(row.get("aliases"), "aliases", where),
        image=text_field(row, "image", where, required=False),
        split=row_split,
    )


def check_image(path: Path, where: str) -> None:
    if not path.is_file():
        raise TaskFileError(f"{where}: image not found: {path} (set image_root= if images live elsewhere)")
    try:
        with open_image(path) as picture:
            picture.verify()
    except ImageTooLargeError as error:
        raise TaskFileError(f"{where}: {error}") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        raise TaskFileError(f"{where}: image cannot be read: {path} ({error})") from None


def place(record: Record, file: Path) -> str:
    """The record's position, with its file's name when it comes from a sibling of `file`."""
    return record.position if record.file == file else f"{record.file.name} {record.position}"


def describe_repeat(group: Sequence[Record], file: Path) -> str:
    """A repeated input and its places, e.g. `'Japan' at item [2] ('Tokyo') and item [4] ('Edo')`."""
    places = [f"{place(r, file)} ({', '.join(repr(answer) for answer in r.answers())})" for r in group]
    return f"{group[0].input!r} at {', '.join(places[:-1])} and {places[-1]}"


def describe_repeats(groups: Sequence[Sequence[Record]], file: Path) -> str:
    count = len(groups)
    named = "; ".join(describe_repeat(group, file) for group in groups[:REPEATS_NAMED])
    more = f"; and {count - REPEATS_NAMED} more" if count > REPEATS_NAMED else ""
    return f"{count} input{'s' * (count > 1)} given more than once: {named}{more}"


def unique(texts: Sequence[str]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(texts))


def merge_repeat(group: Sequence[Record], file: Path) -> Record:
    """One record answering with every answer of the group, at the first one's place and split."""
    first = group[0]
    if len(group) == 1:
        return first
    for other in group[1:]:
        if other.image != first.image:
            # One item shows one image: there is no merged item to make.
            raise TaskFileError(
                f"{other.where}: repeats the input of {place(first, file)} with another image "
                f"({other.image!r}, not {first.image!r}); give each input once"
            )
    answers = unique([answer for record in group for answer in record.answers()])
    return replace(first, aliases=answers[1:])


def merge_duplicate_inputs(records: Sequence[Record], *, file: Path, strict: bool) -> list[Record]:
    """One record per input. An input given more than once becomes one record whose answers are all
    of its rows' answers (identical rows simply collapse), with one DuplicateInputWarning naming the
    inputs and their places; strict=True refuses the file instead."""
    groups: dict[str, list[Record]] = {}
    for record in records:
        groups.setdefault(record.input, []).append(record)
    repeated = [group for group in groups.values() if len(group) > 1]
    if not repeated:
        return list(records)
    summary = describe_repeats(repeated, file)
    if strict:
        raise TaskFileError(f"{file}: {summary}; give each input once, with further answers as aliases")
    merged = [merge_repeat(group, file) for group in groups.values()]
    warnings.warn(
        f"{file}: {summary}; merged into one item per input, every output an accepted answer "
        "(load it with strict=True, or --strict, to refuse such a file)",
        DuplicateInputWarning,
        stacklevel=3,
    )
    return merged


def items_from_records(records: Sequence[Record], *, file: Path, image_root: Path) -> list[Item]:
    """Items of records with distinct inputs (see `merge_duplicate_inputs`), their images checked."""
    if not records:
        raise TaskFileError(f"{file}: no items (empty task)")
    items = []
    for record in records:
        images: dict[str, Path] = {}
        if record.image is not None:
            path = (image_root / record.image).resolve()
            check_image(path, record.where)
            images["image"] = path
        items.append(Item(record.input, record.output, record.aliases, images))
    return items


def splits_from_records(records: Sequence[Record], file: Path) -> dict[str, tuple[int, ...]] | None:
    """Splits named by the rows (or by the file names), or None when no row names one."""
    named = [r.split for r in records]
    if all(s is None for s in named):
        return None
    if any(s is None for s in named):
        missing = next(r for r in records if r.split is None)
        raise TaskFileError(f"{missing.where}: no split, but other items of {file} name one")
    splits: dict[str, list[int]] = {}
    for index, split in enumerate(named):
        splits.setdefault(str(split), []).append(index)
    return {name: tuple(indices) for name, indices in splits.items()}
