"""The experiments pipeline on a tiny LLaVA: typed results, intervals, floors, layer choice, resume."""

from __future__ import annotations

import csv
import dataclasses
import html
import json
from pathlib import Path

import pytest
import torch
from conftest import random_image, tiny_handle
from run_fixtures import tiny_base_lm, tiny_config, write_task_file
from tiny_models import save_tiny_checkpoint

from taskvec.caching import StepCache
from taskvec.evaluation import accuracy, generate_answers, is_correct_by
from taskvec.experiments import (
    PAPER_CONDITIONS,
    Condition,
    RunConfig,
    RunResults,
    TableSlot,
    choose_layer,
    format_tables,
    paper_conditions,
    plan_conditions,
    run_experiments,
    with_condition,
)
from taskvec.experiments.execution import steps as steps_module
from taskvec.experiments.execution.vector_store import VectorStore, run_models
from taskvec.experiments.protocol import recipes as recipes_module
from taskvec.experiments.protocol.baselines import majority_answer, model_free_floors
from taskvec.experiments.protocol.paper_numbers import PAPER_COLUMNS
from taskvec.experiments.protocol.recipes import TEXT_ICL, FunctionVector, ensemble_of, exemplar_subset_vector
from taskvec.experiments.results.run_results import RESULTS_FORMAT
from taskvec.intervals import bootstrap_interval
from taskvec.layer_choice import candidate_layers
from taskvec.prompts import build_query_prompt
from taskvec.tasks import Item, Task, load_task
from taskvec.vectors import VectorSpec, exemplar_vector, load_task_vector

Run = tuple[Path, RunConfig, RunResults]
UNPATCHED = {
    "no-context", "no-context-text", "image-icl", "text-icl", "text-icl-xbase", "instruction-prompt",
    "exemplar-0",
}  # fmt: skip
PATCHED = {
    "image->image", "text->image", "text->text", "image->text", "llm-xpatch", "instruction-patch",
    "ensemble-0", "exemplar-2", "ensemble-2", "exemplar-4", "ensemble-4", "fv-text->image",
    "fv-text->text", "fv-image->image", "fv-llm->image",
}  # fmt: skip


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory) -> Run:
    root = tmp_path_factory.mktemp("run")
    config = tiny_config(write_task_file(root / "task"))
    vlm = tiny_handle("llava")
    results = run_experiments(vlm, config, root / "out", llm=tiny_base_lm(vlm), progress=False)
    return root / "out", config, results


@pytest.fixture(scope="module")
def given_layer_run(tmp_path_factory: pytest.TempPathFactory) -> Run:
    """The run with its layer given (--layer 0): every patched condition is patched there. On the
    tiny random model no layer beats the unpatched validation queries, so `finished_run` tests its
    patched conditions unpatched ("no layer helped"); this run covers answers under a patch."""
    root = tmp_path_factory.mktemp("given-layer-run")
    config = tiny_config(write_task_file(root / "task"), seeds=(0,), ensemble_examples=(0, 2), layer_choice=0)
    vlm = tiny_handle("llava")
    results = run_experiments(vlm, config, root / "out", llm=tiny_base_lm(vlm), progress=False)
    return root / "out", config, results


def test_results_json_round_trips_into_the_typed_results(finished_run: Run) -> None:
    out, config, returned = finished_run
    data = json.loads((out / "results.json").read_text())
    assert data == json.loads(json.dumps(returned.to_json()))
    results = RunResults.read(out / "results.json")
    assert results == returned and results.config == config
    assert results.format == RESULTS_FORMAT and results.tasks == ["country-capital"]
    assert results.meta.model == "tiny-llava" and results.meta.llm == "tiny-llava-base"
    assert {"torch", "transformers"} <= set(results.meta.packages) and results.meta.model_fingerprint
    with pytest.raises(ValueError, match="format 1"):
        RunResults.from_json({**data, "format": 1})
    broken = json.loads(json.dumps(data))
    broken["tables"][0]["columns"][0]["summary"]["mean"] = "high"
    with pytest.raises(ValueError, match=r"results\.tables\[0\]\.columns\[0\]\.summary\.mean"):
        RunResults.from_json(broken)


def test_every_result_has_its_interval_layer_and_own_answer_share(finished_run: Run) -> None:
    _, _, results = finished_run
    assert {row.condition for row in results.results} == UNPATCHED | PATCHED
    for row in results.results:
        assert row.n == 6 and len(row.hits) == 6 and row.accuracy == row.hits.count("1") / 6
        assert row.interval.low <= row.accuracy <= row.interval.high
        choice = results.layers.get(row.condition)
        assert (choice is None) == (row.condition in UNPATCHED)
        # A patched condition is tested at its chosen layer, or unpatched where no layer helped.
        assert row.layer == (choice.chosen if choice is not None else None)
        assert (row.vector_answer_share is None) == (row.layer is None)
    assert {row.seed for row in results.results if row.condition == "text->image"} == {0, 1}
    assert {row.seed for row in results.results if row.condition == "no-context"} == {None}
    assert {row.model for row in results.results if row.condition == "llm-xpatch"} == {"llm"}
    for summary in results.summaries:
        assert summary.interval.low <= summary.mean <= summary.interval.high
    assert results.summary("ensemble-2").metric == "prefix_ignore_case"  # type: ignore[union-attr]
    assert results.summary("text->image").metric == "prefix"  # type: ignore[union-attr]


def test_tables_place_conditions_by_their_slots_beside_the_paper(finished_run: Run) -> None:
    _, _, results = finished_run
    assert [table.id for table in results.tables] == [
        "paper",
        "directions",
        "llm_to_vlm",
        "function_vectors",
        "instruction",
        "ensemble",
    ]
    paper, directions = results.table("paper"), results.table("directions")
    assert paper is not None and directions is not None
    assert tuple(c.column for c in paper.columns) == PAPER_COLUMNS  # in the paper's order
    assert {c.column for c in directions.columns} == {
        "text->text",
        "text->image",
        "image->image",
        "image->text",
    }
    assert directions.column("text->image").summary == paper.column("text-icl-xpatch").summary  # type: ignore[union-attr]
    assert paper.paper["Idefics2-8B"]["text-icl-xpatch"] == 0.51 and paper.max_new_tokens == 2
    assert [floor.name for floor in paper.floors] == ["majority_answer", "copy_input"]
    ensemble = results.table("ensemble")
    assert ensemble is not None and ensemble.curve and ensemble.metric == "prefix_ignore_case"
    assert [c.x for c in ensemble.series("exemplar")] == [0, 2, 4]
    cosine = results.vector_cosine
    # The base LM is the VLM's own language model and text prompts have no image: identical vectors.
    assert cosine is not None and cosine.per_layer == pytest.approx([1.0] * 3, abs=1e-4)
    assert cosine.layer == results.layers["llm-xpatch"].chosen
    assert cosine.at_layer == (None if cosine.layer is None else pytest.approx(1.0, abs=1e-4))
    text = format_tables(results)
    assert "Idefics2-8B" in text and "ours (tiny-llava)" in text and "2 generated tokens" in text
    assert "copy" in text and "majority" in text and "[95% bootstrap interval" in text


def test_layer_choice_stays_in_the_candidate_range(finished_run: Run) -> None:
    _, _, results = finished_run
    layers = results.layers
    assert set(layers) >= PATCHED
    assert layers["exemplar-2"].shared_from == "exemplar-4" and layers["exemplar-2"].validation_mean == []
    assert layers["ensemble-2"].chosen == layers["ensemble-4"].chosen
    for choice in (choice for choice in layers.values() if choice.shared_from is None):
        assert len(choice.validation_mean) == 3 and choice.candidates == [0, 1]
        assert set(choice.validation_per_task) == {"country-capital"}
        # A layer is chosen only where one (at any scale) beats the unpatched validation queries.
        curves = [*choice.validation_per_scale.values()] or [choice.validation_mean]
        assert choice.unpatched_validation is not None
        helped = max(curve[layer] for curve in curves for layer in [0, 1]) > choice.unpatched_validation
        assert choice.helped == helped
        assert choice.chosen == (choose_layer(choice.validation_mean, [0, 1]) if helped else None)
    ranked = sorted(
        (c for c in PAPER_CONDITIONS if c.analysis_layer_rank is not None),
        key=lambda c: c.analysis_layer_rank or 0,
    )
    chosen = [layers[c.name].chosen for c in ranked if layers[c.name].chosen is not None]
    assert results.analysis_layer == (chosen[0] if chosen else 3 // 2)  # else the middle layer


def test_summary_csv_has_one_row_per_result_with_its_interval(finished_run: Run) -> None:
    out, _, results = finished_run
    with (out / "summary.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == len(results.results)
    assert {"low", "high", "label", "vector_answer_share", "max_new_tokens"} <= set(rows[0])
    assert (out / "vectors/vlm/country-capital/text-icl-seed1.safetensors").is_file()
    assert (out / "vectors/vlm/country-capital/instruction-seed0.safetensors").is_file()
    assert (out / "vectors/llm/country-capital/text-icl-seed0.safetensors").is_file()


def test_saved_vectors_follow_the_protocol_and_test_answers_are_patched_at_the_chosen_layer(
    finished_run: Run,
) -> None:
    out, config, _ = finished_run
    handle, task = tiny_handle("llava"), load_task(config.tasks[0])
    saved = load_task_vector(out / "vectors/vlm/country-capital/image-icl-seed1.safetensors")
    reference = exemplar_vector(handle, task, shots=2, seed=1, modality="image")
    torch.testing.assert_close(saved.vectors, reference.vectors, atol=1e-5, rtol=1e-4)
    assert saved.metadata["spec"] == "image-icl" and saved.metadata["cache_key"]
    _assert_text_to_image_answers_are_patched_at_its_layer(finished_run)


def test_a_given_layer_patches_every_patched_condition_there(given_layer_run: Run) -> None:
    _, _, results = given_layer_run
    for row in results.results:
        patched = row.condition not in UNPATCHED
        assert (row.layer == 0) == patched and (row.vector_answer_share is not None) == patched
    assert results.analysis_layer == 0
    cosine = results.vector_cosine
    assert cosine is not None and (cosine.layer, cosine.at_layer) == (0, pytest.approx(1.0, abs=1e-4))
    assert _assert_text_to_image_answers_are_patched_at_its_layer(given_layer_run) == 0


def _assert_text_to_image_answers_are_patched_at_its_layer(run: Run) -> int | None:
    """text->image's test answers (seed 0) are the text-ICL vector patched at its layer, or the
    unpatched answers where no layer helped; its layer."""
    out, config, results = run
    handle, task = tiny_handle("llava"), load_task(config.tasks[0])
    layer = results.layers["text->image"].chosen
    queries = [build_query_prompt(item, modality="image") for item in task.split("test")]
    unpatched = generate_answers(handle, queries, max_new_tokens=2)
    expected = unpatched
    if layer is not None:
        vector = load_task_vector(out / "vectors/vlm/country-capital/text-icl-seed0.safetensors")
        expected = generate_answers(handle, queries, vector=vector.at(layer), layer=layer, max_new_tokens=2)
        assert expected != unpatched, "the tiny model should answer differently under the patch"
    answers = [item.answers() for item in task.split("test")]
    row = next(r for r in results.results if (r.condition, r.seed, r.metric) == ("text->image", 0, "prefix"))
    assert row.layer == layer and row.accuracy == accuracy(expected, answers)
    examples = [e for e in results.examples if e.condition == "text->image"]
    assert [e.generated for e in examples] == expected[:2]
    return layer


def test_patching_the_last_layer_gives_the_vectors_own_answer_whatever_the_query(tmp_path: Path) -> None:
    # The layer is given: on the tiny random model no candidate beats the unpatched queries.
    config = tiny_config(write_task_file(tmp_path / "task"), seeds=(0,), layer_choice=-1, max_new_tokens=1)
    vlm = tiny_handle("llava")
    results = run_experiments(vlm, config, tmp_path / "out", progress=False)
    # Function vectors are added, not replaced: their answers still depend on the query there.
    patched = [s for s in results.summaries if s.vector_answer_share is not None and s.scale is None]
    assert patched and all(s.layer == 2 and s.vector_answer_share == 1.0 for s in patched)
    # Every answer is the vector's own token, so answering that token everywhere scores the same.
    assert all(s.vector_answer_accuracy == pytest.approx(s.mean) for s in patched)
    assert all(s.query_independent(config.query_independent_share) for s in patched)
    assert "*" in format_tables(results)


def test_a_rerun_resumes_from_the_run_directory(finished_run: Run, monkeypatch: pytest.MonkeyPatch) -> None:
    out, config, first = finished_run

    def must_not_run(*args: object, **kwargs: object) -> object:
        raise AssertionError("a finished step was recomputed")

    for module, name in (
        (steps_module, "generate_answers"),
        (steps_module, "generate_patched_answers"),
        (steps_module, "sweep_first_tokens_of_vectors"),
        (recipes_module, "extract_vector"),
        (recipes_module, "find_function_vector"),
    ):
        monkeypatch.setattr(module, name, must_not_run)
    vlm = tiny_handle("llava")
    again = run_experiments(vlm, config, out, llm=tiny_base_lm(vlm), progress=False)
    assert again.results == first.results and again.layers == first.layers
    assert again.meta.steps["computed"] == 0 and again.meta.steps["vectors_extracted"] == 0


def test_an_added_condition_of_an_existing_recipe_reaches_results_csv_and_report(tmp_path: Path) -> None:
    from taskvec.report import write_report

    slot = TableSlot("directions", "text->image (dummy)")
    condition = Condition(
        "text->image-x2", "a copy of text->image", "image", vector=TEXT_ICL, seeded=True, tables=(slot,)
    )
    config = tiny_config(write_task_file(tmp_path / "task"), seeds=(0,), ensemble_examples=(0,))
    conditions = with_condition(paper_conditions(config), condition)
    results = run_experiments(
        tiny_handle("llava"), config, tmp_path / "out", progress=False, conditions=conditions
    )
    assert any(row.condition == "text->image-x2" for row in results.results)
    directions = results.table("directions")
    assert directions is not None and directions.column("text->image (dummy)") is not None
    assert "text->image-x2" in (tmp_path / "out" / "summary.csv").read_text()
    assert html.escape("text->image (dummy)") in write_report(tmp_path / "out").read_text()


def test_a_changed_option_does_not_reuse_stale_steps(tmp_path: Path) -> None:
    cache = StepCache(tmp_path)
    config = tiny_config(write_task_file(tmp_path / "task"))
    handle, task = tiny_handle("llava"), load_task(config.tasks[0])
    store = VectorStore(tmp_path, config, cache, run_models(handle, None), progress=False)
    base = TEXT_ICL.identity(store, task, 0, inputs=[])
    assert isinstance(base, dict) and store.key(TEXT_ICL, task, 0) == cache.key(base)
    assert cache.key(base) == cache.key(dict(base))
    assert cache.key(base) == cache.key({**base, "spec": VectorSpec.TEXT_ICL})  # the enum keys like its value
    other_config = config.with_options(
        prompts=dataclasses.replace(config.prompts, shots=3), ensemble_examples=(0, 3)
    )
    other_store = VectorStore(tmp_path, other_config, cache, run_models(handle, None), progress=False)
    assert other_store.key(TEXT_ICL, task, 0) != store.key(TEXT_ICL, task, 0)
    assert store.key(TEXT_ICL, task, 1) != store.key(TEXT_ICL, task, 0)
    other_model = tiny_handle("llava")  # same name, other weights
    with torch.no_grad():
        next(other_model.model.parameters()).add_(1.0)
    other_weights = VectorStore(tmp_path, config, cache, run_models(other_model, None), progress=False)
    assert other_weights.key(TEXT_ICL, task, 0) != store.key(TEXT_ICL, task, 0)
    runner = steps_module.StepRunner(handle, None, config, cache, store, progress=False)
    changed = steps_module.StepRunner(handle, None, config.with_options(test_limit=3), cache, store, False)
    condition = next(c for c in plan_conditions(handle, [task], config, None)[0] if c.name == "no-context")
    step = steps_module.TestStep(condition, None)
    first, second = runner.test(step, task), changed.test(step, task)
    assert len(first.generated) == 6 and len(second.generated) == 3


def test_layer_choice_takes_the_best_mean_and_the_lowest_layer_on_ties() -> None:
    assert choose_layer([0.1, 0.5, 0.3]) == 1
    assert choose_layer([0.2, 0.6, 0.6, 0.1]) == 1
    assert choose_layer([0.0, 0.0]) == 0
    assert choose_layer([0.1, 0.2, 0.9], [0, 1]) == 1
    assert candidate_layers(0, -2, 18) == list(range(17)) and candidate_layers(-1, -1, 3) == [2]
    with pytest.raises(ValueError):
        choose_layer([])
    with pytest.raises(ValueError, match="no candidate layers"):
        candidate_layers(5, 2, 18)


def test_bootstrap_intervals_are_seeded_and_cover_the_mean() -> None:
    hits = {"a": [[True, False, True, True]], "b": [[False] * 4]}
    interval = bootstrap_interval(hits, samples=500)
    assert interval == bootstrap_interval(hits, samples=500)
    assert interval.low <= 0.375 <= interval.high and interval.low < interval.high
    assert bootstrap_interval({"a": [[True] * 5]}).low == 1.0
    # Seeds share their items: two identical seeds give the interval of one.
    assert bootstrap_interval({"a": [[True, False, True, True]] * 2}, samples=500) == bootstrap_interval(
        {"a": [[True, False, True, True]]}, samples=500
    )


def test_floors_score_the_majority_answer_and_copying_the_input() -> None:
    items = tuple(
        Item(word, answer)
        for word, answer in (
            ("chick", "chicken"),
            ("cat", "kitten"),
            ("dog", "puppy"),
            ("cow", "calf"),
            ("duck", "duckling"),
            ("pig", "piglet"),
            ("owl", "owlet"),
            ("ant", "antling"),
        )
    )
    task = Task("young", "", items, {"val": (0, 1, 2, 3), "test": (4, 5, 6, 7)})
    majority, copy_input = model_free_floors([task], metric="prefix", test_limit=None, samples=200)
    assert copy_input.per_task["young"] == 1.0  # every test output starts with its input
    assert majority.answers == {"young": majority_answer(task)} and majority.per_task["young"] == 0.0


def test_ensemble_uses_whole_prompts_seeded_and_averages_with_the_instruction() -> None:
    per_prompt = torch.arange(10 * 3 * 2, dtype=torch.float32).reshape(10, 3, 2)
    five = exemplar_subset_vector(per_prompt, 5, shots=5, seed=0)
    assert any(torch.equal(five, per_prompt[i]) for i in range(10)), "n=5 is one 5-shot prompt"
    thirty = exemplar_subset_vector(per_prompt, 30, shots=5, seed=0)
    matches = [
        torch.allclose(thirty, per_prompt[list(chosen)].mean(0))
        for chosen in [sorted(__import__("random").Random(0).sample(range(10), 6))]
    ]
    assert matches == [True]
    assert torch.equal(
        exemplar_subset_vector(per_prompt, 10, 5, seed=3), exemplar_subset_vector(per_prompt, 10, 5, 3)
    )
    assert not torch.equal(
        exemplar_subset_vector(per_prompt, 10, 5, 0), exemplar_subset_vector(per_prompt, 10, 5, 1)
    )
    torch.testing.assert_close(exemplar_subset_vector(per_prompt, 50, 5, 0), per_prompt.mean(0))
    with pytest.raises(ValueError, match="whole number"):
        exemplar_subset_vector(per_prompt, 7, 5, 0)
    with pytest.raises(ValueError, match="11 prompts"):
        exemplar_subset_vector(per_prompt, 55, 5, 0)
    torch.testing.assert_close(ensemble_of(torch.ones(3, 2), torch.zeros(3, 2)), torch.full((3, 2), 0.5))


@pytest.mark.parametrize(
    ("generated", "metric", "expected"),
    [
        ("Paris", "prefix", True),
        ("paris", "prefix", False),
        ("paris", "prefix_ignore_case", True),
        ("Paris is", "exact", False),
        (" Paris ", "exact", True),
        ("Par", "exact", False),
        ("Par", "prefix", True),
        ("", "exact", False),
    ],
)
def test_metric_variants(generated: str, metric: str, expected: bool) -> None:
    assert is_correct_by(generated, ["Paris"], metric) is expected


def test_config_rejects_what_the_protocol_cannot_do() -> None:
    with pytest.raises(ValueError, match="multiples of shots"):
        RunConfig(ensemble_examples=(0, 7))
    with pytest.raises(ValueError, match="layer_choice"):
        RunConfig(layer_choice="test")  # type: ignore[arg-type]
    quick = RunConfig.quick_preset()
    assert quick.quick and quick.tasks == ("country-capital", "animal-latin") and quick.seeds == (0,)
    assert RunConfig(styles={"country": "twemoji"}).style_for("country-capital") == "twemoji"


def test_text_only_model_skips_image_conditions_with_a_note(tmp_path: Path) -> None:
    config = tiny_config(write_task_file(tmp_path), seeds=(0,), ensemble_examples=(0, 2))
    handle = tiny_handle("gemma3_text")
    conditions, notes = plan_conditions(handle, [load_task(config.tasks[0])], config, None)
    names = [c.name for c in conditions]
    assert names == [
        "no-context-text", "text-icl", "text->text", "fv-text->text", "instruction-patch",
        "instruction-prompt", "exemplar-0", "ensemble-0", "exemplar-2", "ensemble-2",
    ]  # fmt: skip
    assert all(c.query == "text" for c in conditions)
    assert any("text-only" in note for note in notes)


def test_cli_run_quick_on_a_saved_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from taskvec.cli import main

    model_dir = save_tiny_checkpoint("llava", tmp_path / "tiny-llava")
    task_file = write_task_file(tmp_path / "task")
    out = tmp_path / "run"
    argv = ["run", "--model", str(model_dir), "--llm", "none", "--tasks", str(task_file), "--quick"]
    argv += ["--shots", "2", "--ensemble-examples", "0", "2", "--out", str(out), "--no-analyses"]
    capsys.readouterr()
    assert main(argv) == 0
    captured = capsys.readouterr()
    printed = captured.out
    assert "Main table" in printed and "text-icl-xpatch" in printed and "no base LM given" in printed
    # Off a terminal (captured here, as in a log file) each stage is one line, no redrawn bar frames.
    assert "\r" not in captured.err
    stages = [line for line in captured.err.splitlines() if line.startswith(("vectors:", "test, tasks:"))]
    assert len(stages) >= 2 and all(line.endswith(" s") for line in stages), captured.err
    results = json.loads((out / "results.json").read_text())
    assert results["meta"]["quick"] and results["meta"]["llm"] is None
    assert main(["run", "--model", str(model_dir), "--tasks", "no-such-task", "--out", str(out)]) == 2
    assert "unknown task 'no-such-task'" in capsys.readouterr().err
    argv = ["run", "--model", str(model_dir), "--tasks", str(task_file), "--style", "country=noto"]
    assert main([*argv, "--out", str(out)]) == 2
    assert "no image style 'noto'" in capsys.readouterr().err


def test_layer_sweeps_use_the_first_seeds_vectors_unless_asked_for_all(
    finished_run: Run, tmp_path: Path
) -> None:
    out, config, _ = finished_run
    vlm = tiny_handle("llava")
    every = config.with_options(layer_sweep_seeds=None)
    run_experiments(vlm, every, tmp_path, llm=tiny_base_lm(vlm), progress=False)
    default_sweeps = len(list((out / "cache" / "sweeps").rglob("*.json")))
    all_sweeps = len(list((tmp_path / "cache" / "sweeps").rglob("*.json")))
    # Seeded swept conditions: the four directions' sources, llm-xpatch and the curve's largest n of
    # each kind; with 2 seeds, sweeping every seed adds one sweep for each of those 7 (function
    # vectors have the first seed only, see fv_seeds).
    assert config.seeds == (0, 1) and all_sweeps - default_sweeps == 7


def test_majority_answer_floor_scores_the_most_frequent_validation_answer() -> None:
    from collections import Counter

    task = load_task("food-flavor")
    counts = Counter(item.output for item in task.split("val"))
    answer = majority_answer(task)
    assert counts[answer] == max(counts.values())
    test = task.split("test")
    expected = sum(answer in item.answers() for item in test) / len(test)
    majority, _ = model_free_floors([task], metric="exact", test_limit=None)
    assert majority.answers == {"food-flavor": answer}
    assert majority.per_task["food-flavor"] == pytest.approx(expected) and majority.mean > 0.1
    assert majority.interval.low <= majority.mean <= majority.interval.high


def test_results_carry_both_floors_at_the_run_metric(finished_run: Run) -> None:
    _, _, results = finished_run
    assert [floor.name for floor in results.floors] == ["majority_answer", "copy_input"]
    assert all(
        set(floor.per_task) == {"country-capital"} and floor.metric == "prefix" for floor in results.floors
    )
    assert "floors (no model)" in format_tables(results)


def test_generated_answers_do_not_depend_on_the_batch_size() -> None:
    """Bare queries run in larger batches than in-context prompts (query_batch_size): left padding
    of prompts of different lengths must not change a patched answer."""
    from taskvec.prompts import Prompt

    handle = tiny_handle("llava")
    prompts = [
        Prompt("Q:France\nA:"),
        Prompt("The capital of the country:\nQ:Japan\nA:"),
        Prompt("Q:<image>\nA:", (random_image(1),)),
        Prompt("Q:Italy Spain Peru\nA:"),
        Prompt("Q:<image>\nA:", (random_image(2),)),
    ]
    vector = torch.randn(handle.hidden_size, generator=torch.Generator().manual_seed(0))
    one = generate_answers(handle, prompts, vector=vector, layer=1, max_new_tokens=3, batch_size=1)
    together = generate_answers(handle, prompts, vector=vector, layer=1, max_new_tokens=3, batch_size=5)
    assert together == one
    assert generate_answers(handle, prompts, max_new_tokens=3, batch_size=5) != one  # the patch acts


def test_patched_conditions_asking_the_same_queries_share_one_pass_and_equal_their_steps_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from taskvec.experiments.execution.steps import StepRunner, TestStep
    from taskvec.experiments.protocol.conditions import plan_conditions as plan

    config = tiny_config(write_task_file(tmp_path / "task"), seeds=(0, 1))
    vlm = tiny_handle("llava")
    task = load_task(config.tasks[0])
    conditions, _ = plan(vlm, [task], config, None)
    bare = [c for c in conditions if c.patched and c.demos is None and not c.instruction_prompt]
    by_query = {query: [c for c in bare if c.query == query] for query in ("text", "image")}
    assert all(len(group) >= 2 for group in by_query.values()), "the test needs conditions to share"
    work = [
        TestStep(c, seed, 1, 4.0 if isinstance(c.vector, FunctionVector) else 1.0)
        for c in bare
        for seed in config.seeds
    ]

    def runner(directory: Path) -> StepRunner:
        cache = StepCache(directory / "cache")
        store = VectorStore(directory, config, cache, run_models(vlm, None), False)
        return StepRunner(vlm, None, config, cache, store, False)

    passes: list[int] = []
    shared_pass = steps_module.generate_patched_answers

    def counted(*args: object, **kwargs: object) -> object:
        passes.append(len(args[2]))  # type: ignore[arg-type]
        return shared_pass(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(steps_module, "generate_patched_answers", counted)
    together = runner(tmp_path / "together").tests(task, work)
    assert sorted(passes) == sorted(2 * len(group) for group in by_query.values()), "one pass per query set"
    alone = [runner(tmp_path / f"alone-{i}").test(step, task) for i, step in enumerate(work)]
    for shared, single in zip(together, alone, strict=True):
        assert shared.generated == single.generated and shared.first_tokens == single.first_tokens
    sweep_work = [(c, seed) for c in bare for seed in config.seeds]
    swept = runner(tmp_path / "together").sweeps(task, sweep_work)
    for (condition, seed), shared in zip(sweep_work, swept, strict=True):
        single = runner(tmp_path / f"sweep-{condition.name}-{seed}").sweep(condition, task, seed)
        assert shared.tokens_per_scale == single.tokens_per_scale and shared.unpatched == single.unpatched


def test_unpatched_steps_of_one_key_are_answered_by_one_pass(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """no-context and a condition no layer helped ask the very same unpatched queries: one pass."""
    from taskvec.experiments.execution.steps import StepRunner, TestStep
    from taskvec.experiments.protocol.conditions import NO_CONTEXT, TEXT_TO_IMAGE

    config = tiny_config(write_task_file(tmp_path / "task"), seeds=(0,))
    vlm, task = tiny_handle("llava"), load_task(config.tasks[0])
    cache = StepCache(tmp_path / "cache")
    runner = StepRunner(
        vlm, None, config, cache, VectorStore(tmp_path, config, cache, run_models(vlm, None)), False
    )
    passes: list[int] = []
    unpatched_pass = steps_module.generate_answers

    def counted(*args: object, **kwargs: object) -> object:
        passes.append(1)
        return unpatched_pass(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(steps_module, "generate_answers", counted)
    work = [TestStep(NO_CONTEXT, None), TestStep(TEXT_TO_IMAGE, 0, None)]
    assert runner.test_key(work[0], task)[1] == runner.test_key(work[1], task)[1]
    no_context, no_layer = runner.tests(task, work)
    assert passes == [1]
    assert no_context.generated == no_layer.generated and no_context.first_tokens == no_layer.first_tokens
