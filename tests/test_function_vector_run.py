"""Function-vector conditions in `taskvec run` on a tiny LLaVA: the vector is the protocol's, the
layer and scale are the best of a per-scale sweep, test answers are the vector added there, and the
head records in results.json are what the vectors hold."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from conftest import tiny_handle
from run_fixtures import tiny_base_lm, tiny_config, write_task_file

from taskvec.caching import StepCache
from taskvec.evaluation import (
    LayerPatch,
    generate_answers,
    generate_patched_answers,
    is_correct_by,
    sweep_accuracy,
    sweep_first_tokens,
)
from taskvec.experiments import RunConfig, RunResults, plan_conditions, run_experiments
from taskvec.experiments.execution.runner import load_run_tasks
from taskvec.experiments.execution.steps import StepRunner
from taskvec.experiments.execution.vector_store import VectorStore, run_models
from taskvec.experiments.protocol.recipes import FunctionVector
from taskvec.function_vectors import FunctionVectorSettings, find_function_vector, top_heads
from taskvec.prompts import build_query_prompt
from taskvec.tasks import load_task
from taskvec.vectors import load_task_vector

FUNCTION_VECTOR_CONDITIONS = {"fv-text->image", "fv-text->text", "fv-image->image", "fv-llm->image"}
Run = tuple[Path, RunConfig, RunResults]


@pytest.fixture(scope="module")
def fv_run(tmp_path_factory: pytest.TempPathFactory) -> Run:
    root = tmp_path_factory.mktemp("fv-run")
    config = tiny_config(write_task_file(root / "task"), seeds=(0,), ensemble_examples=())
    vlm = tiny_handle("llava")
    results = run_experiments(vlm, config, root / "out", llm=tiny_base_lm(vlm), progress=False)
    return root / "out", config, results


def test_function_vector_conditions_run_beside_the_residual_ones(fv_run: Run) -> None:
    _, _, results = fv_run
    assert set(results.meta.conditions) >= FUNCTION_VECTOR_CONDITIONS
    table = results.table("function_vectors")
    assert table is not None
    columns = [column.column for column in table.columns]
    assert columns[:4] == ["FV text->image", "TV text->image", "FV text->text", "TV text->text"]
    assert {"FV llm->image", "TV llm->image", "FV image->image", "TV image->image"} <= set(columns)
    for name in FUNCTION_VECTOR_CONDITIONS:
        choice = results.layers[name]
        assert set(choice.validation_per_scale) == {"1.0", "4.0"}
        # A scale is chosen with the layer; where no layer helped, neither is (tested unpatched).
        assert choice.scale in ((1.0, 4.0) if choice.helped else (None,))
        assert all(row.scale == choice.scale for row in results.results if row.condition == name)
    assert results.layers["text->image"].scale is None  # a residual task vector is not scaled


def test_saved_function_vector_is_the_protocols(fv_run: Run) -> None:
    out, config, _ = fv_run
    handle, task = tiny_handle("llava"), load_task(config.tasks[0])
    saved = load_task_vector(out / "vectors/vlm/country-capital/fv-image-icl-seed0.safetensors")
    reference = find_function_vector(
        handle,
        task,
        "image-icl",
        settings=config.function_vector,
        prompts=dataclasses.replace(config.prompts, seed=0),
    )
    torch.testing.assert_close(saved.vectors[0], reference.vector, atol=1e-5, rtol=1e-4)
    assert torch.equal(saved.vectors[0], saved.vectors[-1])  # the same vector at every layer
    assert saved.metadata["heads"] == [list(head) for head in reference.heads]
    torch.testing.assert_close(torch.tensor(saved.metadata["effects"]), reference.effects)


def test_layer_and_scale_are_the_best_of_a_sweep_per_scale(fv_run: Run) -> None:
    out, config, results = fv_run
    handle, task = tiny_handle("llava"), load_task(config.tasks[0])
    vector = load_task_vector(out / "vectors/vlm/country-capital/fv-text-icl-seed0.safetensors").vectors
    queries = [build_query_prompt(item, modality="image") for item in task.split("val")]
    answers = [item.answers() for item in task.split("val")]
    curves = {
        scale: sweep_accuracy(handle, queries, answers, vector, mode="add", scale=scale)
        for scale in config.function_vector.scales
    }
    choice = results.layers["fv-text->image"]
    candidates = choice.candidates
    best = max(
        ((scale, layer) for scale in config.function_vector.scales for layer in candidates),
        key=lambda pair: (curves[pair[0]][pair[1]], -pair[1], -pair[0]),
    )
    ids: list[int] = []
    generate_answers(handle, queries, max_new_tokens=1, first_tokens=ids)
    first_tokens = handle.tokenizer.batch_decode([[token] for token in ids])
    unpatched = [is_correct_by(t, a, "prefix") for t, a in zip(first_tokens, answers, strict=True)]
    assert choice.unpatched_validation == pytest.approx(sum(unpatched) / len(queries))
    # The best (scale, layer) is chosen only if it beats the queries unpatched; else neither is.
    helped = curves[best[0]][best[1]] > sum(unpatched) / len(queries)
    assert (choice.scale, choice.chosen) == (best if helped else (None, None))
    for scale, curve in curves.items():
        assert choice.validation_per_scale[str(scale)] == pytest.approx(curve)


def test_test_answers_are_the_function_vector_added_at_its_layer_and_scale(fv_run: Run) -> None:
    _assert_fv_text_to_text_answers_are_added_at_its_layer_and_scale(fv_run)


def _assert_fv_text_to_text_answers_are_added_at_its_layer_and_scale(run: Run) -> None:
    """fv-text->text's test answers (seed 0) are its vector added at its layer and scale, or the
    unpatched answers where no layer helped."""
    out, config, results = run
    handle, task = tiny_handle("llava"), load_task(config.tasks[0])
    vector = load_task_vector(out / "vectors/vlm/country-capital/fv-text-icl-seed0.safetensors").vectors
    choice = results.layers["fv-text->text"]
    queries = [build_query_prompt(item, modality="text") for item in task.split("test")]
    texts = generate_answers(handle, queries, max_new_tokens=config.max_new_tokens)
    if choice.chosen is not None:
        assert choice.scale is not None
        patch = LayerPatch(vector[choice.chosen], choice.chosen, "add", choice.scale)
        (patched,) = generate_patched_answers(handle, queries, [patch], max_new_tokens=config.max_new_tokens)
        assert patched.texts != texts, "the tiny model should answer differently under the patch"
        texts = patched.texts
    row = next(
        r for r in results.results if (r.condition, r.seed, r.metric) == ("fv-text->text", 0, "prefix")
    )
    items = task.split("test")
    hits = [is_correct_by(text, item.answers(), "prefix") for text, item in zip(texts, items, strict=True)]
    assert row.hits == "".join("1" if hit else "0" for hit in hits)
    assert row.layer == choice.chosen and row.scale == choice.scale


def test_one_shared_sweep_equals_each_scale_swept_alone(tmp_path: Path) -> None:
    config = tiny_config(write_task_file(tmp_path / "task"), seeds=(0,))
    handle, task = tiny_handle("llava"), load_task(config.tasks[0])
    conditions, _ = plan_conditions(handle, [task], config, None)
    by_name = {c.name: c for c in conditions}
    work = [(by_name[name], 0) for name in ("text->image", "fv-text->image", "fv-image->image")]

    def runner(directory: Path) -> StepRunner:
        cache = StepCache(directory / "cache")
        store = VectorStore(directory, config, cache, run_models(handle, None), False)
        return StepRunner(handle, None, config, cache, store, False)

    shared = runner(tmp_path / "shared").sweeps(task, work)
    queries = [build_query_prompt(item, modality="image") for item in task.split("val")]
    alone = runner(tmp_path / "alone")
    for (condition, seed), result in zip(work, shared, strict=True):
        found = alone.vector_for(condition, task, seed)
        assert found is not None
        vector = found[0]
        if not isinstance(condition.vector, FunctionVector):
            assert result.tokens == sweep_first_tokens(handle, queries, vector)
            continue
        assert result.scales == list(config.function_vector.scales)
        for scale, tokens in zip(config.function_vector.scales, result.tokens_per_scale, strict=True):
            assert tokens == sweep_first_tokens(handle, queries, vector, mode="add", scale=scale)


def test_head_records_are_the_run_vectors_own(fv_run: Run) -> None:
    out, _, results = fv_run
    records = {(r.role, r.spec): r for r in results.function_vectors}
    assert set(records) == {("vlm", "text-icl"), ("vlm", "image-icl"), ("llm", "text-icl")}
    for (role, spec), record in records.items():
        saved = load_task_vector(out / f"vectors/{role}/country-capital/fv-{spec}-seed0.safetensors")
        assert record.heads_per_seed == [saved.metadata["heads"]]
        effects = torch.tensor(saved.metadata["effects"])
        assert record.top_heads == [list(head) for head in top_heads(effects, record.k)]
        assert len(record.top_tokens) == 5
    (overlap,) = results.head_overlaps
    text, image = records[("vlm", "text-icl")], records[("vlm", "image-icl")]
    assert overlap.shared == [head for head in text.top_heads if head in image.top_heads]
    assert text.k == 10  # of the tiny model's 12 heads: no note that all of them were summed
    assert not any("attention heads" in note for note in results.meta.notes)


def test_function_vectors_can_be_left_out_and_tasks_too_small_for_them_are_named(tmp_path: Path) -> None:
    task_file = write_task_file(tmp_path / "task")
    handle, task = tiny_handle("llava"), load_task(str(task_file))
    off = tiny_config(task_file, function_vectors=False)
    conditions, _ = plan_conditions(handle, [task], off, None)
    assert not any(isinstance(c.vector, FunctionVector) for c in conditions)
    with pytest.raises(ValueError, match="function vectors of 7 demonstrations"):
        load_run_tasks(tiny_config(task_file, function_vector=FunctionVectorSettings(shots=7)))
    load_run_tasks(
        tiny_config(task_file, function_vector=FunctionVectorSettings(shots=7), function_vectors=False)
    )
    with pytest.raises(ValueError, match="fv_scales"):
        tiny_config(task_file, function_vector=FunctionVectorSettings(scales=(0.0,)))


def test_a_fixed_layer_adds_function_vectors_at_their_first_scale(tmp_path: Path) -> None:
    task_file = write_task_file(tmp_path / "task")
    config = tiny_config(task_file, seeds=(0,), ensemble_examples=(), layer_choice=1)
    scales = dataclasses.replace(config.function_vector, scales=(2.0, 4.0))
    config = config.with_options(function_vector=scales)
    results = run_experiments(tiny_handle("llava"), config, tmp_path / "out", progress=False)
    choice = results.layers["fv-text->text"]
    assert (choice.chosen, choice.scale, choice.fixed) == (1, 2.0, True)
    assert results.layers["text->text"].scale is None
    _assert_fv_text_to_text_answers_are_added_at_its_layer_and_scale((tmp_path / "out", config, results))


@pytest.mark.parametrize(("fv_seeds", "expected"), [(1, {0}), (None, {0, 1})])
def test_function_vectors_are_found_and_tested_on_the_first_fv_seeds(
    tmp_path: Path, fv_seeds: int | None, expected: set[int]
) -> None:
    config = tiny_config(
        write_task_file(tmp_path / "task"),
        seeds=(0, 1),
        ensemble_examples=(),
        layer_choice=1,
        fv_seeds=fv_seeds,
    )
    results = run_experiments(tiny_handle("llava"), config, tmp_path / "out", progress=False)
    assert {row.seed for row in results.results if row.condition == "fv-text->text"} == expected
    assert {row.seed for row in results.results if row.condition == "text->text"} == {0, 1}
    (record, *_) = results.function_vectors
    assert set(record.seeds) == expected and len(record.heads_per_seed) == len(expected)
