"""External task files: every format round-trips, every kind of bad file fails with a clear message."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from PIL import Image

from taskvec.tasks import Task, TaskFileError, load_task

ROWS = [
    {"input": "France", "output": "Paris"},
    {"input": "Ukraine", "output": "Kyiv", "aliases": ["Kiev"]},
    {"input": "Japan", "output": "Tokyo"},
    {"input": "Peru", "output": "Lima"},
]


def write_png(path: Path, color: str = "red") -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 6), color).save(path)
    return path.name


def answers(task: Task) -> dict[str, tuple[str, ...]]:
    return {item.input: item.answers() for item in task.items}


EXPECTED = {"France": ("Paris",), "Ukraine": ("Kyiv", "Kiev"), "Japan": ("Tokyo",), "Peru": ("Lima",)}


def paper_layout(root: Path, task: str = "country-capital") -> Path:
    """data/annotations/{task}_{val|test}.json with images relative to data/."""
    data = root / "data"
    rows = []
    for row in ROWS:
        write_png(data / "images" / f"{row['input']}.png")
        rows.append({"input": row["input"], "image": f"images/{row['input']}.png", "output": row["output"]})
    (data / "annotations").mkdir(parents=True)
    (data / "annotations" / f"{task}_val.json").write_text(json.dumps(rows[:2]))
    (data / "annotations" / f"{task}_test.json").write_text(json.dumps(rows[2:]))
    return data / "annotations" / f"{task}_val.json"


def test_paper_annotations_round_trip(tmp_path: Path) -> None:
    task = load_task(str(paper_layout(tmp_path)))
    assert task.name == "country-capital"
    assert task.instruction == "The capital city of the country:"  # borrowed from the built-in task
    assert task.task_words == ("capital",)
    assert [i.input for i in task.split("val")] == ["France", "Ukraine"]
    assert [i.input for i in task.split("test")] == ["Japan", "Peru"]
    assert task.styles() == ["image"] and task.has_images
    image = task.items[0].image()
    assert image == (tmp_path / "data" / "images" / "France.png").resolve()
    assert task.source.endswith("country-capital_val.json")


def test_todd_list_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "country-capital.json"
    path.write_text(json.dumps([{"input": r["input"], "output": r["output"]} for r in ROWS]))
    task = load_task(path)
    assert {i.input: i.output for i in task.items} == {k: v[0] for k, v in EXPECTED.items()}
    assert not task.has_images and task.styles() == []
    assert set(task.splits) >= {"val", "test"}


def test_hendel_map_round_trip_with_alias_lists(tmp_path: Path) -> None:
    path = tmp_path / "my_task.json"
    path.write_text(json.dumps({k: list(v) if len(v) > 1 else v[0] for k, v in EXPECTED.items()}))
    task = load_task(path, instruction="Capital:", task_words=["capital"])
    assert answers(task) == EXPECTED
    assert task.name == "my_task" and task.instruction == "Capital:" and task.task_words == ("capital",)


def test_taskvec_format_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "t.json"
    path.write_text(
        json.dumps(
            {
                "name": "caps",
                "instruction": "Capital:",
                "task_words": ["capital"],
                "answers": {k: list(v) for k, v in EXPECTED.items()},
            }
        )
    )
    task = load_task(path)
    assert answers(task) == EXPECTED and task.name == "caps" and task.instruction == "Capital:"


def test_jsonl_round_trip_with_images_and_splits(tmp_path: Path) -> None:
    lines = []
    for row, split in zip(ROWS, ["val", "val", "test", "train"], strict=True):
        image = write_png(tmp_path / f"{row['input']}.png")
        lines.append(json.dumps({**row, "image": image, "split": split}))
    path = tmp_path / "caps.jsonl"
    path.write_text("\n".join(lines) + "\n\n")
    task = load_task(path)
    assert answers(task) == EXPECTED
    assert {name: len(ix) for name, ix in task.splits.items()} == {"val": 2, "test": 1, "train": 1}
    assert task.items[1].image("image").name == "Ukraine.png"


def test_csv_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "caps.csv"
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["input", "output", "aliases", "image"])
        writer.writeheader()
        for row in ROWS:
            writer.writerow(
                {
                    "input": row["input"],
                    "output": row["output"],
                    "aliases": "|".join(row.get("aliases", [])),
                    "image": write_png(tmp_path / "img" / f"{row['input']}.png"),
                }
            )
    task = load_task(path, image_root=tmp_path / "img")
    assert answers(task) == EXPECTED
    assert all(item.image().is_file() for item in task.items)


def test_tsv_without_images(tmp_path: Path) -> None:
    path = tmp_path / "caps.tsv"
    path.write_text("input\toutput\nFrance\tParis\nJapan\tTokyo\n")
    assert answers(load_task(path)) == {"France": ("Paris",), "Japan": ("Tokyo",)}


def test_malformed_json_names_file_and_position(tmp_path: Path) -> None:
    path = tmp_path / "bad.json"
    path.write_text('[{"input": "France", "output": "Paris"},]')
    with pytest.raises(TaskFileError, match=r"bad\.json: malformed JSON: .* line 1 column"):
        load_task(path)


def test_malformed_jsonl_names_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"input": "France", "output": "Paris"}\n{"input": "Japan", \n')
    with pytest.raises(TaskFileError, match=r"bad\.jsonl: line 2: malformed JSON"):
        load_task(path)


def test_unrecognised_structure(tmp_path: Path) -> None:
    path = tmp_path / "odd.json"
    path.write_text(json.dumps({"France": {"capital": "Paris"}}))
    with pytest.raises(TaskFileError, match=r"odd\.json: unrecognised task file"):
        load_task(path)


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({"input": "Japan"}, r"item \[1\] \(input 'Japan'\): missing field 'output'"),
        ({"output": "Tokyo"}, r"item \[1\]: missing field 'input'"),
        ({"input": "Japan", "output": 3}, r"item \[1\] \(input 'Japan'\): field 'output' must be a string"),
        ("Japan", r"item \[1\]: expected an object"),
    ],
)
def test_missing_or_wrong_fields_name_the_item(tmp_path: Path, row: object, message: str) -> None:
    path = tmp_path / "fields.json"
    path.write_text(json.dumps([ROWS[0], row]))
    with pytest.raises(TaskFileError, match=r"fields\.json: " + message):
        load_task(path)


def test_csv_missing_column(tmp_path: Path) -> None:
    path = tmp_path / "cols.csv"
    path.write_text("input,answer\nFrance,Paris\n")
    with pytest.raises(TaskFileError, match=r"cols\.csv: missing column 'output' \(columns: input, answer\)"):
        load_task(path)


def test_csv_empty_output_names_line(tmp_path: Path) -> None:
    path = tmp_path / "rows.csv"
    path.write_text("input,output\nFrance,Paris\nJapan,\n")
    with pytest.raises(TaskFileError, match=r"rows\.csv: line 3 \(input 'Japan'\): missing field 'output'"):
        load_task(path)


def test_missing_image_names_item_and_path(tmp_path: Path) -> None:
    annotations = paper_layout(tmp_path)
    (tmp_path / "data" / "images" / "Japan.png").unlink()
    with pytest.raises(
        TaskFileError,
        match=r"country-capital_test\.json: item \[0\] \(input 'Japan'\): "
        r"image not found: .*Japan\.png",
    ):
        load_task(annotations)


def test_unreadable_image_names_item(tmp_path: Path) -> None:
    annotations = paper_layout(tmp_path)
    (tmp_path / "data" / "images" / "Ukraine.png").write_bytes(b"not a picture")
    message = r"item \[1\] \(input 'Ukraine'\): image cannot be read: .*Ukraine\.png"
    with pytest.raises(TaskFileError, match=message):
        load_task(annotations)


@pytest.mark.parametrize(
    ("name", "content"),
    [("empty.json", "[]"), ("empty.jsonl", "\n"), ("empty.csv", "input,output\n"), ("empty_map.json", "{}")],
)
def test_empty_task(tmp_path: Path, name: str, content: str) -> None:
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(TaskFileError, match=rf"{name.replace('.', '[.]')}: no items \(empty task\)"):
        load_task(path)


def test_duplicate_inputs_name_both_items(tmp_path: Path) -> None:
    path = tmp_path / "dups.json"
    path.write_text(json.dumps([*ROWS, {"input": "Japan", "output": "Edo"}]))
    with pytest.raises(
        TaskFileError,
        match=r"item \[4\] \(input 'Japan'\): duplicate input 'Japan' "
        r"\(first at .*item \[2\].*aliases",
    ):
        load_task(path)


def test_duplicate_across_paper_split_files(tmp_path: Path) -> None:
    annotations = paper_layout(tmp_path)
    test_file = annotations.with_name("country-capital_test.json")
    rows = json.loads(test_file.read_text())
    rows.append({"input": "France", "image": "images/France.png", "output": "Paris"})
    test_file.write_text(json.dumps(rows))
    message = r"country-capital_test\.json: item \[2\] \(input 'France'\): duplicate"
    with pytest.raises(TaskFileError, match=message):
        load_task(annotations)


def test_partial_split_column(tmp_path: Path) -> None:
    path = tmp_path / "split.jsonl"
    path.write_text(json.dumps({**ROWS[0], "split": "val"}) + "\n" + json.dumps(ROWS[2]) + "\n")
    with pytest.raises(TaskFileError, match=r"line 2 \(input 'Japan'\): no split"):
        load_task(path)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(TaskFileError, match="no such file"):
        load_task(tmp_path / "nothing.json")
