"""One layer choice for every command: the candidate layers, the tie rule and "no layer helped"."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from conftest import tiny_handle
from run_fixtures import write_task_file
from tiny_models import save_tiny_checkpoint

import taskvec.experiments.demo as demo_module
import taskvec.function_vectors
from taskvec.cli import main
from taskvec.experiments.config import RunConfig
from taskvec.experiments.protocol.tables import format_tables, per_task_table
from taskvec.experiments.results.run_results import (
    RESULTS_FORMAT,
    ConditionResult,
    HeadEffects,
    ResultTable,
    RunMeta,
    RunResults,
    Summary,
    TableColumn,
    write_summary_csv,
)
from taskvec.function_vectors.across_modalities import ModalityComparison, Transfer, _transfer
from taskvec.intervals import Interval
from taskvec.layer_choice import (
    DEFAULT_FIRST_CANDIDATE_LAYER,
    DEFAULT_LAST_CANDIDATE_LAYER,
    NO_LAYER_HELPED,
    LayerChoice,
    choose_layer,
    choose_on_validation,
    default_candidates,
    fixed_layer,
    placement_text,
)
from taskvec.prompts import as_template, build_query_prompt
from taskvec.report import results_sections
from taskvec.report.claims import evaluate_claims
from taskvec.report.function_vector_section import function_vector_section
from taskvec.tasks import Task, load_task
from taskvec.typed_json import from_json, to_json
from taskvec.vectors import TaskVector, save_task_vector

# ---- the rule on hand-made curves ----------------------------------------------------------------


def test_the_best_mean_over_tasks_wins_and_ties_go_to_the_lowest_layer_then_the_smallest_scale() -> None:
    two_tasks = {1.0: {"a": [[0.0, 1.0, 1.0, 0.0], [0.0, 0.0, 1.0, 0.0]], "b": [[0.0, 0.5, 0.5, 0.0]]}}
    choice = choose_on_validation(two_tasks, [0, 1, 2], unpatched=None, scaled=False)
    # a: [0, .5, 1, 0] over its seeds; b: [0, .5, .5, 0]; the mean over tasks peaks at layer 2.
    assert choice.chosen == 2 and choice.validation_mean == [0.0, 0.5, 0.75, 0.0]
    assert choice.validation_per_task == {"a": [0.0, 0.5, 1.0, 0.0], "b": [0.0, 0.5, 0.5, 0.0]}
    assert choice.scale is None and choice.validation_per_scale == {}
    tie = {1.0: {"t": [[0.0, 1.0, 1.0, 0.0]]}}
    assert choose_on_validation(tie, [0, 1, 2], unpatched=None, scaled=False).chosen == 1
    per_scale = {1.0: {"t": [[0.0, 1.0, 1.0]]}, 2.0: {"t": [[1.0, 1.0, 0.0]]}}
    choice = choose_on_validation(per_scale, [0, 1, 2], unpatched={"t": 0.0}, scaled=True)
    assert (choice.chosen, choice.scale) == (0, 2.0)
    assert choice.validation_per_scale == {"1.0": [0.0, 1.0, 1.0], "2.0": [1.0, 1.0, 0.0]}
    assert choice.validation_mean == [1.0, 1.0, 0.0]
    choice = choose_on_validation(per_scale, [1, 2], unpatched={"t": 0.0}, scaled=True)
    assert (choice.chosen, choice.scale) == (1, 1.0)


def test_the_last_layer_is_not_a_candidate_by_default() -> None:
    assert (DEFAULT_FIRST_CANDIDATE_LAYER, DEFAULT_LAST_CANDIDATE_LAYER) == (0, -2)
    config = RunConfig()
    assert (config.first_candidate_layer, config.last_candidate_layer) == (0, -2)
    assert default_candidates(4) == [0, 1, 2]
    last_best = {1.0: {"t": [[0.1, 0.2, 0.3, 0.9]]}}
    assert (
        choose_on_validation(last_best, default_candidates(4), unpatched={"t": 0.0}, scaled=False).chosen == 2
    )
    assert choose_layer([0.1, 0.2, 0.9]) == 1


@pytest.mark.parametrize("unpatched", [None, {"t": 0.0}])
def test_curves_at_zero_everywhere_mean_no_layer_helped(unpatched: dict[str, float] | None) -> None:
    zeros = {scale: {"t": [[0.0, 0.0, 0.0]]} for scale in (1.0, 4.0)}
    choice = choose_on_validation(zeros, [0, 1], unpatched=unpatched, scaled=True)
    assert choice.chosen is None and not choice.helped and choice.scale is None
    assert choice.validation_at_chosen is None and choice.text == NO_LAYER_HELPED
    assert choice.validation_per_scale == {"1.0": [0.0, 0.0, 0.0], "4.0": [0.0, 0.0, 0.0]}
    assert choice.unpatched_validation == (None if unpatched is None else 0.0)


def test_a_layer_must_be_strictly_above_the_unpatched_queries() -> None:
    # Three seeds at 0.1 average to 0.1 plus rounding: still equal to the unpatched 0.1.
    equal = {1.0: {"t": [[0.0, 0.1, 0.0]] * 3}}
    choice = choose_on_validation(equal, [0, 1], unpatched={"t": 0.1}, scaled=False)
    assert choice.chosen is None and choice.unpatched_validation == 0.1
    # A sweep's curve is float32 (evaluation.layer_accuracy): 1/3 there is 1/3 of the bare queries.
    third = torch.tensor([0.0, 1.0]).div(3).tolist()
    assert third[1] > 1 / 3
    choice = choose_on_validation({1.0: {"t": [third]}}, [0, 1], unpatched={"t": 1 / 3}, scaled=False)
    assert choice.chosen is None
    above = {1.0: {"t": [[0.0, 0.2, 0.0]]}}
    choice = choose_on_validation(above, [0, 1], unpatched={"t": 0.1}, scaled=False)
    assert choice.chosen == 1 and choice.helped and choice.validation_at_chosen == 0.2
    # The reference is the unpatched mean over tasks: task a gains 0.1, task b loses 0.1.
    two_tasks = {1.0: {"a": [[0.0, 0.6, 0.0]], "b": [[0.0, 0.0, 0.0]]}}
    choice = choose_on_validation(two_tasks, [0, 1], unpatched={"a": 0.5, "b": 0.1}, scaled=False)
    assert choice.chosen is None and choice.unpatched_validation == pytest.approx(0.3)


def test_curves_that_do_not_fit_are_refused_with_one_line() -> None:
    curves = {1.0: {"t": [[0.0, 0.5, 0.0]]}}
    with pytest.raises(ValueError, match=r"unpatched accuracies cover tasks \['u'\], the curves \['t'\]"):
        choose_on_validation(curves, [0, 1], unpatched={"u": 0.0}, scaled=False)
    with pytest.raises(ValueError, match="one curve set, got 2 scales"):
        choose_on_validation({**curves, 2.0: curves[1.0]}, [0, 1], unpatched=None, scaled=False)
    with pytest.raises(ValueError, match=r"candidate layers \[3\] are outside the curves' 3 layers"):
        choose_on_validation(curves, [0, 3], unpatched=None, scaled=False)
    with pytest.raises(ValueError, match="no candidate layers"):
        choose_on_validation(curves, [], unpatched=None, scaled=False)
    with pytest.raises(ValueError, match="cover tasks"):
        choose_on_validation({**curves, 2.0: {"u": [[0.0, 0.0, 0.0]]}}, [0], unpatched=None, scaled=True)


def test_a_choice_reads_the_same_way_everywhere() -> None:
    assert placement_text(5) == "layer 5" and placement_text(5, 2.0) == "layer 5 x2"
    assert placement_text(None, 2.0) == NO_LAYER_HELPED == "no layer helped"
    assert fixed_layer(-1, 4).text == "layer 3 (given)"
    assert LayerChoice(6, [], {}, scale=4.0).text == "layer 6 x4"


def test_a_choice_without_a_layer_round_trips_through_json() -> None:
    choice = choose_on_validation({1.0: {"t": [[0.0, 0.0]]}}, [0], unpatched={"t": 0.25}, scaled=False)
    data = json.loads(json.dumps(to_json(choice)))
    assert data["chosen"] is None and data["unpatched_validation"] == 0.25
    assert from_json(LayerChoice, data) == choice
    older = {key: value for key, value in data.items() if key != "unpatched_validation"}
    assert from_json(LayerChoice, {**older, "chosen": 1}).unpatched_validation is None


# ---- tables, report and summary.csv ---------------------------------------------------------------

INTERVAL = Interval(0.1, 0.3)


def _summary(condition: str, layer: int | None, scale: float | None = None) -> Summary:
    return Summary(condition, condition, "prefix", 0.2, INTERVAL, 0.0, 1, {"t": 0.2}, 5, layer, scale=scale)


def _row(condition: str, layer: int | None) -> ConditionResult:
    return ConditionResult(condition, "vlm", "t", 0, layer, "prefix", 0.2, 5, INTERVAL, "01000")


def _results_where_no_layer_helped_text_to_text() -> RunResults:
    """No layer helped text->text (a residual vector) nor fv-text->text (a function vector)."""
    unhelped = choose_on_validation(
        {1.0: {"t": [[0.0, 0.0, 0.0]]}}, [0, 1], unpatched={"t": 0.2}, scaled=False
    )
    unhelped_fv = choose_on_validation(
        {1.0: {"t": [[0.0, 0.0, 0.0]]}, 2.0: {"t": [[0.0, 0.2, 0.0]]}},
        [0, 1],
        unpatched={"t": 0.2},
        scaled=True,
    )
    helped = choose_on_validation({1.0: {"t": [[0.0, 0.5, 0.0]]}}, [0, 1], unpatched={"t": 0.2}, scaled=False)
    summaries = [
        _summary("no-context-text", None),
        _summary("text->text", None),
        _summary("fv-text->text", None),
        _summary("image->text", 1),
    ]
    columns = [TableColumn(s.condition, s.condition, s) for s in summaries]
    meta = RunMeta("m", None, "f", "0", {}, "now", 1.0, True, 3, [s.condition for s in summaries], [], {})
    return RunResults(
        format=RESULTS_FORMAT,
        meta=meta,
        config=RunConfig(tasks=("t",)),
        tasks=["t"],
        layers={"text->text": unhelped, "fv-text->text": unhelped_fv, "image->text": helped},
        results=[_row(s.condition, s.layer) for s in summaries],
        summaries=summaries,
        tables=[ResultTable("paper", "Main table", "prefix", 1, columns)],
        floors=[],
        examples=[],
        analysis_layer=1,
        analysis_layer_source="the layer chosen for image->text",
        function_vectors=[HeadEffects("vlm", "t", "text-icl", 1, [0], [[0.1]], [[0, 0]], [[[0, 0]]], ["x"])],
    )


def test_tables_say_no_layer_helped_for_a_patched_condition_whose_rows_have_no_layer() -> None:
    results = _results_where_no_layer_helped_text_to_text()
    rows = {line.split()[0]: line for line in per_task_table(results).splitlines()[2:]}
    assert NO_LAYER_HELPED in rows["text->text"] and NO_LAYER_HELPED in rows["fv-text->text"]
    assert rows["no-context-text"].split()[1] == "-" and rows["image->text"].split()[1] == "1"
    printed = format_tables(results)
    assert "0.20 [0.10,0.30] †" in printed and "† no layer helped: no candidate layer beat" in printed


def test_the_report_says_no_layer_helped(tmp_path: Path) -> None:
    results = _results_where_no_layer_helped_text_to_text()
    writer = results_sections.FigureWriter(tmp_path)
    layers = results_sections.layer_section(results, writer)
    unhelped = html_row(layers, "text-&gt;text")
    assert NO_LAYER_HELPED in unhelped and "0.20" in unhelped  # and the unpatched accuracy it did not beat
    assert "layer 1" in html_row(layers, "image-&gt;text")
    every = results_sections.all_conditions_section(results)
    assert NO_LAYER_HELPED in html_row(every, "fv-text-&gt;text")
    assert NO_LAYER_HELPED not in html_row(every, "image-&gt;text")
    table = results_sections.result_table(results, results.tables[0])
    assert "†" in table and "no candidate layer beat the unpatched queries" in table
    fv = function_vector_section(results, writer)
    assert NO_LAYER_HELPED in html_row(fv, "fv-text-&gt;text") and "image-&gt;text" not in fv
    writer.discard()
    claim = evaluate_claims(results, None)[0]
    assert claim.verdict == "does not hold"
    assert any(NO_LAYER_HELPED in line and "(0.20)" in line for line in claim.evidence)


def html_row(html: str, first_cell: str) -> str:
    """The table row of `html` whose first cell is `first_cell`."""
    return next(row for row in html.split("<tr")[1:] if row.split("</td>")[0].endswith(f">{first_cell}"))


def test_summary_csv_leaves_the_layer_empty_where_no_layer_helped(tmp_path: Path) -> None:
    results = _results_where_no_layer_helped_text_to_text()
    write_summary_csv(results, tmp_path / "summary.csv")
    with (tmp_path / "summary.csv").open(encoding="utf-8") as handle:
        layers = {row["condition"]: row["layer"] for row in csv.DictReader(handle)}
    assert layers == {"no-context-text": "", "text->text": "", "fv-text->text": "", "image->text": "1"}


# ---- demo, heads and sweep choose by the same rule -------------------------------------------------


@pytest.fixture
def capital(tmp_path: Path) -> Task:
    return load_task(write_task_file(tmp_path / "task"))


def test_the_demo_never_takes_the_last_layer_and_skips_the_patched_test_when_no_layer_helped(
    capital: Task, monkeypatch: pytest.MonkeyPatch
) -> None:
    handle = tiny_handle("llama")  # 4 layers
    curve = [0.0, 0.9, 0.0, 1.0]  # the last layer is the best
    monkeypatch.setattr(demo_module, "sweep_accuracy", lambda *args, **kwargs: list(curve))
    result = demo_module.run_demo(handle, capital, shots=2, progress=False)
    assert result.unpatched_validation < 0.9, "the tiny model must not answer the bare queries"
    assert result.best_layer == 1 and result.candidate_layers == [0, 1, 2] and result.patched is not None
    assert result.placement == "layer 1"
    curve[:] = [result.unpatched_validation] * 4
    result = demo_module.run_demo(handle, capital, shots=2, progress=False)
    assert result.best_layer is None and result.patched is None and result.placement == NO_LAYER_HELPED


def test_heads_transfers_never_take_the_last_layer_and_are_untested_when_no_layer_helped(
    capital: Task,
) -> None:
    handle = tiny_handle("llava")  # 3 layers
    test = [build_query_prompt(item) for item in capital.split("test")]
    answers = [item.answers() for item in capital.split("test")]
    vectors = torch.zeros(handle.num_layers, handle.hidden_size)
    template = as_template("qa")
    last_best = [0.0, 0.5, 1.0]
    tv = _transfer(
        handle, "task-vector", "text", "text", vectors, {1.0: last_best}, 0.0, test, answers, template
    )
    assert (tv.layer, tv.scale, tv.placement) == (1, None, "layer 1")
    assert tv.test_accuracy is not None and tv.interval is not None and tv.test_items == len(test)
    per_scale = {1.0: last_best, 2.0: [0.0, 0.5, 1.0]}
    fv = _transfer(
        handle, "function-vector", "text", "image", vectors, per_scale, 0.0, test, answers, template
    )
    assert (fv.layer, fv.scale, fv.placement) == (1, 1.0, "layer 1 x1")
    none = _transfer(
        handle, "task-vector", "text", "text", vectors, {1.0: [0.5, 0.5, 1.0]}, 0.5, test, answers, template
    )
    assert none.layer is None and none.test_accuracy is None and none.interval is None
    assert none.placement == NO_LAYER_HELPED and none.unpatched_validation == 0.5


@pytest.fixture(scope="module")
def tiny_llava_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_checkpoint("llava", tmp_path_factory.mktemp("models") / "tiny-llava")


def test_the_demo_and_heads_commands_print_no_layer_helped(
    tiny_llava_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    task = str(write_task_file(tmp_path / "task"))
    monkeypatch.setattr(demo_module, "sweep_accuracy", lambda *args, **kwargs: [0.0, 0.0, 0.0])
    assert main(["demo", "--model", str(tiny_llava_dir), "--task", task, "--shots", "2", "--limit", "2"]) == 0
    printed = capsys.readouterr().out
    assert "patched (no layer helped)" in printed and "not tested" in printed
    assert "among layers 0-1 of 3" in printed
    untested = Transfer("function-vector", "text", "image", None, None, [0.0, 0.0, 0.0], 0.25, None, None, 6)
    comparison = ModalityComparison(
        "country-capital", 1, {"text": [], "image": []}, [], {}, {"image": 0.1}, [untested]
    )
    monkeypatch.setattr(taskvec.function_vectors, "compare_modalities", lambda *args, **kwargs: comparison)
    assert main(["heads", "--model", str(tiny_llava_dir), "--task", task, "--across-modalities"]) == 0
    printed = capsys.readouterr().out
    assert "FV text -> image" in printed and "no layer helped" in printed and "0.25" in printed
    assert (
        main(["heads", "--model", str(tiny_llava_dir), "--task", task, "--across-modalities", "--json"]) == 0
    )
    record = json.loads(capsys.readouterr().out)["transfers"][0]
    assert (
        record["placement"] == NO_LAYER_HELPED and record["layer"] is None and record["test_accuracy"] is None
    )


def test_the_sweep_command_marks_the_layer_the_run_would_choose(
    tiny_llava_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    task = str(write_task_file(tmp_path / "task"))
    handle = tiny_handle("llava")
    vector = save_task_vector(
        TaskVector(
            torch.randn(handle.num_layers, handle.hidden_size, generator=torch.Generator().manual_seed(0))
        ),
        tmp_path / "v.safetensors",
    )
    argv = ["sweep", "--model", str(tiny_llava_dir), "--task", task, "--vector", str(vector), "--limit", "3"]
    assert main([*argv, "--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["candidates"] == [0, 1] and len(record["accuracy"]) == 3
    assert 0.0 <= record["unpatched"] <= 1.0 and record["chosen"] in (None, 0, 1)
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "layer   2" in printed and "(not a candidate)" in printed.splitlines()[2]
    assert "the run's layer choice on these items: " in printed
