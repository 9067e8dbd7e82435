"""External task files, format detected from the file:

- the paper's annotations: `data/annotations/{task}_{val|test}.json`, a JSON list of
  {"input", "image", "output"} with images relative to `data/`; the sibling split files load too;
- Todd et al.'s function-vector datasets: a JSON list of {"input", "output"} (some repeat an input:
  its outputs become one item's answers, with a warning; strict loading refuses such a file);
- Hendel et al.'s task-vector datasets: a JSON object {input: output};
- a taskvec task file: a JSON object with "answers" ({input: output or [output, *aliases]});
- JSONL or CSV/TSV rows with input, output and optional image, aliases ("|"-separated in CSV), split.
"""

from __future__ import annotations

import csv
import io
import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from taskvec.tasks.builtin import list_tasks, task_spec
from taskvec.tasks.records import (
    Record,
    items_from_records,
    merge_duplicate_inputs,
    record_from_row,
    splits_from_records,
)
from taskvec.tasks.splits import assign_splits
from taskvec.tasks.task import Task, TaskFileError, task_name_error

SPLIT_FILE = re.compile(r"^(?P<task>.+)_(?P<split>train|val|valid|validation|dev|test)$")
SPLIT_FILE_ORDER = ("train", "val", "valid", "validation", "dev", "test")
UNRECOGNISED = (
    "unrecognised task file: expected a JSON list of {input, output} objects (paper annotations, "
    "Todd et al.), a JSON object mapping input to output (Hendel et al.), a JSON object with 'answers', "
    "or .jsonl/.csv rows"
)
# The help of every command-line flag that loads task files strictly.
STRICT_HELP = "refuse a task file that gives an input more than once (else its answers merge, with a warning)"


def read_text(path: Path) -> str:
    """The file's text: UTF-8, with or without the byte-order mark spreadsheet programs write."""
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as error:
        raise TaskFileError(
            f"{path}: not UTF-8 text ({error.reason} at byte {error.start}); save it as UTF-8"
        ) from None


def parse_json(text: str, where: str) -> Any:
    """JSON text; `where` (the file, or its line) starts the message of a malformed one."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        position = f"line {error.lineno} column {error.colno}"
        raise TaskFileError(f"{where}: malformed JSON: {error.msg} at {position}") from None
    except RecursionError:
        raise TaskFileError(f"{where}: JSON nested too deeply to read") from None


def read_json(path: Path) -> Any:
    return parse_json(read_text(path), str(path))


def records_from_list(rows: list[Any], path: Path, split: str | None) -> list[Record]:
    return [record_from_row(row, path, f"item [{i}]", split=split) for i, row in enumerate(rows)]


def records_from_map(mapping: dict[str, Any], path: Path) -> list[Record]:
    rows = [({"input": key, "output": value}, f"item {key!r}") for key, value in mapping.items()]
    return [record_from_row(row, path, position) for row, position in rows]


def records_from_jsonl(path: Path) -> list[Record]:
    records = []
    for number, line in enumerate(read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        row = parse_json(line, f"{path}: line {number}")
        records.append(record_from_row(row, path, f"line {number}"))
    return records


def records_from_csv(path: Path) -> list[Record]:
    delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
    # newline="": quoted fields keep their line breaks, as csv asks of a file.
    reader = csv.DictReader(io.StringIO(read_text(path), newline=""), delimiter=delimiter)
    try:
        columns = [c.strip() for c in reader.fieldnames or []]
        for required in ("input", "output"):
            if required not in columns:
                found = ", ".join(columns) or "none"
                raise TaskFileError(f"{path}: missing column {required!r} (columns: {found})")
        records = []
        for row in reader:
            cells = {k.strip(): (v or "").strip() for k, v in row.items() if k is not None}
            records.append(record_from_row(cells, path, f"line {reader.line_num}"))
    except csv.Error as error:  # e.g. a field over csv's limit of 131072 characters
        # line_num counts the lines before the row that failed.
        raise TaskFileError(f"{path}: line {reader.line_num + 1}: unreadable CSV ({error})") from None
    return records


def split_files(path: Path) -> list[tuple[Path, str]]:
    """The paper's `{task}_{split}.json` files that belong together, in split order."""
    match = SPLIT_FILE.match(path.stem)
    if match is None:
        return [(path, "")]
    siblings = [(path.with_name(f"{match['task']}_{s}{path.suffix}"), s) for s in SPLIT_FILE_ORDER]
    return [(p, s) for p, s in siblings if p.is_file()]


def read_records(path: Path) -> tuple[list[Record], dict[str, Any]]:
    """Records of the file (and of its split siblings); also any metadata the file carries."""
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return records_from_jsonl(path), {}
    if suffix in (".csv", ".tsv"):
        return records_from_csv(path), {}
    data = read_json(path)
    if isinstance(data, list):
        records: list[Record] = []
        for file, split in split_files(path):
            rows = data if file == path else read_json(file)
            if not isinstance(rows, list):
                raise TaskFileError(f"{file}: {UNRECOGNISED}")
            records += records_from_list(rows, file, split or None)
        return records, {}
    if isinstance(data, dict) and isinstance(data.get("answers"), dict):
        return records_from_map(data["answers"], path), data
    if isinstance(data, dict) and all(isinstance(v, str | list) for v in data.values()):
        return records_from_map(data, path), {}
    raise TaskFileError(f"{path}: {UNRECOGNISED}")


def default_image_root(path: Path) -> Path:
    # The paper's image paths are relative to data/, the parent of data/annotations/.
    return path.parent.parent if path.parent.name == "annotations" else path.parent


def task_name(path: Path) -> str:
    match = SPLIT_FILE.match(path.stem)
    return match["task"] if match else path.stem


def load_task_file(
    path: str | Path,
    *,
    instruction: str | None = None,
    task_words: Sequence[str] | None = None,
    image_root: str | Path | None = None,
    strict: bool = False,
) -> Task:
    """Load an external task file; a file named like a built-in task borrows its instruction and words.

    An input given more than once becomes one item whose answers are all of its outputs, with a
    `DuplicateInputWarning`; `strict=True` raises `TaskFileError` naming the repeats instead.
    """
    file = Path(path).expanduser()
    if not file.is_file():
        raise TaskFileError(f"{file}: no such task file")
    records, meta = read_records(file)
    name = str(meta.get("name") or task_name(file))
    if (name_error := task_name_error(name)) is not None:
        raise TaskFileError(f"{file}: {name_error}")
    records = merge_duplicate_inputs(records, file=file, strict=strict)
    root = Path(image_root).expanduser() if image_root is not None else default_image_root(file)
    items = items_from_records(records, file=file, image_root=root)
    builtin = task_spec(name) if name in list_tasks() else {}
    if instruction is None:
        instruction = str(meta.get("instruction") or builtin.get("instruction") or "")
    if task_words is None:
        task_words = meta.get("task_words") or builtin.get("task_words") or ()
    splits = splits_from_records(records, file) or assign_splits([item.input for item in items])
    return Task(name, instruction, tuple(items), splits, tuple(task_words), source=str(file))
