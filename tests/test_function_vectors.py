"""Function vectors: every head's indirect effect from one prefix pass equals the per-head loop of
full forwards, on every family, text and image demonstrations; the protocol's vector is the sum of
its top heads' projected means and patches like a task vector."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from conftest import tiny_handle
from run_fixtures import write_task_file
from tiny_models import FAMILIES, VLM_FAMILIES, save_tiny_checkpoint
from tiny_tasks import make_tiny_tasks

from taskvec.engine import head_contribution, head_layout
from taskvec.evaluation import sweep_accuracy
from taskvec.function_vectors import (
    FunctionVectorSettings,
    compare_modalities,
    cycled_queries,
    find_function_vector,
    function_prompts,
    function_vector,
    indirect_effects,
    mean_head_activations,
    top_heads,
)
from taskvec.models import ModelHandle
from taskvec.prompts import Modality, Prompt, build_query_prompt
from taskvec.prompts.settings import PromptSettings
from taskvec.tasks import Task
from taskvec.vectors import load_task_vector, save_task_vector

CASES: list[tuple[str, Modality]] = [(family, "text") for family in FAMILIES] + [
    (family, "image") for family in VLM_FAMILIES
]
CASE_IDS = [f"{family}-{modality}" for family, modality in CASES]


@pytest.fixture(scope="module")
def capital(tmp_path_factory: pytest.TempPathFactory) -> Task:
    return make_tiny_tasks(tmp_path_factory.mktemp("tasks"))[0]


@pytest.mark.parametrize(("family", "modality"), CASES, ids=CASE_IDS)
def test_indirect_effects_in_one_pass_equal_the_per_head_loop(
    family: str, modality: Modality, capital: Task
) -> None:
    handle = tiny_handle(family)
    if modality == "image" and not handle.architecture.multi_image:
        pytest.skip(f"{family} takes one image per prompt")
    pool = capital.split("val")
    clean = function_prompts(
        pool, cycled_queries(pool, 6), PromptSettings(shots=2, seed=0), modality=modality
    )
    means = mean_head_activations(handle, clean, batch_size=4)
    layout = head_layout(handle)
    assert [tuple(mean.shape) for mean in means] == [(layout.heads, size) for size in layout.head_dims]
    queries = cycled_queries(pool, 3)
    shuffled = function_prompts(
        pool, queries, PromptSettings(shots=2, seed=1), modality=modality, shuffle_labels=True
    )
    # Mean outputs scaled up, so that replacing a head moves the tiny model's answer measurably.
    strong = [4 * mean for mean in means]
    answers = [query.output for query in queries]
    fast = indirect_effects(handle, shuffled, answers, strong, batch_size=2)
    slow = indirect_effects(handle, shuffled, answers, strong, method="loop")
    assert fast.per_prompt.shape == (3, handle.num_layers, layout.heads)
    torch.testing.assert_close(fast.per_prompt, slow.per_prompt, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(fast.baseline, slow.baseline, atol=1e-6, rtol=1e-5)
    assert float(fast.per_prompt.abs().max()) > 0, "no head changed any answer probability"


def test_mean_activations_average_over_batches_exactly(capital: Task) -> None:
    handle = tiny_handle("llama")
    pool = capital.split("val")
    prompts = function_prompts(pool, cycled_queries(pool, 7), PromptSettings(shots=2, seed=0))
    whole = mean_head_activations(handle, prompts, batch_size=7)
    batched = mean_head_activations(handle, prompts, batch_size=3)
    alone = [mean_head_activations(handle, [prompt]) for prompt in prompts]
    for layer, mean in enumerate(whole):
        torch.testing.assert_close(batched[layer], mean, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(
            torch.stack([one[layer] for one in alone]).mean(0), mean, atol=1e-5, rtol=1e-4
        )


def test_shuffled_prompts_keep_inputs_and_permute_the_labels(capital: Task) -> None:
    pool = capital.split("val")
    queries = cycled_queries(pool, 12)
    assert [query.input for query in queries[:6]] == [item.input for item in pool] + [pool[0].input]
    clean = function_prompts(pool, queries, PromptSettings(shots=4, seed=5))
    shuffled = function_prompts(pool, queries, PromptSettings(shots=4, seed=5), shuffle_labels=True)
    outputs = {item.output for item in pool}
    moved = 0
    for plain, mixed in zip(clean, shuffled, strict=True):
        plain_lines, mixed_lines = plain.text.splitlines(), mixed.text.splitlines()
        inputs = [line for line in plain_lines if line.startswith("Q:")]
        assert inputs == [line for line in mixed_lines if line.startswith("Q:")]
        labels = [line for line in mixed_lines if line.startswith("A:") and line != "A:"]
        assert {label[2:] for label in labels} <= outputs
        moved += plain.text != mixed.text
    assert moved > 6, "shuffling left most prompts unchanged"


def test_every_prompt_builder_draws_the_same_prompts_from_one_prompt_settings(capital: Task) -> None:
    from taskvec.analysis.prompt_sets import spec_prompts
    from taskvec.prompts import with_template
    from taskvec.tasks import MissingImageError
    from taskvec.vectors import icl_prompts

    pool = capital.split("val")
    settings = PromptSettings(shots=3, seed=4, style="picture", template="chat", batch_size=1)

    def seen(prompts: list[Prompt]) -> list[tuple[str, bool, list[bytes]]]:
        return [(p.text, p.chat, [image.tobytes() for image in p.images]) for p in prompts]

    built = icl_prompts(pool, pool, settings, modality="image", task=capital.name)
    assert seen(built) == seen(function_prompts(pool, pool, settings, modality="image"))
    assert seen(built) == seen(spec_prompts(capital, "image-icl", pool, settings=settings))
    assert all(p.chat and len(p.images) == 4 and p.text.count("Q:") == 4 for p in built)
    # The batch size only batches; another seed draws other demonstrations.
    assert seen(built) == seen(icl_prompts(pool, pool, replace(settings, batch_size=8), modality="image"))
    assert seen(built) != seen(icl_prompts(pool, pool, replace(settings, seed=5), modality="image"))
    # Chat prompts are the qa prompts asked as one user turn: the same text, drawn the same way.
    qa_text = icl_prompts(pool, pool, replace(settings, template="qa"))
    chat_text = spec_prompts(capital, "text-icl", pool, settings=settings)
    assert seen(chat_text) == seen([with_template(prompt, "chat") for prompt in qa_text])
    with pytest.raises(MissingImageError, match="sketch"):
        function_prompts(pool, pool, replace(settings, style="sketch"), modality="image")


def test_top_heads_and_the_function_vector_sum_the_chosen_heads() -> None:
    handle = tiny_handle("llama")
    layout = head_layout(handle)
    effects = torch.zeros(handle.num_layers, layout.heads)
    effects[1, 0], effects[0, 1], effects[1, 1] = 0.5, 0.3, -0.2
    assert top_heads(effects, 2) == [(1, 0), (0, 1)]
    with pytest.raises(ValueError, match="k must be between 1"):
        top_heads(effects, effects.numel() + 1)
    means = [torch.randn(layout.heads, size) for size in layout.head_dims]
    expected = head_contribution(handle, 1, 0, means[1][0]) + head_contribution(handle, 0, 1, means[0][1])
    torch.testing.assert_close(function_vector(handle, means, [(1, 0), (0, 1)]), expected)


@pytest.mark.parametrize("spec", ["text-icl", "image-icl"])
def test_the_protocol_saves_a_vector_that_patches_like_a_task_vector(
    spec: str, capital: Task, tmp_path: Path
) -> None:
    handle = tiny_handle("llava")
    found = find_function_vector(
        handle,
        capital,
        spec,
        settings=FunctionVectorSettings(shots=2, mean_prompts=5, effect_prompts=3, heads=3),
        prompts=PromptSettings(batch_size=4),
    )
    assert len(found.heads) == 3 and len(set(found.heads)) == 3
    assert found.effects.shape == (handle.num_layers, head_layout(handle).heads)
    best = found.effects.flatten().topk(3).values
    assert [float(found.effects[layer, head]) for layer, head in found.heads] == best.tolist()
    path = save_task_vector(found.as_task_vector(handle.num_layers), tmp_path / "fv.safetensors")
    loaded = load_task_vector(path)
    assert loaded.vectors.shape == (handle.num_layers, handle.hidden_size)
    torch.testing.assert_close(loaded.at(0), found.vector)
    assert loaded.metadata["kind"] == "function-vector" and loaded.metadata["spec"] == spec
    assert loaded.metadata["through_norm"] is False  # LLaVA's attention output joins the residual as is
    assert loaded.metadata["heads"] == [list(head) for head in found.heads]
    assert (loaded.metadata["k"], loaded.metadata["mean_prompts"], loaded.metadata["effect_prompts"]) == (
        3,
        5,
        3,
    )


def test_the_protocol_refuses_an_instruction_spec(capital: Task) -> None:
    with pytest.raises(ValueError, match="come from demonstrations"):
        find_function_vector(tiny_handle("llama"), capital, "instruction")


def test_cli_heads_prints_the_top_heads_and_saves_a_vector_patch_adds(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from taskvec.cli import main

    model = ["--model", str(save_tiny_checkpoint("llava", tmp_path / "tiny-llava")), "--json"]
    task = ["--task", str(write_task_file(tmp_path / "task"))]
    vector = tmp_path / "fv.safetensors"
    heads = ["heads", *model, *task, "--shots", "2", "--mean-prompts", "4", "--effect-prompts", "2"]
    assert main([*heads, "--heads", "2", "--out", str(vector)]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert len(printed["top_heads"]) == 2 and printed["out"] == str(vector)
    assert printed["kind"] == "function-vector" and printed["k"] == 2
    effects = [head["effect"] for head in printed["top_heads"]]
    assert effects == sorted(effects, reverse=True)
    assert main(["patch", *model, "--vector", str(vector), "--layer", "1", "--text", "France"]) == 0
    assert json.loads(capsys.readouterr().out)["mode"] == "add"
    assert main(["sweep", *model, *task, "--vector", str(vector), "--limit", "2"]) == 0
    assert len(json.loads(capsys.readouterr().out)["accuracy"]) == 3  # the tiny LLaVA has 3 layers
    with pytest.raises(SystemExit):
        main(["heads", *model, *task, "--spec", "instruction"])
    assert "invalid choice: 'instruction'" in capsys.readouterr().err


def test_across_modalities_compares_heads_and_applies_every_vector_to_both_query_modalities(
    capital: Task,
) -> None:
    handle = tiny_handle("llava")
    comparison = compare_modalities(
        handle, capital, k=3, shots=2, mean_prompts=4, effect_prompts=2, residual_shots=2, scales=(1.0, 3.0)
    )
    text_heads, image_heads = comparison.top_heads["text"], comparison.top_heads["image"]
    assert len(text_heads) == len(image_heads) == 3
    assert comparison.shared_heads == [head for head in text_heads if head in image_heads]
    assert {(t.kind, t.source, t.target) for t in comparison.transfers} == {
        (kind, source, target)
        for kind in ("function-vector", "task-vector")
        for source in ("text", "image")
        for target in ("text", "image")
    }
    test = capital.split("test")
    answers = [item.answers() for item in test]
    for transfer in comparison.transfers:
        assert transfer.test_items == len(test)
        candidates = transfer.validation_per_layer[:-1]  # the run's candidates: all but the last layer
        if transfer.layer is None:  # no layer helped: not tested
            assert max(candidates) <= transfer.unpatched_validation and transfer.test_accuracy is None
            continue
        assert transfer.validation_per_layer[transfer.layer] == max(candidates)
        assert max(candidates) > transfer.unpatched_validation
        assert transfer.interval is not None and transfer.test_accuracy is not None
        assert transfer.interval.low <= transfer.test_accuracy <= transfer.interval.high
        # The test answers (greedy generation at the chosen layer) agree with the one-pass sweep.
        queries = [build_query_prompt(item, modality=transfer.target) for item in test]
        if transfer.kind == "function-vector":
            source = comparison_vector(handle, capital, transfer.source)
            swept = sweep_accuracy(
                handle,
                queries,
                answers,
                source.expand(handle.num_layers, -1),
                mode="add",
                scale=transfer.scale,
            )
            assert swept[transfer.layer] == pytest.approx(transfer.test_accuracy)
    record = json.loads(json.dumps(comparison.to_json()))
    assert [t["name"] for t in record["transfers"]][:2] == ["FV text -> text", "TV text -> text"]
    assert len(record["effects"]["image"]) == handle.num_layers


def comparison_vector(handle: ModelHandle, task: Task, modality: str) -> torch.Tensor:
    """The function vector compare_modalities builds from `modality` demonstrations (same options)."""
    found = find_function_vector(
        handle,
        task,
        f"{modality}-icl",
        settings=FunctionVectorSettings(shots=2, mean_prompts=4, effect_prompts=2, heads=3),
    )
    return found.vector


def test_cli_heads_across_modalities_needs_a_vlm(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from taskvec.cli import main

    task = ["--task", str(write_task_file(tmp_path / "task"))]
    small = ["--shots", "2", "--mean-prompts", "3", "--effect-prompts", "2", "--heads", "2", "--scales", "1"]
    vlm = ["--model", str(save_tiny_checkpoint("llava", tmp_path / "tiny-llava"))]
    figure = tmp_path / "heads.png"
    assert main(["heads", *vlm, *task, *small, "--across-modalities", "--json", "--figure", str(figure)]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert len(printed["transfers"]) == 8 and set(printed["no_context"]) == {"text", "image"}
    assert figure.read_bytes().startswith(b"\x89PNG")
    lm = ["--model", str(save_tiny_checkpoint("llama", tmp_path / "tiny-llama"))]
    with pytest.raises(SystemExit, match="needs a vision-language model"):
        main(["heads", *lm, *task, *small, "--across-modalities"])
