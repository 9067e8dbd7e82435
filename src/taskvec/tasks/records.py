"""Rows of an external task file -> checked items (fields, duplicates, images), with clear errors."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from taskvec.tasks.task import Item, TaskFileError

# Other spellings of split names found in public datasets.
SPLIT_ALIASES = {"valid": "val", "validation": "val", "dev": "val", "eval": "test"}
ALIAS_SEPARATOR = "|"


@dataclass(frozen=True)
class Record:
    where: str  # "FILE: item [3] (input 'France')" or "FILE: line 4 ...": prefix of every error
    input: str
    output: str
    aliases: tuple[str, ...] = ()
    image: str | None = None
    split: str | None = None


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


def record_from_row(row: object, where: str, *, split: str | None = None) -> Record:
    """Check one {input, output, image?, aliases?, split?} row; an output list means output + aliases."""
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
        with Image.open(path) as picture:
            picture.verify()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        raise TaskFileError(f"{where}: image cannot be read: {path} ({error})") from None


def items_from_records(records: list[Record], *, file: Path, image_root: Path) -> list[Item]:
    if not records:
        raise TaskFileError(f"{file}: no items (empty task)")
    first_seen: dict[str, str] = {}
    items = []
    for record in records:
        if record.input in first_seen:
            raise TaskFileError(
                f"{record.where}: duplicate input {record.input!r} (first at {first_seen[record.input]}); "
                "give each input once, with further answers as aliases"
            )
        first_seen[record.input] = record.where
        images: dict[str, Path] = {}
        if record.image is not None:
            path = (image_root / record.image).resolve()
            check_image(path, record.where)
            images["image"] = path
        items.append(Item(record.input, record.output, record.aliases, images))
    return items


def splits_from_records(records: list[Record], file: Path) -> dict[str, tuple[int, ...]] | None:
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
