"""Analyses on tiny models: lens phases, similarity, 2-D maps, decoded tokens, conflict, run_analyses."""

from __future__ import annotations

import importlib
import json
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest
import torch
from conftest import tiny_handle
from tiny_tasks import make_tiny_tasks

import taskvec.analysis.conflict as conflict_module
import taskvec.analysis.paper_analyses as paper_module
from taskvec.analysis import (
    ANALYSIS_FORMAT,
    CONFLICT,
    CONFLICT_TOTALS,
    DECODED_TOKENS,
    EMBEDDING_MAP,
    LENS,
    LENS_PEAKS,
    PAPER_ANALYSES,
    PHASES,
    QUICK,
    SIMILARITY,
    Analysis,
    AnalysisContext,
    AnalysisDocument,
    AnalysisLayer,
    AnalysisMeta,
    AnalysisSettings,
    PhaseCurves,
    VectorKey,
    analysis_vectors,
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
    with_analysis,
)
from taskvec.analysis.conflict import winner
from taskvec.analysis.tokens import words_probability
from taskvec.caching import StepCache
from taskvec.engine import record_residuals
from taskvec.prompts.settings import PromptSettings
from taskvec.tasks import Task
from taskvec.vectors import VectorSpec, extract_vector


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
    result = lens_phases(handle, tasks[0], max_prompts=3, prompts=PromptSettings(shots=2))
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
    result = lens_phases(tiny_handle("gemma3_text"), tasks[0], max_prompts=2, prompts=PromptSettings(shots=2))
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
    matrix = np.asarray(result.matrix)
    assert matrix.shape == (10, 10) and len(result.labels) == 10
    assert np.allclose(matrix, matrix.T, atol=1e-4) and np.allclose(np.diag(matrix), 1.0, atol=1e-4)
    assert np.asarray(result.matrix_per_layer).shape == (4, 10, 10)
    assert np.allclose(result.matrix_per_layer[2], matrix)
    summary = result.summary
    assert summary.within_task_cross_spec is not None and summary.cross_task is not None
    assert summary.within_task_cross_spec > 0.9 > summary.cross_task
    # A shared offset (the common direction of real residual streams) hides the tasks in raw cosines
    # but not in mean-centred ones.
    offset = {key: value + 50.0 for key, value in vectors.items()}
    shifted = similarity_analysis(offset, layer=2)
    assert shifted.summary.cross_task is not None and shifted.summary.cross_task > 0.99
    centered = shifted.summary_centered
    assert centered.within_task_cross_spec is not None and centered.cross_task is not None
    assert centered.within_task_cross_spec > 0.9 > 0.0 > centered.cross_task
    assert result.llm_vs_vlm is not None
    assert result.llm_vs_vlm.per_task["a"] == pytest.approx([1.0] * 4, abs=1e-4)
    assert set(result.llm_vs_vlm.per_task) == {"a"}


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
    points = collect_prompt_points(handle, tasks, 1, prompts_per_task=3, prompts=PromptSettings(shots=2))
    assert len(points.tasks) == len(points.specs) == 3 * 2 * 3
    assert points.vectors.shape == points.embeddings.shape == (18, handle.hidden_size)
    # Image prompts average their image tokens, text prompts their text: the embeddings differ.
    assert not np.allclose(points.embeddings[0], points.embeddings[3])
    mapped = embedding_map(points, "pca")
    assert len(mapped.vectors.xy) == len(mapped.embeddings.xy) == 18


def test_conflict_pairs_share_inputs_and_counts_sum_to_the_queries(tasks: list[Task]) -> None:
    pairs = [(a.name, b.name) for a, b in shared_input_pairs(tasks)]
    assert pairs == [("tiny-capital", "tiny-flag-colour"), ("tiny-flag-colour", "tiny-capital")]
    assert winner("Paris", ["Paris"], ["blue"]) == "a"
    assert winner(" blue\n", ["Paris"], ["blue"]) == "b"
    assert winner("P", ["Paris"], ["Pink"]) == "both"
    assert winner("Tokyo", ["Paris"], ["blue"]) == "neither"
    handle = tiny_handle("llama")
    vector = torch.randn(handle.num_layers, handle.hidden_size)
    two_shots = PromptSettings(shots=2)
    for context in ("text-icl", "instruction"):
        counts = task_conflict(handle, tasks[0], tasks[1], vector, 1, context=context, prompts=two_shots)
        assert counts.items == 3  # the test split of tiny-capital
        assert sum(counts.baseline.values()) == sum(counts.patched.values()) == counts.items
        assert len(counts.examples) == 3 and counts.examples[0].answer_b in {"white", "orange", "purple"}


# The tiny tasks' validation splits hold 4 or 5 items.
SETTINGS = replace(QUICK, prompts=replace(QUICK.prompts, shots=2))


def _run(handle: Any, tasks: list[Task], cache: StepCache, **options: Any) -> AnalysisDocument:
    options.setdefault("layer", 2)
    options.setdefault("settings", SETTINGS)
    return run_analyses(handle, tasks, cache=cache, progress=False, **options)


@pytest.fixture(scope="module")
def given_vectors(tasks: list[Task]) -> dict[VectorKey, torch.Tensor]:
    handle = tiny_handle("llava")
    return analysis_vectors(handle, tasks, llm=tiny_handle("llava"), settings=SETTINGS)


def test_analysis_vectors_are_extracted_vectors_of_every_spec_the_tasks_take(
    tasks: list[Task], given_vectors: dict[VectorKey, torch.Tensor]
) -> None:
    handle = tiny_handle("llava")
    specs = ("text-icl", "image-icl", "instruction")
    expected = {VectorKey("vlm", t.name, s) for t in tasks for s in specs}
    assert set(given_vectors) == expected | {VectorKey("llm", t.name, "text-icl") for t in tasks}
    reference = extract_vector(
        handle, tasks[0], VectorSpec.IMAGE_ICL, settings=PromptSettings(shots=2), limit=4
    ).vector
    torch.testing.assert_close(given_vectors[VectorKey("vlm", tasks[0].name, "image-icl")], reference.vectors)


def test_run_analyses_fills_the_document_from_the_given_layer_and_vectors(
    tasks: list[Task], given_vectors: dict[VectorKey, torch.Tensor], tmp_path: Path
) -> None:
    handle = tiny_handle("llava")
    vectors = dict(given_vectors)
    # The base-LM vector equal to the VLM's: cosine 1 at every layer.
    capital = vectors[VectorKey("vlm", "tiny-capital", "text-icl")]
    vectors[VectorKey("llm", "tiny-capital", "text-icl")] = capital
    llm = tiny_handle("llava")
    document = _run(handle, tasks, StepCache(tmp_path / "cache"), vectors=vectors, llm=llm, layer_source="t")
    assert document.errors == {}
    assert list(document.results) == [analysis.name for analysis in PAPER_ANALYSES]
    assert document.format == ANALYSIS_FORMAT and document.layer == AnalysisLayer(2, handle.num_layers, "t")
    assert document.meta.model == "tiny-llava" and document.meta.settings.prompts.shots == 2
    assert document.meta.llm_fingerprint == document.meta.model_fingerprint  # the same tiny weights
    assert (
        set(document.vectors) == {key.label for key in vectors}
        and "llm:tiny-capital / text-icl" in document.vectors
    )
    lens, peaks = document.result(LENS), document.result(LENS_PEAKS)
    similarity, decoded = document.result(SIMILARITY), document.result(DECODED_TOKENS)
    mapped, conflict = document.result(EMBEDDING_MAP), document.result(CONFLICT)
    totals = document.result(CONFLICT_TOTALS)
    assert lens and peaks and similarity and decoded and mapped and conflict and totals
    assert set(lens.per_task) == {task.name for task in tasks}
    assert set(peaks.per_spec) == {"text-icl", "image-icl", "instruction"}
    assert similarity.layer == 2 and len(similarity.labels) == len(vectors)
    assert similarity.llm_vs_vlm is not None
    assert similarity.llm_vs_vlm.per_task["tiny-capital"] == pytest.approx([1.0] * 3)
    assert set(decoded.by_model) == {"vlm", "llm"}
    assert len(mapped.tasks) == 3 * 2 * 4
    assert len(conflict.rows) == 4  # 2 ordered pairs x (text ICL, instruction)
    # Scored by the run's protocol: one generated token, prefix match.
    assert all(row.max_new_tokens == 1 and row.metric == "prefix" for row in conflict.rows)
    assert all(row.layer == 2 for row in conflict.rows)
    assert set(totals.per_context) == {"text-icl", "instruction"}

    path = document.write(tmp_path / "analysis.json")
    assert AnalysisDocument.read(path) == document
    assert AnalysisDocument.from_json(json.loads(path.read_text())).to_json() == document.to_json()
    # analysis.json stays plain JSON, each result as its dataclass's fields.
    written = json.loads(path.read_text())["results"]
    assert written["conflict"]["rows"][0]["examples"][0].keys() == {
        "input",
        "answer_a",
        "answer_b",
        "baseline",
        "patched",
    }
    assert written["decoded_tokens"]["by_model"]["vlm"]["tiny-capital / text-icl"][0][0].keys() == {
        "token",
        "probability",
    }
    # A result that does not fit its type is refused, naming the field.
    written["similarity"]["summary"]["cross_task"] = "high"
    with pytest.raises(ValueError, match=r"analysis\.results\.similarity\.summary\.cross_task: expected"):
        AnalysisDocument.from_json({**json.loads(path.read_text()), "results": written})


def test_analysis_documents_of_another_format_or_missing_fields_are_refused(tmp_path: Path) -> None:
    meta = AnalysisMeta("m", None, "0", "abc", None, QUICK, False, "now", 1.0)
    document = AnalysisDocument(
        meta=meta, tasks=["t"], layer=AnalysisLayer(1, 3, "test"), vectors={}, results={"x": 1}, errors={}
    )
    data = document.to_json()
    assert AnalysisDocument.from_json(data) == document
    # Format 2's settings, the prompt settings flat among them: refused, not read as the defaults.
    flat_settings = {k: v for k, v in data["meta"]["settings"].items() if k != "prompts"}
    flat_settings |= {"shots": 2, "seed": 0, "template": "qa", "batch_size": 4}
    format_2 = {**data, "format": 2, "meta": {**data["meta"], "settings": flat_settings}}
    with pytest.raises(ValueError, match="format 2, this taskvec reads format 3: run the analyses again"):
        AnalysisDocument.from_json(format_2)
    with pytest.raises(ValueError, match="format 1, this taskvec reads format 3"):
        AnalysisDocument.from_json({**data, "format": 1})
    with pytest.raises(ValueError, match="analysis: missing field 'results'"):
        AnalysisDocument.from_json({k: v for k, v in data.items() if k != "results"})
    without = {k: v for k, v in data["meta"].items() if k != "model_fingerprint"}
    with pytest.raises(ValueError, match=r"analysis\.meta: missing field 'model_fingerprint'"):
        AnalysisDocument.from_json({**data, "meta": without})
    with pytest.raises(ValueError, match=r"analysis\.layer\.chosen: expected int, got '2'"):
        AnalysisDocument.from_json({**data, "layer": {"chosen": "2", "num_layers": 3, "source": ""}})
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(ValueError, match=r"bad\.json is not JSON"):
        AnalysisDocument.read(tmp_path / "bad.json")


def _forbid(monkeypatch: pytest.MonkeyPatch, *names: str) -> None:
    def fail(*_args: Any, **_kwargs: Any) -> Any:
        raise AssertionError("a cached step ran again")

    for name in names:
        monkeypatch.setattr(paper_module, name, fail)


def test_identical_calls_are_served_from_the_cache_and_changed_inputs_recompute(
    tasks: list[Task],
    given_vectors: dict[VectorKey, torch.Tensor],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    handle = tiny_handle("llava")
    cache = StepCache(tmp_path / "cache")
    first = _run(handle, tasks, cache, vectors=given_vectors)
    assert first.errors == {} and cache.hits == 0

    steps = ("lens_phases", "similarity_analysis", "decode_vectors", "collect_prompt_points", "task_conflict")
    _forbid(monkeypatch, *steps)
    again = _run(handle, tasks, cache, vectors=given_vectors)
    assert again.errors == {} and again.results == first.results

    # Another layer: the steps that read it run again (and fail here); the lens and the decoded
    # tokens read every layer and are served from the cache.
    other_layer = _run(handle, tasks, cache, vectors=given_vectors, layer=1)
    assert {"lens", "lens_peaks", "decoded_tokens"} <= set(other_layer.results)
    assert {"similarity", "embedding_map", "conflict", "conflict_totals"} <= set(other_layer.errors)
    assert sum(name.startswith("conflict/") for name in other_layer.errors) == 4
    assert "AssertionError: a cached step ran again" in other_layer.errors["similarity"]

    # Another value of tiny-flag-colour's text-ICL vector: the steps reading it run again; the conflict
    # patching tiny-capital's vector into tiny-flag-colour prompts does not.
    changed = dict(given_vectors)
    flag_colour = VectorKey("vlm", "tiny-flag-colour", "text-icl")
    changed[flag_colour] = changed[flag_colour] + 1
    other_vector = _run(handle, tasks, cache, vectors=changed)
    assert {"lens", "embedding_map"} <= set(other_vector.results)
    assert {"similarity", "decoded_tokens"} <= set(other_vector.errors)
    failed = {name for name in other_vector.errors if name.startswith("conflict/")}
    assert failed == {f"conflict/{way}/tiny-capital--tiny-flag-colour" for way in ("text-icl", "instruction")}
    conflict = other_vector.result(CONFLICT)
    assert conflict is not None and len(conflict.rows) == 2  # the pair whose vector is unchanged, cached

    # Other settings: every step runs again.
    other_settings = _run(handle, tasks, cache, vectors=given_vectors, settings=replace(SETTINGS, top_k=2))
    assert {"lens", "similarity", "decoded_tokens", "embedding_map", "conflict"} <= set(other_settings.errors)


def test_step_keys_follow_model_weights_task_content_and_settings(tasks: list[Task], tmp_path: Path) -> None:
    handle = tiny_handle("llava")

    def key(model: Any = handle, task: Task = tasks[0], settings: AnalysisSettings = SETTINGS) -> str:
        context = AnalysisContext(model, None, (task,), 1, {}, settings, StepCache(tmp_path))
        return context.cache.key(context.identity("lens/x", tasks=[task]))

    base = key()
    assert key() == base
    retrained = tiny_handle("llava")  # same name, other weights
    with torch.no_grad():
        next(retrained.model.parameters()).add_(1.0)
    assert key(model=retrained) != base
    edited = replace(tasks[0], items=(tasks[0].items[1], tasks[0].items[0], *tasks[0].items[2:]))
    assert key(task=edited) != base
    assert key(settings=replace(SETTINGS, conflict_max_new_tokens=4)) != base
    # Every prompt setting, nested in the analyses' settings, is part of the key.
    other_prompts: dict[str, Any] = {
        "shots": 3,
        "seed": 1,
        "style": "sketch",
        "template": "chat",
        "batch_size": 2,
    }
    assert set(other_prompts) == {setting.name for setting in fields(PromptSettings)}
    prompt_keys = set()
    for name, value in other_prompts.items():
        assert getattr(SETTINGS.prompts, name) != value
        prompt_keys.add(key(settings=replace(SETTINGS, prompts=replace(SETTINGS.prompts, **{name: value}))))
    assert len(prompt_keys) == len(other_prompts) and base not in prompt_keys


@dataclass
class VectorCount:
    vectors: int
    layer: int


def test_an_analysis_in_the_list_lands_in_the_document_and_a_failing_one_in_errors(
    tasks: list[Task], given_vectors: dict[VectorKey, torch.Tensor], tmp_path: Path
) -> None:
    def count(context: AnalysisContext) -> VectorCount:
        return context.cached(
            "vector-count", lambda: VectorCount(len(context.vectors), context.layer), VectorCount
        )

    def broken(_context: AnalysisContext) -> list[str]:
        raise RuntimeError("no luck")

    vector_count = Analysis("vector_count", count, VectorCount)
    analyses = with_analysis((), vector_count)
    analyses = with_analysis(analyses, Analysis("broken", broken, list))
    analyses = with_analysis(analyses, Analysis("after", lambda context: sorted(context.results), list))
    analyses = with_analysis(analyses, Analysis("untyped", lambda context: {"a": 1}, VectorCount))
    # Adding an analysis of a name the list has replaces it in place (a re-run notebook cell).
    assert with_analysis(analyses, vector_count) == analyses
    document = _run(
        tiny_handle("llava"), tasks, StepCache(tmp_path), vectors=given_vectors, analyses=analyses
    )
    assert document.results == {"vector_count": VectorCount(len(given_vectors), 2), "after": ["vector_count"]}
    assert document.result(vector_count) == VectorCount(len(given_vectors), 2)
    assert document.errors == {
        "broken": "RuntimeError: no luck",
        "untyped": "TypeError: returned a dict, not the VectorCount it declares",
    }
    with pytest.raises(ValueError, match="two analyses of one name"):
        _run(
            tiny_handle("llava"),
            tasks,
            StepCache(tmp_path),
            vectors={},
            analyses=(vector_count, vector_count),
        )


def test_the_conflict_generates_in_batches_of_the_settings_batch_size(
    tasks: list[Task],
    given_vectors: dict[VectorKey, torch.Tensor],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    generate = conflict_module.generate_answers
    batch_sizes: list[int] = []

    def recording(*args: Any, batch_size: int, **kwargs: Any) -> list[str]:
        batch_sizes.append(batch_size)
        answers: list[str] = generate(*args, batch_size=batch_size, **kwargs)
        return answers

    monkeypatch.setattr(conflict_module, "generate_answers", recording)
    settings = replace(SETTINGS, prompts=replace(SETTINGS.prompts, batch_size=3))
    document = _run(
        tiny_handle("llava"),
        tasks,
        StepCache(tmp_path),
        vectors=given_vectors,
        settings=settings,
        only=("conflict",),
    )
    assert document.errors == {} and batch_sizes and set(batch_sizes) == {3}


def test_a_distributed_run_splits_the_analyses_as_each_one_says(tasks: list[Task]) -> None:
    from taskvec.experiments.execution.ray_workers import analysis_parts

    named = [(name, [task.name for task in group]) for name, group in analysis_parts(tasks)]
    assert named == [
        *(("lens", [task.name]) for task in tasks),
        ("embedding_map", [task.name for task in tasks]),
        ("conflict", ["tiny-capital", "tiny-flag-colour"]),  # one step for both orders of the pair
    ]
    pairs = Analysis("pairs", lambda context: [], list, worker_steps=lambda given: [list(given[:2])])
    assert analysis_parts(tasks, (pairs, LENS_PEAKS)) == [("pairs", tasks[:2])]


def test_run_analyses_refuses_a_layer_or_vector_the_model_does_not_have(
    tasks: list[Task], tmp_path: Path
) -> None:
    handle = tiny_handle("llava")
    with pytest.raises(ValueError, match="layer 3 is not one of"):
        _run(handle, tasks, StepCache(tmp_path), vectors={}, layer=3)
    wrong = {VectorKey("vlm", "tiny-capital", "text-icl"): torch.zeros(2, handle.hidden_size)}
    with pytest.raises(ValueError, match=r"tiny-capital / text-icl has shape \(2, "):
        _run(handle, tasks, StepCache(tmp_path), vectors=wrong)


def test_lens_command_on_a_saved_checkpoint(
    tasks: list[Task], tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
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

    # The prompt flags reach the lens as its PromptSettings: one prompt per batch, the same curves.
    batch_sizes: list[int] = []
    # The package exports a function of the module's name: reach the module itself.
    lens_module = importlib.import_module("taskvec.analysis.lens_phases")
    curves_of = lens_module.phase_curves

    def recording(*args: Any, batch_size: int, **kwargs: Any) -> PhaseCurves:
        batch_sizes.append(batch_size)
        return curves_of(*args, batch_size=batch_size, **kwargs)

    monkeypatch.setattr(lens_module, "phase_curves", recording)
    assert main([*argv, "--prompts", "2", "--shots", "2", "--batch-size", "1", "--json"]) == 0
    one_at_a_time = json.loads(capsys.readouterr().out)
    assert batch_sizes == [1, 1]  # text-icl and image-icl
    for spec, expected in result["curves"].items():
        for phase in PHASES:
            got = one_at_a_time["curves"][spec]["relative"][phase]
            assert got == pytest.approx(expected["relative"][phase], abs=1e-5), (spec, phase)
