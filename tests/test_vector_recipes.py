"""A new kind of vector is one recipe and one condition, written outside the library: the run makes
it, sweeps it, tests it and shows it in results.json, summary.csv and the report."""

from __future__ import annotations

import dataclasses
import html
import json
from pathlib import Path

import pytest
import torch
from conftest import tiny_handle
from run_fixtures import comparable_run, tiny_config, write_task_file

from taskvec.experiments import (
    Condition,
    MadeVector,
    Needs,
    RecipeContext,
    TableSlot,
    VectorRecipe,
    paper_conditions,
    plan_conditions,
    run_experiments,
    with_condition,
)
from taskvec.experiments.protocol.recipes import IMAGE_ICL, TEXT_ICL, RecipeInput
from taskvec.report import write_report
from taskvec.tasks import Task, load_task
from taskvec.vectors import TaskVector, load_task_vector


@dataclasses.dataclass(frozen=True)
class ScaledMean(VectorRecipe):
    """A made-up kind: the mean of a task's text-ICL and image-ICL vectors, times `factor`."""

    factor: float = 1.5

    @property
    def name(self) -> str:
        return f"scaled-mean-{self.factor:g}"

    @property
    def label(self) -> str:
        return f"{self.factor:g} x mean of text and image ICL"

    def needs(self) -> Needs:
        return Needs(images=True, several_images=True)

    def inputs(self, seed: int) -> list[RecipeInput]:
        return [(TEXT_ICL, seed), (IMAGE_ICL, seed)]

    def identity(self, context: RecipeContext, task: Task, seed: int, inputs: list[str]) -> dict[str, object]:
        return {"scaled_mean_of": inputs, "factor": self.factor}

    def make(self, context: RecipeContext, task: Task, seed: int, inputs: list[torch.Tensor]) -> MadeVector:
        text, image = inputs
        return MadeVector(TaskVector(self.factor * (text + image) / 2, {"spec": "scaled-mean"}))


SCALED_MEAN = Condition(
    "scaled-mean->image",
    "scaled mean vector -> image query",
    "image",
    vector=ScaledMean(),
    seeded=True,
    tables=(TableSlot("made-up", "scaled mean -> image"),),
)


def test_a_vector_kind_written_outside_the_library_reaches_results_csv_and_report(tmp_path: Path) -> None:
    config = tiny_config(write_task_file(tmp_path / "task"), seeds=(0,), ensemble_examples=(0,))
    conditions = with_condition(paper_conditions(config), SCALED_MEAN)
    out = tmp_path / "out"
    results = run_experiments(tiny_handle("llava"), config, out, progress=False, conditions=conditions)

    rows = [row for row in results.results if row.condition == SCALED_MEAN.name]
    assert rows and all(row.n == 6 for row in rows)
    choice = results.layers[SCALED_MEAN.name]
    assert choice.candidates and len(choice.validation_mean) == tiny_handle("llava").num_layers
    assert {row.layer for row in rows} == {choice.chosen}
    table = results.table("made-up")
    assert table is not None and table.column("scaled mean -> image") is not None
    saved = json.loads((out / "results.json").read_text())
    assert SCALED_MEAN.name in saved["meta"]["conditions"]
    assert SCALED_MEAN.name in (out / "summary.csv").read_text()
    assert html.escape("scaled mean -> image") in write_report(out).read_text()

    # The vector patched is the recipe's: factor x the mean of the two stored vectors of the run.
    task = load_task(config.tasks[0])
    text = load_task_vector(out / "vectors" / "vlm" / task.name / "text-icl-seed0.safetensors").vectors
    image = load_task_vector(out / "vectors" / "vlm" / task.name / "image-icl-seed0.safetensors").vectors
    from taskvec.caching import StepCache
    from taskvec.experiments.execution.steps import StepRunner
    from taskvec.experiments.execution.vector_store import VectorStore, run_models

    handle = tiny_handle("llava")
    cache = StepCache(out / "cache")
    store = VectorStore(out, config, cache, run_models(handle, None), progress=False)
    runner = StepRunner(handle, None, config, cache, store, progress=False)
    made = runner.vector_for(SCALED_MEAN, task, 0)
    assert made is not None
    torch.testing.assert_close(made[0], 1.5 * (text + image) / 2)
    assert store.extracted == 0, "the stored inputs are read from the run directory, not made again"


def test_adding_a_condition_of_an_existing_name_replaces_it_and_a_repeated_name_is_refused(
    tmp_path: Path,
) -> None:
    config = tiny_config(write_task_file(tmp_path / "task"), seeds=(0,), ensemble_examples=(0,))
    other = dataclasses.replace(SCALED_MEAN, vector=ScaledMean(2.0))
    once = with_condition(with_condition(paper_conditions(config), SCALED_MEAN), other)
    assert [c for c in once if c.name == SCALED_MEAN.name] == [other]
    handle, task = tiny_handle("llava"), load_task(config.tasks[0])
    with pytest.raises(ValueError, match="repeat a name: scaled-mean->image"):
        plan_conditions(handle, [task], config, None, [*once, SCALED_MEAN])


def test_the_ray_executor_plans_the_new_kind_from_its_recipe_and_equals_the_local_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from test_ray_scheduling import _InProcessRay
    from tiny_models import save_tiny_checkpoint

    from taskvec.experiments.execution import ray_workers
    from taskvec.experiments.execution.ray_workers import RayExecutor, WorkerSpec
    from taskvec.models import load_model
    from taskvec.models.load_options import LoadOptions

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the workers' one thread each: every sum in the same order
    try:
        model = str(save_tiny_checkpoint("llava", tmp_path / "tiny-llava"))
        config = tiny_config(write_task_file(tmp_path / "task"), seeds=(0,), ensemble_examples=(0,))
        conditions = with_condition(paper_conditions(config), SCALED_MEAN)
        run_experiments(load_model(model), config, tmp_path / "local", progress=False, conditions=conditions)
        monkeypatch.setattr(ray_workers, "import_ray", lambda: _InProcessRay(lambda running: running[0]))
        executor = RayExecutor(WorkerSpec(model, LoadOptions(), config), workers=2, progress=False)
        try:
            run_experiments(
                load_model(model),
                config,
                tmp_path / "ray",
                progress=False,
                executor=executor,
                conditions=conditions,
            )
        finally:
            executor.close()
    finally:
        torch.set_num_threads(threads)
    assert comparable_run(tmp_path / "ray") == comparable_run(tmp_path / "local")
    # The new kind's stored inputs were made on the workers, from what its recipe says it needs.
    made = {call[2] for call in executor.history if call[:2] == ("finish", "vector")}
    assert (
        made
        and SCALED_MEAN.name
        in json.loads((tmp_path / "ray" / "results.json").read_text())["meta"]["conditions"]
    )
