"""External task files: every format round-trips, repeated inputs merge (or are refused when strict),
every kind of bad file fails with a clear message."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from PIL import Image
from tiny_models import build_tiny

from taskvec.cli import build_parser, main
from taskvec.cli.run_command import config_from_args
from taskvec.evaluation import is_correct
from taskvec.experiments.execution.runner import load_run_tasks
from taskvec.tasks import DuplicateInputWarning, Task, TaskFileError, load_task

FUNCTION_VECTORS = Path(__file__).parent / "fixtures" / "function_vectors"

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


def test_repeated_input_merges_its_outputs_into_accepted_answers_with_one_warning(tmp_path: Path) -> None:
    path = tmp_path / "dups.json"
    path.write_text(json.dumps([*ROWS, {"input": "Japan", "output": "Edo"}, ROWS[0]]))
    with pytest.warns(DuplicateInputWarning) as caught:
        task = load_task(path)
    assert len(caught) == 1
    message = str(caught[0].message)
    assert message.startswith(f"{path}: 2 inputs given more than once: ")
    assert "'Japan' at item [2] ('Tokyo') and item [4] ('Edo')" in message
    assert "'France' at item [0] ('Paris') and item [5] ('Paris')" in message
    assert "strict=True" in message and "--strict" in message
    assert answers(task) == {**EXPECTED, "Japan": ("Tokyo", "Edo")}  # identical rows kept once
    japan = next(item for item in task.items if item.input == "Japan")
    assert is_correct("Edo", japan.answers()) and is_correct("Tokyo", japan.answers())
    assert sorted(i for indices in task.splits.values() for i in indices) == list(range(len(ROWS)))


def test_strict_loading_refuses_repeated_inputs_naming_them(tmp_path: Path) -> None:
    path = tmp_path / "dups.json"
    path.write_text(json.dumps([*ROWS, {"input": "Japan", "output": "Edo"}]))
    message = (
        r"dups\.json: 1 input given more than once: 'Japan' at item \[2\] \('Tokyo'\) and item \[4\] "
        r"\('Edo'\); give each input once, with further answers as aliases"
    )
    with pytest.raises(TaskFileError, match=message):
        load_task(path, strict=True)


def test_repeats_of_aliases_merge_in_order_and_lines_are_named(tmp_path: Path) -> None:
    path = tmp_path / "dups.jsonl"
    rows = [*ROWS, {"input": "Ukraine ", "output": "Kiev", "aliases": ["Kyjiw"]}]
    path.write_text("\n".join(json.dumps(row) for row in rows))
    with pytest.warns(DuplicateInputWarning, match=r"'Ukraine' at line 2 \('Kyiv', 'Kiev'\) and line 5"):
        task = load_task(path)
    assert answers(task)["Ukraine"] == ("Kyiv", "Kiev", "Kyjiw")


def test_many_repeats_are_summarised_in_one_warning(tmp_path: Path) -> None:
    path = tmp_path / "many.csv"
    path.write_text("input,output\n" + "".join(f"w{i},a\nw{i},b\n" for i in range(8)))
    with pytest.warns(DuplicateInputWarning) as caught:
        task = load_task(path)
    assert len(caught) == 1
    message = str(caught[0].message)
    assert "8 inputs given more than once: 'w0' at line 2 ('a') and line 3 ('b');" in message
    assert "'w4'" in message and "'w5'" not in message and "; and 3 more;" in message
    assert len(task) == 8 and all(item.answers() == ("a", "b") for item in task.items)


def test_repeated_input_with_another_image_is_refused(tmp_path: Path) -> None:
    rows = [{**row, "image": write_png(tmp_path / f"{row['input']}.png")} for row in ROWS]
    rows.append({"input": "Japan", "output": "Edo", "image": write_png(tmp_path / "edo.png", "blue")})
    path = tmp_path / "pictures.jsonl"
    path.write_text("\n".join(json.dumps(row) for row in rows))
    message = r"line 5 \(input 'Japan'\): repeats the input of line 3 with another image \('edo\.png'"
    with pytest.raises(TaskFileError, match=message):
        load_task(path)


def test_repeat_across_paper_split_files_keeps_the_first_split(tmp_path: Path) -> None:
    annotations = paper_layout(tmp_path)
    test_file = annotations.with_name("country-capital_test.json")
    rows = json.loads(test_file.read_text())
    rows.append({"input": "France", "image": "images/France.png", "output": "Paris"})
    test_file.write_text(json.dumps(rows))
    with pytest.warns(DuplicateInputWarning, match=r"'France' at item \[0\] \('Paris'\) and "
                      r"country-capital_test\.json item \[2\] \('Paris'\)"):  # fmt: skip
        task = load_task(annotations)
    assert [i.input for i in task.split("val")] == ["France", "Ukraine"]
    assert [i.input for i in task.split("test")] == ["Japan", "Peru"]
    with pytest.raises(TaskFileError, match=r"country-capital_test\.json item \[2\]"):
        load_task(annotations, strict=True)


def test_todd_et_al_landmark_country_repeats_an_input() -> None:
    # An unchanged excerpt of their file (MIT; tests/fixtures/function_vectors/SOURCE.md): their items
    # 368 and 461, both "Asian Highway Network", are its items [3] and [10].
    path = FUNCTION_VECTORS / "landmark-country.json"
    with pytest.warns(DuplicateInputWarning) as caught:
        task = load_task(path)
    repeat = "'Asian Highway Network' at item [3] ('India') and item [10] ('Turkey')"
    assert len(caught) == 1 and f"1 input given more than once: {repeat}" in str(caught[0].message)
    assert len(task) == 13 and answers(task)["Asian Highway Network"] == ("India", "Turkey")
    with pytest.raises(TaskFileError, match=r"'Asian Highway Network' at item \[3\]"):
        load_task(path, strict=True)


def test_strict_flag_on_every_command_that_loads_task_files(tmp_path: Path) -> None:
    parser = build_parser()
    for argv in (
        ["demo"],
        ["extract", "--task", "t", "--out", "v"],
        ["sweep", "--vector", "v", "--task", "t"],
        ["lens", "--task", "t"],
        ["report", "dir"],
    ):
        assert parser.parse_args([*argv, "--strict"]).strict is True, argv
        assert parser.parse_args(argv).strict is False, argv
    path = tmp_path / "country-capital.json"
    path.write_text(json.dumps([*ROWS, {"input": "Japan", "output": "Edo"}]))
    config = config_from_args(parser.parse_args(["run", "--tasks", str(path), "--strict"]))
    assert config.strict
    with pytest.raises(TaskFileError, match="'Japan' at item"):
        load_run_tasks(config)


def test_cli_shows_the_warning_as_one_line_and_strict_refuses(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    tiny = build_tiny("gpt2")
    tiny.model.save_pretrained(tmp_path / "model")
    tiny.processor.save_pretrained(tmp_path / "model")
    path = tmp_path / "capitals.json"
    path.write_text(json.dumps([*ROWS, {"input": "Japan", "output": "Edo"}]))
    argv = ["extract", "--model", str(tmp_path / "model"), "--task", str(path), "--shots", "1"]
    assert main([*argv, "--out", str(tmp_path / "v.safetensors"), "--json"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["task"] == "capitals"
    warned = [line for line in captured.err.splitlines() if line.startswith("taskvec: warning:")]
    assert len(warned) == 1 and "'Japan' at item [2] ('Tokyo') and item [4] ('Edo')" in warned[0]
    assert main([*argv, "--out", str(tmp_path / "w.safetensors"), "--strict"]) == 2
    error = capsys.readouterr().err
    assert error.startswith("taskvec: error: ") and error.count("\n") == 1 and "'Japan' at item [2]" in error
    assert not (tmp_path / "w.safetensors").exists()


def test_partial_split_column(tmp_path: Path) -> None:
    path = tmp_path / "split.jsonl"
    path.write_text(json.dumps({**ROWS[0], "split": "val"}) + "\n" + json.dumps(ROWS[2]) + "\n")
    with pytest.raises(TaskFileError, match=r"line 2 \(input 'Japan'\): no split"):
        load_task(path)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(TaskFileError, match="no such file"):
        load_task(tmp_path / "nothing.json")
