"""Built-in tasks and the image bundle: splits, instructions, facts' shape, images, licences."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from taskvec.tasks import (
    PAPER_TASKS,
    Item,
    MissingImageError,
    Task,
    TaskFileError,
    list_tasks,
    load_task,
)
from taskvec.tasks.builtin import IMAGES_DIR, TASKS_DIR, entity_names, manifest, slugify, task_spec
from taskvec.tasks.splits import assign_splits
from taskvec.tasks.summary import task_summaries, task_table

PAPER_INSTRUCTIONS = {
    "country-capital": "The capital city of the country:",
    "country-currency": "The last word of the official currency of the country:",
    "animal-latin": "The scientific name of the animal's species in latin:",
    "animal-young": "The term for the baby of the animal:",
    "food-color": "The color of the food:",
    "food-flavor": "The flavor descriptor of the food:",
}
STYLE_LICENSES = {
    "flag-svg": "LicenseRef-Public-Domain",
    "flag-icons": "MIT",
    "twemoji": "CC-BY-4.0",
    "noto": "Apache-2.0",
    "openmoji": "CC-BY-SA-4.0",
    "fluent-color": "MIT",
    "fluent-flat": "MIT",
}
ALL_TASKS = list_tasks()


@pytest.fixture(scope="module")
def tasks() -> dict[str, Task]:
    return {name: load_task(name) for name in ALL_TASKS}


def test_paper_tasks_come_first_with_their_instructions(tasks: dict[str, Task]) -> None:
    assert ALL_TASKS[:6] == list(PAPER_TASKS)
    assert len(ALL_TASKS) >= 10  # the six plus further tasks over the same images
    for name, instruction in PAPER_INSTRUCTIONS.items():
        assert tasks[name].instruction == instruction


@pytest.mark.parametrize("name", ALL_TASKS)
def test_splits_val_30_disjoint_and_cover_items(name: str, tasks: dict[str, Task]) -> None:
    task = tasks[name]
    assert task.instruction and task.task_words and task.source == "builtin"
    val, test = set(task.splits["val"]), set(task.splits["test"])
    assert len(val) == 30  # every built-in task has enough entities for the paper's 30
    assert 0 < len(test) <= 100
    assert not val & test
    everything = [i for indices in task.splits.values() for i in indices]
    assert sorted(everything) == list(range(len(task.items)))
    assert len(task.splits.get("train", ())) == max(0, len(task.items) - 130)
    assert [item.input for item in task.split("val")] == [task.items[i].input for i in task.splits["val"]]


@pytest.mark.parametrize("name", ALL_TASKS)
def test_items_are_well_formed(name: str, tasks: dict[str, Task]) -> None:
    task = tasks[name]
    inputs = [item.input for item in task.items]
    assert len(set(inputs)) == len(inputs)
    for item in task.items:
        assert item.input.strip() == item.input and item.output.strip() == item.output and item.output
        assert len(set(item.answers())) == len(item.answers()), item
        assert item.answers()[0] == item.output


def test_known_facts(tasks: dict[str, Task]) -> None:
    def answers(task: str, entity: str) -> tuple[str, ...]:
        return next(item.answers() for item in tasks[task].items if item.input == entity)

    assert answers("country-capital", "France") == ("Paris",)
    assert "Kiev" in answers("country-capital", "Ukraine")
    assert answers("country-currency", "France") == ("Euro",)
    assert answers("country-currency", "Japan") == ("Yen",)
    assert answers("country-currency", "United States") == ("Dollar",)
    assert answers("animal-latin", "dog") == ("Canis lupus familiaris", "Canis familiaris")
    assert "calf" in answers("animal-young", "cow") and "joey" in answers("animal-young", "kangaroo")
    assert answers("food-color", "banana")[0] == "yellow"
    assert answers("food-flavor", "lemon")[0] == "sour"
    assert "spicy" in answers("food-flavor", "chili pepper")
    assert "fish" not in [i.input for i in tasks["animal-latin"].items]  # no clear species


def test_splits_are_stable_when_entities_are_added() -> None:
    names = [f"entity {i}" for i in range(150)]
    before = assign_splits(names)
    after = assign_splits([*names, "a new entity"])
    moved = {names[i] for i in before["val"]} ^ {([*names, "a new entity"])[i] for i in after["val"]}
    assert len(moved) <= 2  # at most the border item swaps
    assert assign_splits(names) == before


def test_task_files_reference_known_entities_and_record_drops() -> None:
    for name in ALL_TASKS:
        spec = task_spec(name)
        known = set(entity_names(spec["entities"]))
        assert set(spec["answers"]) <= known
        assert set(spec["answers"]).isdisjoint(spec["dropped"])
        assert set(spec["answers"]) | set(spec["dropped"]) == known
        assert all(reason.strip() for reason in spec["dropped"].values())


@pytest.mark.parametrize("name", ALL_TASKS)
def test_every_item_has_at_least_three_styles_that_open(name: str, tasks: dict[str, Task]) -> None:
    task = tasks[name]
    assert task.has_images and len(task.styles()) >= 3
    for item in task.items:
        assert len(item.images) >= 3
        for path in item.images.values():
            assert path.is_absolute() and path.is_file()
        assert item.image() == item.images[task.styles()[0]]


def test_every_image_opens_as_small_rgb_png() -> None:
    for record in manifest()["images"]:
        with Image.open(IMAGES_DIR / record["path"]) as picture:
            assert picture.format == "PNG" and picture.mode == "RGB", record["path"]
            assert max(picture.size) <= 128 and picture.size == (record["width"], record["height"])


def test_manifest_matches_files_and_records_licences() -> None:
    data = manifest()
    records = data["images"]
    listed = {record["path"] for record in records}
    on_disk = {p.relative_to(IMAGES_DIR).as_posix() for p in IMAGES_DIR.rglob("*.png")}
    assert listed == on_disk  # no orphan files, no missing files
    assert len(listed) == len(records)
    for record in records:
        assert record["license"] == STYLE_LICENSES[record["style"]]
        assert record["package"] and record["version"] and record["source"]
        assert record["entity"] == f"{record['entity'].split('/')[0]}/{slugify(record['name'])}"
        assert data["styles"][record["style"]]["package"] == record["package"]
    for files in data["license_files"].values():
        for relative in files:
            assert (IMAGES_DIR / relative).stat().st_size > 500
    attribution = (IMAGES_DIR / "ATTRIBUTION.md").read_text(encoding="utf-8")
    assert "CC BY-SA 4.0" in attribution and "Apple" in attribution
    assert sum(p.stat().st_size for p in IMAGES_DIR.rglob("*") if p.is_file()) < 25e6


def test_entities_have_images_in_every_family_style() -> None:
    styles_by_entity: dict[str, set[str]] = {}
    for record in manifest()["images"]:
        styles_by_entity.setdefault(record["entity"], set()).add(record["style"])
    for path in (TASKS_DIR / "entities").glob("*.json"):
        family = json.loads(path.read_text(encoding="utf-8"))["family"]
        for name in entity_names(family):
            assert len(styles_by_entity.get(f"{family}/{slugify(name)}", ())) >= 3, name


def test_item_image_errors_are_clear() -> None:
    item = Item("France", "Paris", images={"twemoji": Path("/x.png")})
    with pytest.raises(MissingImageError, match=r"'France'.*'noto'.*twemoji"):
        item.image("noto")
    with pytest.raises(MissingImageError, match="text-only"):
        Item("a", "b").image()
    assert Item("a", "b", ["c"]).aliases == ("c",)  # type: ignore[arg-type]


def test_split_and_load_errors_name_the_problem(tasks: dict[str, Task]) -> None:
    with pytest.raises(KeyError, match="no split 'dev'"):
        tasks["country-capital"].split("dev")
    with pytest.raises(TaskFileError, match="unknown task 'no-such-task'"):
        load_task("no-such-task")


def test_instruction_and_task_words_can_be_overridden() -> None:
    task = load_task("food-color", instruction="Colour:", task_words=("colour",))
    assert task.instruction == "Colour:" and task.task_words == ("colour",)


def test_summary_table_and_records() -> None:
    summaries = task_summaries()
    assert [s["name"] for s in summaries] == ALL_TASKS
    capital = summaries[0]
    assert capital["splits"]["val"] == 30 and capital["splits"]["test"] == 100
    assert set(capital["styles"]) >= {"flag-svg", "twemoji", "noto", "openmoji"}
    json.dumps(summaries)  # machine-readable
    table = task_table()
    for name in ALL_TASKS:
        assert name in table
    assert "The capital city of the country:" in table
