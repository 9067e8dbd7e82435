"""Analyses on tiny models: lens phases, similarity, 2-D maps, decoded tokens, conflict, run_analyses."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest
import torch
from conftest import tiny_handle
from tiny_tasks import make_tiny_tasks

import taskvec.analysis.run as run_module
from taskvec.analysis import (
    PHASES,
    VectorKey,
    collect_prompt_points,
    decode_vector,
    embedding_map,
    first_token_variants,
    lens_phases,
    neighbour_agreement,
    project_2d,
    run_analyses,
    shared_input_pairs,
    similarity_analysis,
    task_conflict,
)
from taskvec.analysis.conflict import winner
from taskvec.analysis.tokens import words_probability
from taskvec.engine import record_residuals
from taskvec.tasks import Task
from taskvec.vectors import TaskVector, save_task_vector


@pytest.fixture(scope="module")
def tasks(tmp_path_factory: pytest.TempPathFactory) -> list[Task]:
    return make_tiny_tasks(tmp_path_factory.mktemp("images"))


class SentencepieceLikeTokenizer:
    """Holds "Paris" and "▁Paris" as different ids, like Gemma's vocabulary."""

    unk_token_id = 0
    vocab: ClassVar[dict[str, int]] = {
        "Paris": 5,
        " Paris": 6,
        "capital": 7,
        " capital": 8,
        "Capital": 9,
        " Capital": 10,
    }

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict[str, list[int]]:
        return {"input_ids": [self.vocab.get(text, self.unk_token_id)]}

    def decode(self, ids: list[int]) -> str:
        return {v: k for k, v in self.vocab.items()}.get(ids[0], "<unk>")


def test_word_probability_is_the_max_over_leading_space_variants() -> None:
    tokenizer = SentencepieceLikeTokenizer()
    assert first_token_variants(tokenizer, "Paris") == [5, 6]
    assert first_token_variants(tokenizer, "capital", capitalised=True) == [7, 8, 9, 10]
    assert first_token_variants(tokenizer, "Atlantis") == []  # only the unknown token: no variant
    probabilities = torch.zeros(2, 12)
    probabilities[0, 5], probabilities[0, 6] = 0.1, 0.3
    probabilities[1, 9] = 0.2
    paris = words_probability(probabilities, [first_token_variants(tokenizer, "Paris")])
    assert paris.tolist() == pytest.approx([0.3, 0.0])
    both = [
        first_token_variants(tokenizer, "Paris"),
        first_token_variants(tokenizer, "capital", capitalised=True),
    ]
    assert words_probability(probabilities, both, "sum").tolist() == pytest.approx([0.3, 0.2])


def test_lens_phases_are_relative_curves_over_layers_with_their_peaks(tasks: list[Task]) -> None:
    handle = tiny_handle("llava")
    result = lens_phases(handle, tasks[0], max_prompts=3, shots=2)
    assert set(result.curves) == {"text-icl", "image-icl", "instruction"} and not result.skipped
    for curves in result.curves.values():
        assert curves.prompts == 3
        for phase in PHASES:
            relative = np.asarray(curves.relative[phase])
            assert relative.shape == (handle.num_layers,)
            assert relative.sum() == pytest.approx(1.0, abs=1e-5)
            assert (np.asarray(curves.probability[phase]) > 0).all()
            assert curves.peak_layer[phase] == int(relative.argmax())
        assert curves.prompts_without_token == dict.fromkeys(PHASES, 0)
    json.dumps(result.as_dict())  # plain data


def test_lens_phases_skip_image_icl_on_a_text_model(tasks: list[Task]) -> None:
    result = lens_phases(tiny_handle("gemma3_text"), tasks[0], max_prompts=2, shots=2)
    assert set(result.curves) == {"text-icl", "instruction"}
    assert "text-only" in result.skipped["image-icl"]


def test_a_vector_decodes_like_the_model_output_softcap_applied_once() -> None:
    handle = tiny_handle("gemma3_text")  # final_logit_softcapping=30
    inputs = handle.build_inputs(["Q:France\nA:"])
    residuals = record_residuals(handle, inputs, -1)[0, :, 0]  # [layers, hidden]
    decoded = decode_vector(handle, residuals, k=3)
    assert len(decoded) == handle.num_layers and all(len(row) == 3 for row in decoded)
    with torch.no_grad():
        expected = handle.model(**inputs).logits[0, -1].softmax(-1)
    token, probability = decoded[-1][0]
    assert token == handle.tokenizer.decode([int(expected.argmax())])
    assert probability == pytest.approx(float(expected.max()), rel=1e-4)


def _vectors(seed: int = 0) -> dict[VectorKey, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    vectors = {}
    for task in ("a", "b", "c"):
        base = torch.randn(4, 16, generator=generator)
        for spec in ("text-icl", "image-icl", "instruction"):
            vectors[VectorKey("vlm", task, spec)] = base + 0.1 * torch.randn(4, 16, generator=generator)
    return vectors


def test_similarity_matrix_is_symmetric_with_unit_diagonal_and_separates_tasks() -> None:
    vectors = _vectors()
    vectors[VectorKey("llm", "a", "text-icl")] = vectors[VectorKey("vlm", "a", "text-icl")] * 2
    result = similarity_analysis(vectors, layer=2)
    matrix = np.asarray(result["matrix"])
    assert matrix.shape == (10, 10) and len(result["labels"]) == 10
    assert np.allclose(matrix, matrix.T, atol=1e-4) and np.allclose(np.diag(matrix), 1.0, atol=1e-4)
    assert np.asarray(result["matrix_per_layer"]).shape == (4, 10, 10)
    assert np.allclose(result["matrix_per_layer"][2], matrix)
    summary = result["summary"]
    assert summary["within_task_cross_spec"] > 0.9 > summary["cross_task"]
    # A shared offset (the common direction of real residual streams) hides the tasks in raw cosines
    # but not in mean-centred ones.
    offset = {key: value + 50.0 for key, value in vectors.items()}
    shifted = similarity_analysis(offset, layer=2)
    assert shifted["summary"]["cross_task"] > 0.99
    centered = shifted["summary_centered"]
    assert centered["within_task_cross_spec"] > 0.9 > 0.0 > centered["cross_task"]
    assert result["llm_vs_vlm"]["per_task"]["a"] == pytest.approx([1.0] * 4, abs=1e-4)
    assert set(result["llm_vs_vlm"]["per_task"]) == {"a"}


def test_projections_keep_one_point_per_row_and_neighbours_follow_clusters() -> None:
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(3, 20)) * 5
    points = np.concatenate([centre + rng.normal(size=(6, 20)) * 0.1 for centre in centres])
    labels = [str(i) for i in range(3) for _ in range(6)]
    for method in ("tsne", "pca"):
        assert project_2d(points, method).shape == (18, 2)  # type: ignore[arg-type]
    assert project_2d(points[:3], "tsne").shape == (3, 2)  # too few for t-SNE: PCA
    assert neighbour_agreement(points, labels) == 1.0
    # Labels that differ within every cluster: no nearest neighbour shares one.
    assert neighbour_agreement(points, [str(i % 6) for i in range(18)]) == 0.0


def test_prompt_points_cover_every_task_and_spec(tasks: list[Task]) -> None:
    handle = tiny_handle("llava")
    points = collect_prompt_points(handle, tasks, 1, prompts_per_task=3, shots=2)
    assert len(points.tasks) == len(points.specs) == 3 * 2 * 3
    assert points.vectors.shape == points.embeddings.shape == (18, handle.hidden_size)
    # Image prompts average their image tokens, text prompts their text: the embeddings differ.
    assert not np.allclose(points.embeddings[0], points.embeddings[3])
    mapped = embedding_map(points, "pca")
    assert len(mapped["vectors"]["xy"]) == len(mapped["embeddings"]["xy"]) == 18


def test_conflict_pairs_share_inputs_and_counts_sum_to_the_queries(tasks: list[Task]) -> None:
    pairs = [(a.name, b.name) for a, b in shared_input_pairs(tasks)]
    assert pairs == [("tiny-capital", "tiny-flag-colour"), ("tiny-flag-colour", "tiny-capital")]
    assert winner("Paris", ["Paris"], ["blue"]) == "a"
    assert winner(" blue\n", ["Paris"], ["blue"]) == "b"
    assert winner("P", ["Paris"], ["Pink"]) == "both"
    assert winner("Tokyo", ["Paris"], ["blue"]) == "neither"
    handle = tiny_handle("llama")
    vector = torch.randn(handle.num_layers, handle.hidden_size)
    for context in ("text-icl", "instruction"):
        counts = task_conflict(handle, tasks[0], tasks[1], vector, 1, context=context, shots=2)  # type: ignore[arg-type]
        assert counts.items == 3  # the test split of tiny-capital
        assert sum(counts.baseline.values()) == sum(counts.patched.values()) == counts.items
        assert len(counts.examples) == 3 and counts.examples[0]["answer_b"] in {"white", "orange", "purple"}


def _results_with_layer(run_dir: Path, layer: int) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    layers = {"text-icl-xpatch": {"chosen": layer, "validation_mean": [0.1, 0.2, 0.3]}}
    (run_dir / "results.json").write_text(json.dumps({"format": 1, "layers": layers}))


def test_run_analyses_writes_analysis_json_reads_saved_vectors_and_resumes(
    tasks: list[Task], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    handle = tiny_handle("llava")
    _results_with_layer(tmp_path, 2)
    saved = TaskVector(torch.ones(handle.num_layers, handle.hidden_size), {"task": "tiny-capital"})
    save_task_vector(saved, tmp_path / "vectors" / "vlm" / "tiny-capital" / "text-icl-seed0.safetensors")
    save_task_vector(saved, tmp_path / "vectors" / "llm" / "tiny-capital" / "text-icl-seed0.safetensors")

    first = run_analyses(handle, tasks, tmp_path, quick=True, progress=False)
    assert first["errors"] == {}
    assert first["layer"]["chosen"] == 2 and "text-icl-xpatch" in first["layer"]["source"]
    written = json.loads((tmp_path / "analysis.json").read_text())
    assert written["similarity"] == first["similarity"]
    assert set(written["lens"]) == {task.name for task in tasks}
    assert first["vectors"]["tiny-capital / text-icl"]["source"] == "run"
    assert first["vectors"]["tiny-flag-colour / text-icl"]["source"] == "computed by the analyses"
    # The saved base-LM vector equals the saved VLM vector: cosine 1 at every layer.
    assert first["similarity"]["llm_vs_vlm"]["per_task"]["tiny-capital"] == pytest.approx([1.0] * 3)
    assert len(first["conflict"]) == 4  # 2 ordered pairs x (text ICL, instruction)
    assert "embedding_map" in written and len(written["embedding_map"]["tasks"]) == 3 * 2 * 4

    def fail(*_args: Any, **_kwargs: Any) -> Any:
        raise AssertionError("a cached step ran again")

    monkeypatch.setattr(run_module, "lens_phases", fail)
    monkeypatch.setattr(run_module, "task_conflict", fail)
    (tmp_path / "analysis.json").unlink()
    second = run_analyses(handle, tasks, tmp_path, quick=True, progress=False)
    assert (
        second["errors"] == {} and second["lens"] == first["lens"] and second["conflict"] == first["conflict"]
    )

    _results_with_layer(tmp_path, 1)  # another layer: cached steps are stale and run again
    third = run_analyses(handle, tasks, tmp_path, quick=True, progress=False)
    assert third["layer"]["chosen"] == 1
    failed = set(third["errors"])
    assert {f"lens-{task.name}" for task in tasks} <= failed
    assert sum(name.startswith("conflict-") for name in failed) == 4
    assert "AssertionError: a cached step ran again" in third["errors"]["lens-tiny-capital"]


def test_lens_command_on_a_saved_checkpoint(
    tasks: list[Task], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from tiny_models import build_tiny

    from taskvec.cli import main

    tiny = build_tiny("llava")
    tiny.model.save_pretrained(tmp_path / "model")
    tiny.processor.save_pretrained(tmp_path / "model")
    task_file = tmp_path / "capitals.jsonl"
    rows = [{"input": i.input, "output": i.output, "image": str(i.image())} for i in tasks[0].items]
    task_file.write_text("\n".join(json.dumps(row) for row in rows))
    argv = ["lens", "--model", str(tmp_path / "model"), "--task", str(task_file), "--spec", "all"]
    assert main([*argv, "--prompts", "2", "--shots", "2", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert set(result["curves"]) == {"text-icl", "image-icl"}
    assert result["skipped"] == {"instruction": "task capitals has no instruction"}
    curves = result["curves"]["image-icl"]
    assert (
        curves["prompts"] == 2
        and len(curves["relative"]["answer"]) == tiny.model.config.text_config.num_hidden_layers
    )
    # An external file has no task words: the task phase is reported as absent, not as noise.
    assert curves["peak_layer"]["task"] is None and curves["prompts_without_token"]["task"] == 2
    assert main([*argv[:-2], "--spec", "text-icl", "--prompts", "2", "--shots", "2"]) == 0
    assert "peak layers: input" in capsys.readouterr().out
