"""Models, prompts, vectors and metrics on tiny models: the behaviour users rely on, and bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import random_image, tiny_handle
from run_fixtures import PAIRS as FIXTURE_PAIRS
from tiny_models import build_tiny, save_tiny_checkpoint

from taskvec.engine import AnswerMarkerNotFoundError, find_marker_positions, marker_position, record_residuals
from taskvec.evaluation import is_correct
from taskvec.models import (
    MissingImageError,
    ModelHandle,
    PromptTooLongError,
    UnsupportedArchitectureError,
    load_model,
    supported_classes,
)
from taskvec.models.default_lm import _write_completion_record, is_complete
from taskvec.prompts import build_icl_prompt, build_query_prompt
from taskvec.prompts.settings import PromptSettings
from taskvec.tasks import Item, Task
from taskvec.vectors import (
    TooFewDemonstrationsError,
    VectorSpec,
    exemplar_vector,
    extract_vector,
    icl_prompts,
    instruction_vector,
    load_task_vector,
    residuals_at_marker,
    save_task_vector,
)

PAIRS = FIXTURE_PAIRS[:8]  # eight countries of the tiny vocabulary


def tiny_task(image_dir: Path | None = None) -> Task:
    items = []
    for index, (country, capital) in enumerate(PAIRS):
        images = {}
        if image_dir is not None:
            path = image_dir / f"{country}.png"
            random_image(index).save(path)
            images = {"flag": path}
        items.append(Item(country, capital, images=images))
    return Task(
        "tiny-capital",
        "The capital city of the country",
        tuple(items),
        {"val": tuple(range(len(items)))},
        task_words=("capital",),
    )


def test_marker_positions_point_at_the_colon_of_each_answer_marker() -> None:
    handle = tiny_handle("llama")
    ids = handle.build_inputs(["Q:France\nA:Paris\n\nQ:Japan\nA:"])["input_ids"][0]
    pieces = handle.tokenizer.batch_decode([[int(i)] for i in ids])
    positions = find_marker_positions(handle.tokenizer, ids, "A:")
    assert len(positions) == 2
    assert all(pieces[p] == ":" and pieces[p - 1] == "A" for p in positions)
    assert marker_position(handle.tokenizer, ids, "A:", -1) == len(ids) - 1
    with pytest.raises(AnswerMarkerNotFoundError, match="'Answer:'"):
        marker_position(handle.tokenizer, ids, "Answer:")
    with pytest.raises(AnswerMarkerNotFoundError, match="occurrence -3"):
        marker_position(handle.tokenizer, ids, "A:", -3)


def test_text_exemplar_vector_is_the_mean_residual_at_the_last_demonstrations_marker() -> None:
    handle = tiny_handle("llama")
    task = tiny_task()
    vector = exemplar_vector(handle, task, shots=2, seed=3, batch_size=3)
    assert vector.vectors.shape == (handle.num_layers, handle.hidden_size)
    # Recompute one prompt by hand: the same seeded demonstrations, read at the second-to-last "A:".
    import random

    from taskvec.vectors import sample_demonstrations

    rng = random.Random(3)
    manual = []
    for query in task.split("val"):
        prompt = build_icl_prompt(sample_demonstrations(task.split("val"), query, 2, rng), query)
        inputs = handle.build_inputs([prompt.text])
        position = marker_position(handle.tokenizer, inputs["input_ids"][0], "A:", -2)
        manual.append(record_residuals(handle, inputs, position)[0, :, 0])
    torch.testing.assert_close(vector.vectors, torch.stack(manual).mean(0), atol=1e-5, rtol=1e-4)
    assert vector.metadata["spec"] == "text-icl" and vector.metadata["shots"] == 2


def test_extract_vector_is_the_mean_of_its_per_prompt_residuals_read_at_the_marker() -> None:
    handle = tiny_handle("llama")
    task = tiny_task()
    extraction = extract_vector(
        handle, task, VectorSpec.TEXT_ICL, settings=PromptSettings(shots=2, seed=1, batch_size=2), limit=5
    )
    per_prompt = extraction.per_prompt
    assert per_prompt is not None and per_prompt.dtype == torch.float32
    assert per_prompt.shape == (5, handle.num_layers, handle.hidden_size)  # the first 5 queries
    torch.testing.assert_close(extraction.vector.vectors, per_prompt.mean(dim=0))
    metadata = extraction.vector.metadata
    assert metadata["spec"] == "text-icl" and type(metadata["spec"]) is str and metadata["prompts"] == 5
    # The same sampling as the full vector: a limit keeps the first queries' prompts unchanged.
    pool = task.split("val")
    drawn = PromptSettings(shots=2, seed=1)
    prompts = icl_prompts(pool, pool, drawn)
    assert [p.text for p in prompts[:5]] == [p.text for p in icl_prompts(pool, pool[:5], drawn)]
    inputs = handle.build_inputs([prompts[3].text])
    position = marker_position(handle.tokenizer, inputs["input_ids"][0], "A:", -2)
    torch.testing.assert_close(per_prompt[3], record_residuals(handle, inputs, position)[0, :, 0])
    full = extract_vector(handle, task, "text-icl", settings=PromptSettings(shots=2, seed=1, batch_size=2))
    torch.testing.assert_close(full.per_prompt[:5], per_prompt, atol=1e-5, rtol=1e-4)  # type: ignore[index]
    torch.testing.assert_close(exemplar_vector(handle, task, shots=2, seed=1).vectors, full.vector.vectors)
    instruction = extract_vector(handle, task, VectorSpec.INSTRUCTION)
    assert instruction.per_prompt is None and instruction.vector.metadata["spec"] == "instruction"


def test_residuals_at_marker_reads_chosen_layers_and_mean_input_embeddings() -> None:
    handle = tiny_handle("llama")
    task = tiny_task()
    prompts = icl_prompts(task.split("val"), task.split("val")[:3], PromptSettings(shots=2, seed=0))
    every = residuals_at_marker(handle, prompts, occurrence=-1, batch_size=2).residuals
    assert every.shape == (3, handle.num_layers, handle.hidden_size)
    read = residuals_at_marker(handle, prompts, occurrence=-1, layers=[1], input_embeddings=True)
    embeddings = read.input_embeddings
    assert embeddings is not None
    torch.testing.assert_close(read.residuals[:, 0], every[:, 1], atol=1e-5, rtol=1e-4)
    inputs = handle.build_inputs([prompts[0].text])
    token_embeddings = handle.model.get_input_embeddings()(inputs["input_ids"])[0]
    torch.testing.assert_close(embeddings[0], token_embeddings.mean(dim=0), atol=1e-5, rtol=1e-4)


def test_too_few_demonstrations_is_an_error_naming_the_task_and_counts() -> None:
    handle = tiny_handle("llama")
    task = tiny_task()  # 8 validation items: 7 besides each query
    with pytest.raises(TooFewDemonstrationsError, match=r"task 'tiny-capital': 8-shot .* has 7"):
        extract_vector(handle, task, VectorSpec.TEXT_ICL, settings=PromptSettings(shots=8))
    with pytest.raises(ValueError, match="made from other vectors"):
        extract_vector(handle, task, VectorSpec.ENSEMBLE)
    with pytest.raises(ValueError, match="unknown vector spec 'text'"):
        extract_vector(handle, task, "text")


def test_the_demo_scores_one_generated_token_by_default_like_the_run(monkeypatch: pytest.MonkeyPatch) -> None:
    from dataclasses import replace

    import taskvec.experiments.demo as demo_module

    calls: list[int] = []
    generate = demo_module.generate_answers

    def counting(*args: object, max_new_tokens: int, **kwargs: object) -> list[str]:
        calls.append(max_new_tokens)
        return generate(*args, max_new_tokens=max_new_tokens, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(demo_module, "generate_answers", counting)
    # Layer 1 helps whatever the tiny model answers unpatched, so the patched queries are tested.
    monkeypatch.setattr(demo_module, "sweep_accuracy", lambda *args, **kwargs: [0.0, 1.0, 0.0, 0.0])
    task = replace(tiny_task(), splits={"val": (0, 1, 2, 3, 4, 5), "test": (6, 7)})
    result = demo_module.run_demo(tiny_handle("llama"), task, shots=2, progress=False)
    # The bare validation queries first, scored as the sweep is (one token), then the three test runs.
    assert calls == [1, 1, 1, 1] and result.max_new_tokens == 1 and result.metric == "prefix"
    assert result.test_items == 2 and result.best_layer == 1
    demo_module.run_demo(tiny_handle("llama"), task, shots=2, max_new_tokens=3, progress=False)
    assert calls[4:] == [1, 3, 3, 3]


@pytest.mark.parametrize("family", ["llava", "qwen2_vl", "idefics3"])
def test_image_exemplar_vectors_read_image_prompts(family: str, tmp_path: Path) -> None:
    handle = tiny_handle(family)
    task = tiny_task(tmp_path)
    image_vector = exemplar_vector(handle, task, shots=2, modality="image")
    text_vector = exemplar_vector(handle, task, shots=2, modality="text")
    assert image_vector.metadata["spec"] == "image-icl"
    assert not torch.allclose(image_vector.vectors, text_vector.vectors, atol=1e-4)
    prompt = build_query_prompt(task.items[0], modality="image")
    assert prompt.text == "Q:<image>\nA:" and len(prompt.images) == 1


def test_instruction_vector_is_the_last_token_of_the_instruction() -> None:
    handle = tiny_handle("gemma3_text")
    task = tiny_task()
    vector = instruction_vector(handle, task)
    inputs = handle.build_inputs([task.instruction])
    torch.testing.assert_close(vector.vectors, record_residuals(handle, inputs, -1)[0, :, 0])


def test_task_vectors_round_trip_through_safetensors_with_metadata(tmp_path: Path) -> None:
    handle = tiny_handle("llama")
    vector = exemplar_vector(handle, tiny_task(), shots=2)
    path = save_task_vector(vector, tmp_path / "v.safetensors")
    loaded = load_task_vector(path)
    torch.testing.assert_close(loaded.vectors, vector.vectors)
    assert loaded.metadata["task"] == "tiny-capital" and "taskvec_version" in loaded.metadata
    assert b"pickle" not in path.read_bytes()[:200]
    with pytest.raises(FileNotFoundError, match="no task vector"):
        load_task_vector(tmp_path / "missing.safetensors")


@pytest.mark.parametrize(
    ("generated", "answers", "expected"),
    [
        ("Paris", ["Paris"], True),
        (" Par", ["Paris"], True),
        ("Paris, France", ["Paris"], True),
        ("", ["Paris"], False),
        ("Lyon", ["Paris"], False),
        ("paris", ["Paris"], False),
        ("Kiev", ["Kyiv", "Kiev"], True),
    ],
)
def test_prefix_metric(generated: str, answers: list[str], expected: bool) -> None:
    assert is_correct(generated, answers) is expected


def test_case_insensitive_metric_variant() -> None:
    assert is_correct("paris", ["Paris"], ignore_case=True)


def test_unsupported_architecture_names_itself_and_the_supported_ones() -> None:
    with pytest.raises(UnsupportedArchitectureError, match=r"'Linear'.*LlavaForConditionalGeneration"):
        ModelHandle.wrap(torch.nn.Linear(2, 2), processor=None)


def test_image_count_must_match_placeholders() -> None:
    handle = tiny_handle("llava")
    with pytest.raises(MissingImageError, match="1 <image> placeholder"):
        handle.build_inputs(["Q:<image>\nA:"], [[]])
    with pytest.raises(MissingImageError, match="text-only"):
        tiny_handle("llama").build_inputs(["Q:<image>\nA:"], [[random_image(0)]])


def test_prompt_longer_than_the_context_is_refused() -> None:
    handle = tiny_handle("gpt2")
    limit = handle.context_length
    assert limit is not None
    with pytest.raises(PromptTooLongError, match=f"context of {limit}"):
        handle.build_inputs(["Q:France\nA:Paris\n\n" * limit])


def test_local_checkpoint_directories_load_by_path(tmp_path: Path) -> None:
    tiny = build_tiny("llava")
    tiny.model.save_pretrained(tmp_path)
    tiny.processor.save_pretrained(tmp_path)
    handle = load_model(tmp_path, image_width=0)
    assert handle.architecture.family == "llava" and handle.num_layers == tiny_handle("llava").num_layers
    assert handle.image_settings.width is None and load_model(tmp_path).image_settings.width == 224
    inputs = handle.build_inputs(["Q:<image>\nA:"], [[random_image(0)]])
    reference = tiny_handle("llava").build_inputs(["Q:<image>\nA:"], [[random_image(0)]])
    with torch.no_grad():
        torch.testing.assert_close(handle.model(**inputs).logits, tiny.model(**reference).logits)


def test_load_model_errors_name_the_problem(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"'org/some-hub-model' is not in the Hugging Face cache"):
        load_model("org/some-hub-model")
    with pytest.raises(FileNotFoundError, match="not a checkpoint directory, a hub id"):
        load_model("no/such/directory")
    (tmp_path / "config.json").write_text(
        json.dumps({"architectures": ["MambaForCausalLM"], "model_type": "mamba"})
    )
    with pytest.raises(UnsupportedArchitectureError, match="MambaForCausalLM"):
        load_model(tmp_path)


def test_default_lm_cache_detects_partial_and_corrupt_copies(tmp_path: Path) -> None:
    (tmp_path / "model.safetensors").write_bytes(b"\x00" * 4096)
    (tmp_path / "config.json").write_text("{}")
    assert not is_complete(tmp_path), "no completion record yet: a partial copy"
    _write_completion_record(tmp_path, gguf_sha256="abc")
    assert is_complete(tmp_path)
    with (tmp_path / "model.safetensors").open("r+b") as weights:
        weights.seek(100)
        weights.write(b"\x01")  # same size, different bytes
    assert not is_complete(tmp_path)
    _write_completion_record(tmp_path, gguf_sha256="abc")
    (tmp_path / "config.json").write_text("{ }")
    assert not is_complete(tmp_path), "a file whose size changed"


def test_cli_lists_tasks_and_models_and_reports_bad_input_in_one_line(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from taskvec.cli import main

    assert main(["tasks", "--json"]) == 0
    summaries = json.loads(capsys.readouterr().out)
    assert [s["name"] for s in summaries][:2] == ["country-capital", "country-currency"]
    assert main(["models"]) == 0
    assert "Qwen2VLForConditionalGeneration" in capsys.readouterr().out
    assert main(["models", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert {entry["model_class"] for entry in listed["architectures"]} == set(supported_classes())
    assert {"default", "default-vlm"} <= {name for model in listed["named"] for name in model["names"]}
    assert main(["demo", "--task", "no-such-task"]) == 2
    assert "unknown task 'no-such-task'" in capsys.readouterr().err


def test_cli_extract_patch_and_sweep_on_a_local_checkpoint(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from taskvec.cli import main

    model_dir = save_tiny_checkpoint("llava", tmp_path / "tiny-llava")
    task = tiny_task(tmp_path)
    task_file = tmp_path / "capitals.jsonl"
    task_file.write_text(
        "\n".join(
            json.dumps({"input": i.input, "output": i.output, "image": i.image().name}) for i in task.items
        )
    )
    vector_path = tmp_path / "v.safetensors"
    common = ["--model", str(model_dir), "--json"]
    assert (
        main(
            [
                "extract",
                *common,
                "--task",
                str(task_file),
                "--spec",
                "image-icl",
                "--shots",
                "2",
                "--out",
                str(vector_path),
            ]
        )
        == 0
    )
    extracted = json.loads(capsys.readouterr().out)
    assert extracted["spec"] == "image-icl" and load_task_vector(vector_path).vectors.shape[0] == 3

    assert (
        main(
            [
                "patch",
                *common,
                "--vector",
                str(vector_path),
                "--layer",
                "1",
                "--image",
                str(task.items[0].image()),
            ]
        )
        == 0
    )
    patched = json.loads(capsys.readouterr().out)
    assert patched["prompt"] == "Q:<image>\nA:" and {"patched", "unpatched"} <= set(patched)

    assert (
        main(
            ["sweep", *common, "--vector", str(vector_path), "--task", str(task_file), "--modality", "image"]
        )
        == 0
    )
    swept = json.loads(capsys.readouterr().out)
    assert len(swept["accuracy"]) == 3 and all(0.0 <= a <= 1.0 for a in swept["accuracy"])

    assert (
        main(
            [
                "patch",
                *common,
                "--vector",
                str(tmp_path / "missing.safetensors"),
                "--layer",
                "1",
                "--text",
                "France",
            ]
        )
        == 2
    )
    assert "no task vector file" in capsys.readouterr().err
