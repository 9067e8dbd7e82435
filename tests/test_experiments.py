"""The experiments pipeline on a tiny LLaVA: results.json contract, resume, layer choice, ensembles."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers
from conftest import random_image, tiny_handle
from tiny_models import build_tiny

from taskvec.caching import StepCache
from taskvec.evaluation import accuracy, generate_answers, is_correct_by
from taskvec.experiments import RunConfig, choose_layer, format_tables, plan_conditions, run_experiments
from taskvec.experiments import steps as steps_module
from taskvec.experiments import vector_store as vector_store_module
from taskvec.experiments.vector_store import ensemble_of, exemplar_subset_vector
from taskvec.models import ModelHandle
from taskvec.prompts import build_query_prompt
from taskvec.tasks import load_task
from taskvec.vectors import exemplar_vector, load_task_vector

PAIRS = [
    ("France", "Paris"),
    ("Japan", "Tokyo"),
    ("Italy", "Rome"),
    ("Spain", "Madrid"),
    ("Egypt", "Cairo"),
    ("Peru", "Lima"),
    ("Germany", "Berlin"),
    ("China", "Beijing"),
    ("India", "Delhi"),
    ("Kenya", "Nairobi"),
    ("Canada", "Ottawa"),
    ("Brazil", "Brasilia"),
    ("Greece", "Athens"),
]
RESULT_FIELDS = {"model", "condition", "task", "seed", "layer", "metric", "accuracy", "n"}


def write_task_file(directory: Path) -> Path:
    """country-capital.jsonl: 7 validation and 6 test items with images; borrows the built-in instruction."""
    directory.mkdir(parents=True, exist_ok=True)
    lines = []
    for index, (country, capital) in enumerate(PAIRS):
        random_image(index).save(directory / f"{country}.png")
        split = "val" if index < 7 else "test"
        lines.append(
            json.dumps({"input": country, "output": capital, "image": f"{country}.png", "split": split})
        )
    path = directory / "country-capital.jsonl"
    path.write_text("\n".join(lines))
    return path


def tiny_base_lm(vlm: ModelHandle) -> ModelHandle:
    """The tiny LLaVA's own language model as a causal LM: the shape of a real LLM -> VLM pair."""
    config = vlm.model.config.text_config  # type: ignore[union-attr]
    lm = transformers.LlamaForCausalLM(config).eval()
    lm.model.load_state_dict(vlm.model.model.language_model.state_dict())  # type: ignore[union-attr]
    lm.lm_head.load_state_dict(vlm.model.lm_head.state_dict())  # type: ignore[union-attr]
    return ModelHandle.wrap(lm, vlm.tokenizer, name="tiny-llava-base")


def tiny_config(task_file: Path, **changes: Any) -> RunConfig:
    options: dict[str, Any] = {
        "tasks": (str(task_file),),
        "seeds": (0, 1),
        "shots": 2,
        "ensemble_examples": (0, 2, 4),
        "max_new_tokens": 2,
        "batch_size": 4,
    }
    options.update(changes)
    return RunConfig(**options)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, RunConfig, dict[str, Any]]:
    root = tmp_path_factory.mktemp("run")
    config = tiny_config(write_task_file(root / "task"))
    vlm = tiny_handle("llava")
    results = run_experiments(vlm, config, root / "out", llm=tiny_base_lm(vlm), progress=False)
    return root / "out", config, results


def test_run_writes_results_json_and_summary_csv_as_documented(
    finished_run: tuple[Path, RunConfig, dict[str, Any]],
) -> None:
    out, _, returned = finished_run
    results = json.loads((out / "results.json").read_text())
    assert results == json.loads(json.dumps(returned))
    assert results["format"] == 1 and results["tasks"] == ["country-capital"]
    meta = results["meta"]
    assert meta["model"] == "tiny-llava" and meta["llm"] == "tiny-llava-base"
    assert {"torch", "transformers"} <= set(meta["packages"]) and meta["taskvec"]
    assert meta["config"]["seeds"] == [0, 1] and meta["config"]["shots"] == 2
    conditions = {row["condition"] for row in results["results"]}
    unpatched = {
        "no-context", "no-context-text", "image-icl", "text-icl", "text-icl-xbase", "instruction-prompt",
        "exemplar-0",
    }  # fmt: skip
    patched = {
        "image-icl-patch", "text-icl-xpatch", "text->text", "image->text", "llm-xpatch", "instruction-patch",
        "ensemble-0", "exemplar-2", "ensemble-2", "exemplar-4", "ensemble-4",
    }  # fmt: skip
    assert conditions == unpatched | patched
    for row in results["results"]:
        assert set(row) == RESULT_FIELDS and row["n"] == 6 and 0.0 <= row["accuracy"] <= 1.0
        assert row["metric"] in ("prefix", "prefix_ignore_case", "exact")
        assert (row["layer"] is None) == (row["condition"] in unpatched)
    seeds = {row["seed"] for row in results["results"] if row["condition"] == "text-icl-xpatch"}
    assert seeds == {0, 1}
    assert {row["seed"] for row in results["results"] if row["condition"] == "no-context"} == {None}
    assert {r["model"] for r in results["results"] if r["condition"] == "llm-xpatch"} == {"llm"}

    patched = {
        "image-icl-patch",
        "text-icl-xpatch",
        "text->text",
        "image->text",
        "llm-xpatch",
        "instruction-patch",
    }
    assert patched <= set(results["layers"])
    # The ensemble curve's smaller n take the layer chosen for its largest n (ensemble_layer_from).
    layers = results["layers"]
    assert layers["exemplar-2"]["shared_from"] == "exemplar-4"
    assert layers["exemplar-2"]["validation_mean"] == []
    assert layers["ensemble-2"]["shared_from"] == "ensemble-4"
    assert layers["ensemble-2"]["chosen"] == layers["ensemble-4"]["chosen"]
    for choice in (choice for choice in layers.values() if "shared_from" not in choice):
        assert len(choice["validation_mean"]) == 3 and 0 <= choice["chosen"] < 3
        assert choice["chosen"] == choose_layer(choice["validation_mean"])
        assert set(choice["validation_per_task"]) == {"country-capital"}

    tables = results["tables"]
    assert set(tables["paper"]) == {
        "no-context",
        "image-icl",
        "image-icl-patch",
        "text-icl-xbase",
        "text-icl-xpatch",
    }
    assert set(tables["directions"]) == {"text->text", "text->image", "image->image", "image->text"}
    assert tables["directions"]["text->image"] == tables["paper"]["text-icl-xpatch"]
    assert set(tables["instruction"]) == {"instruction_patch", "instruction_prompt"}
    llm_table = tables["llm_to_vlm"]
    assert len(llm_table["cosine_per_layer"]) == 3
    # The base LM is the VLM's own language model and text prompts have no image: identical vectors.
    assert llm_table["cosine_at_chosen_layer"] == pytest.approx(1.0, abs=1e-4)
    assert (
        tables["ensemble"]["examples"] == [0, 2, 4] and tables["ensemble"]["metric"] == "prefix_ignore_case"
    )
    assert len(tables["ensemble"]["exemplar"]) == 3
    assert {"per_task", "mean", "std"} <= set(tables["paper"]["text-icl-xpatch"])

    examples = [e for e in results["examples"] if e["condition"] == "no-context"]
    assert len(examples) == 2 and Path(examples[0]["image"]).is_file()
    assert (
        "paper_numbers" in results
        and results["paper_numbers"]["table"]["Idefics2-8B"]["text-icl-xpatch"] == 0.51
    )

    with (out / "summary.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == len(results["results"])
    assert set(rows[0]) == {"model", "condition", "task", "seed", "metric", "accuracy", "n", "layer"}
    assert (out / "vectors/vlm/country-capital/text-icl-seed1.safetensors").is_file()
    assert (out / "vectors/vlm/country-capital/instruction-seed0.safetensors").is_file()
    assert (out / "vectors/llm/country-capital/text-icl-seed0.safetensors").is_file()
    text = format_tables(results)
    assert "Idefics2-8B" in text and "ours (tiny-llava)" in text and "Ensemble curve" in text


def test_saved_vectors_follow_the_protocol_and_test_answers_are_patched_at_the_chosen_layer(
    finished_run: tuple[Path, RunConfig, dict[str, Any]],
) -> None:
    out, config, results = finished_run
    handle, task = tiny_handle("llava"), load_task(config.tasks[0])
    saved = load_task_vector(out / "vectors/vlm/country-capital/image-icl-seed1.safetensors")
    reference = exemplar_vector(handle, task, shots=2, seed=1, modality="image")
    torch.testing.assert_close(saved.vectors, reference.vectors, atol=1e-5, rtol=1e-4)
    assert saved.metadata["spec"] == "image-icl" and saved.metadata["cache_key"]

    layer = results["layers"]["text-icl-xpatch"]["chosen"]
    vector = load_task_vector(out / "vectors/vlm/country-capital/text-icl-seed0.safetensors")
    queries = [build_query_prompt(item, modality="image") for item in task.split("test")]
    expected = generate_answers(handle, queries, vector=vector.at(layer), layer=layer, max_new_tokens=2)
    unpatched = generate_answers(handle, queries, max_new_tokens=2)
    answers = [item.answers() for item in task.split("test")]
    row = next(
        r
        for r in results["results"]
        if (r["condition"], r["seed"], r["metric"]) == ("text-icl-xpatch", 0, "prefix")
    )
    assert row["layer"] == layer and row["accuracy"] == accuracy(expected, answers)
    examples = [e for e in results["examples"] if e["condition"] == "text-icl-xpatch"]
    assert [e["generated"] for e in examples] == expected[:2]
    assert expected != unpatched, "the tiny model should answer differently under the patch"


def test_a_rerun_resumes_from_the_run_directory(
    finished_run: tuple[Path, RunConfig, dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    out, config, first = finished_run

    def must_not_run(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("a finished step was recomputed")

    for module, name in (
        (steps_module, "generate_answers"),
        (steps_module, "sweep_first_tokens"),
        (vector_store_module, "residuals_per_prompt"),
        (vector_store_module, "instruction_vector"),
    ):
        monkeypatch.setattr(module, name, must_not_run)
    vlm = tiny_handle("llava")
    again = run_experiments(vlm, config, out, llm=tiny_base_lm(vlm), progress=False)
    assert again["results"] == first["results"] and again["layers"] == first["layers"]
    assert again["meta"]["steps"]["computed"] == 0 and again["meta"]["steps"]["vectors_extracted"] == 0


def test_a_changed_option_does_not_reuse_stale_steps(tmp_path: Path) -> None:
    cache = StepCache(tmp_path)
    config = tiny_config(write_task_file(tmp_path / "task"))
    store = vector_store_module.VectorStore(tmp_path, config, cache, progress=False)
    handle, task = tiny_handle("llava"), load_task(config.tasks[0])
    base = store.identity(handle, task, "text-icl", 0)
    assert cache.key(base) == cache.key(dict(base))
    other_store = vector_store_module.VectorStore(
        tmp_path, config.with_options(shots=3, ensemble_examples=(0, 3)), cache, False
    )
    assert cache.key(other_store.identity(handle, task, "text-icl", 0)) != cache.key(base)
    assert cache.key(store.identity(handle, task, "text-icl", 1)) != cache.key(base)
    other_model = tiny_handle("llava")  # same name, other weights
    with torch.no_grad():
        next(other_model.model.parameters()).add_(1.0)
    assert cache.key(store.identity(other_model, task, "text-icl", 0)) != cache.key(base)
    runner = steps_module.StepRunner(handle, None, config, cache, store, progress=False)
    changed = steps_module.StepRunner(handle, None, config.with_options(test_limit=3), cache, store, False)
    condition = next(c for c in plan_conditions(handle, [task], config, None)[0] if c.name == "no-context")
    first, second = runner.test(condition, task, None, None), changed.test(condition, task, None, None)
    assert len(first["generated"]) == 6 and len(second["generated"]) == 3


def test_layer_choice_takes_the_best_mean_and_the_lowest_layer_on_ties() -> None:
    assert choose_layer([0.1, 0.5, 0.3]) == 1
    assert choose_layer([0.2, 0.6, 0.6, 0.1]) == 1
    assert choose_layer([0.0, 0.0]) == 0
    with pytest.raises(ValueError):
        choose_layer([])


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
        "no-context-text", "text-icl", "text->text", "instruction-patch", "instruction-prompt",
        "exemplar-0", "ensemble-0", "exemplar-2", "ensemble-2",
    ]  # fmt: skip
    assert all(c.query == "text" for c in conditions)
    assert any("text-only" in note for note in notes)


def test_cli_run_quick_on_a_saved_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from taskvec.cli import main

    tiny = build_tiny("llava")
    model_dir = tmp_path / "tiny-llava"
    tiny.model.save_pretrained(model_dir)
    tiny.processor.save_pretrained(model_dir)
    task_file = write_task_file(tmp_path / "task")
    out = tmp_path / "run"
    argv = ["run", "--model", str(model_dir), "--llm", "none", "--tasks", str(task_file), "--quick"]
    argv += ["--shots", "2", "--ensemble-examples", "0", "2", "--out", str(out), "--no-analyses"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "Table 1" in printed and "text-icl-xpatch" in printed and "no base LM given" in printed
    results = json.loads((out / "results.json").read_text())
    assert results["meta"]["quick"] and results["meta"]["llm"] is None
    assert main(["run", "--model", str(model_dir), "--tasks", "no-such-task", "--out", str(out)]) == 2
    assert "unknown task 'no-such-task'" in capsys.readouterr().err
    argv = ["run", "--model", str(model_dir), "--tasks", str(task_file), "--style", "country=noto"]
    assert main([*argv, "--out", str(out)]) == 2
    assert "no image style 'noto'" in capsys.readouterr().err


def test_layer_sweeps_use_the_first_seeds_vectors_unless_asked_for_all(
    finished_run: tuple[Path, RunConfig, dict[str, Any]], tmp_path: Path
) -> None:
    out, config, _ = finished_run
    vlm = tiny_handle("llava")
    every = config.with_options(layer_sweep_seeds=None)
    run_experiments(vlm, every, tmp_path, llm=tiny_base_lm(vlm), progress=False)
    default_sweeps = len(list((out / "cache" / "sweeps").rglob("*.json")))
    all_sweeps = len(list((tmp_path / "cache" / "sweeps").rglob("*.json")))
    # Seeded swept conditions: the four directions' sources, llm-xpatch and the curve's largest n of
    # each kind; with 2 seeds, sweeping every seed adds one sweep for each of those 7.
    assert config.seeds == (0, 1) and all_sweeps - default_sweeps == 7


def test_majority_answer_baseline_scores_the_most_frequent_validation_answer() -> None:
    from collections import Counter

    from taskvec.experiments.baselines import majority_answer, majority_answer_baseline
    from taskvec.tasks import load_task

    task = load_task("food-flavor")
    counts = Counter(item.output for item in task.split("val"))
    answer = majority_answer(task)
    assert counts[answer] == max(counts.values())
    test = task.split("test")
    expected = sum(answer in item.answers() for item in test) / len(test)
    baseline = majority_answer_baseline([task], metric="exact", test_limit=None)
    assert baseline["answers"] == {"food-flavor": answer}
    assert baseline["per_task"]["food-flavor"] == pytest.approx(expected) and baseline["mean"] > 0.1


def test_results_carry_the_majority_answer_floor(
    finished_run: tuple[Path, RunConfig, dict[str, Any]],
) -> None:
    _, _, results = finished_run
    majority = results["tables"]["baselines"]["majority_answer"]
    assert set(majority["per_task"]) == {"country-capital"} and majority["metric"] == "prefix"
    assert "floor: the validation majority answer" in format_tables(results)


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
