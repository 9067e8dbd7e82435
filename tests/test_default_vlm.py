"""The shipped default VLM (LLaVA on Gemma-3-270M, trained by `taskvec train-vlm`): it loads through
the same adapter as any LLaVA and names pictures in the art style it never saw in training."""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import transformers

from taskvec.experiments import RunConfig, RunResults, run_experiments
from taskvec.models import ModelHandle, load_model
from taskvec.tasks import load_task
from taskvec.vlm.acceptance import icl_accuracy
from taskvec.vlm.artifacts import read_card
from taskvec.vlm.data import entity_images, split_by_style
from taskvec.vlm.evaluation import accuracy_by_family, name_pictures
from taskvec.vlm.recipe import SHIPPED_PARTS_DIR

pytestmark = pytest.mark.slow

# Held-out pictures per family, drawn with a fixed seed: a few, so the test takes seconds.
PICTURES_PER_FAMILY = 12


@pytest.fixture(scope="module")
def default_vlm() -> Iterator[ModelHandle]:
    previous = torch.get_num_threads()
    torch.set_num_threads(max(2, previous))
    yield load_model("default-vlm")
    torch.set_num_threads(previous)


def test_default_vlm_is_a_llava_served_by_the_llava_adapter(default_vlm: ModelHandle) -> None:
    assert type(default_vlm.model) is transformers.LlavaForConditionalGeneration
    assert default_vlm.architecture.family == "llava" and default_vlm.num_layers == 18
    assert type(default_vlm.processor) is transformers.LlavaProcessor


def test_default_vlm_names_held_out_style_pictures(default_vlm: ModelHandle) -> None:
    card = read_card(SHIPPED_PARTS_DIR)
    held_out_style = card["training"]["config"]["held_out"]
    _, held_out = split_by_style(entity_images(), held_out_style)
    rng = random.Random(0)
    sample = []
    for family in ("countries", "animals", "foods"):
        members = [image for image in held_out if image.family == family]
        sample.extend(rng.sample(members, PICTURES_PER_FAMILY))
    accuracy = accuracy_by_family(name_pictures(default_vlm, sample))
    # Floors a little under the model card's held-out figures (same prompt and metric), so a broken
    # assembly (wrong image token, missing LoRA, untrained tower) fails while sampling noise does not.
    assert accuracy["countries"] >= FLOORS["countries"], accuracy
    assert accuracy["animals"] >= FLOORS["animals"], accuracy
    assert accuracy["foods"] >= FLOORS["foods"], accuracy


# Model card, held-out noto: countries 0.59, animals 0.45, foods 0.65 (all pictures); on this sample
# 0.50 / 0.42 / 0.58. The previous default VLM (its tower trained from scratch on flags' colours) had
# 0.98 / 0.37 / 0.40, hence the lower flag floor.
FLOORS = {"countries": 0.35, "animals": 0.25, "foods": 0.35}


# The paper tasks whose text ICL an instruct stage with one fact task per family destroys (0.03 / 0.07
# against the base LM's 0.39 / 0.50): it teaches one answer per food (the category) whatever the
# demonstrations say (docs/VLM_NOTES.md).
DRIFT_PRONE_TASKS = ("food-color", "food-flavor")


def test_the_vlms_language_model_still_learns_text_tasks_in_context_like_the_base_lm(
    default_vlm: ModelHandle,
) -> None:
    base = load_model("default")
    vlm, lm = [], []
    for name in DRIFT_PRONE_TASKS:
        task = load_task(name)
        vlm.append(icl_accuracy(default_vlm, task, modality="text", limit=TEXT_ICL_QUERIES))
        lm.append(icl_accuracy(base, task, modality="text", limit=TEXT_ICL_QUERIES))
    # Text-only ICL within a few points of the base LM (the model card's six-task means: 0.29 vs
    # 0.31; on these two tasks, 50 queries: 0.58 / 0.43 against 0.39 / 0.50).
    assert sum(vlm) / len(vlm) >= sum(lm) / len(lm) - 0.05, {"vlm": vlm, "base_lm": lm}


TEXT_ICL_QUERIES = 30


def test_quick_run_on_the_default_vlm_writes_results_and_patching_beats_no_context(
    default_vlm: ModelHandle, tmp_path: Path
) -> None:
    config = RunConfig.quick_preset()
    results = run_experiments(default_vlm, config, tmp_path, llm=load_model("default"), progress=False)
    saved = RunResults.read(tmp_path / "results.json")
    assert saved.meta.model == "gemma-3-270m-llava" and saved.tasks == list(config.tasks)
    assert (tmp_path / "summary.csv").is_file()
    table = results.table("paper")
    assert table is not None
    paper = {column.column: column.summary for column in table.columns}
    assert set(paper) == {"no-context", "image-icl", "image-icl-patch", "text-icl-xbase", "text-icl-xpatch"}
    # The paper's central claim on an image query: a text-ICL vector patched in beats no context; and
    # the VLM learns from image demonstrations. The previous default VLM measured (30 test queries,
    # 2 tasks) xPatch 0.20 (layer 10), image ICL 0.20, no context 0.03; this one's full run: image
    # ICL 0.26 and xPatch 0.28 on six tasks.
    assert paper["text-icl-xpatch"].mean >= 0.15 > paper["no-context"].mean
    assert paper["image-icl"].mean >= 0.1
    assert results.table("llm_to_vlm") is not None and results.vector_cosine is not None
    # Function vectors beside the residual ones, with the heads of both demonstration kinds per task.
    assert results.table("function_vectors") is not None
    assert {overlap.task for overlap in results.head_overlaps} == set(config.tasks)
