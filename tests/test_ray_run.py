"""`taskvec run --ray`: the run's steps on a local Ray cluster of 2 CPU workers give a local run's results.

Compared: results.json apart from timing and step counts, every vector file's tensors, every cached
step. The sequential run is the reference; the Ray runs lose a worker, stop half-way and resume.
Which steps are submitted as others finish is tested with a set order of completions in
test_ray_scheduling.py, not here, where it would depend on how fast the workers happen to run.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from conftest import tiny_handle
from run_fixtures import comparable_run, tiny_base_lm, tiny_config, write_task_file
from tiny_models import save_tiny_checkpoint

from taskvec.experiments import RunConfig, run_experiments
from taskvec.experiments.execution.executors import SequentialExecutor, TestJob
from taskvec.experiments.execution.steps import StepRunner
from taskvec.experiments.results.step_results import TestAnswers
from taskvec.models import load_model
from taskvec.models.load_options import LoadOptions

ray = pytest.importorskip("ray")

from taskvec.experiments.execution.ray_workers import (  # noqa: E402  (after the skip: needs Ray)
    RayExecutor,
    RayMissingError,
    StepsInterrupted,
    WorkerSpec,
    import_ray,
)


@dataclass(frozen=True)
class Setup:
    root: Path
    model: str
    llm: str
    config: RunConfig
    reference: Path


def _run_locally(setup: Setup, out: Path, executor: Any = None) -> None:
    handle, llm = load_model(setup.model), load_model(setup.llm)
    run_experiments(handle, setup.config, out, llm=llm, progress=False, executor=executor)


def _executor(setup: Setup, **changes: Any) -> RayExecutor:
    spec_changes = {key: changes.pop(key) for key in ("exit_once",) if key in changes}
    spec = WorkerSpec(setup.model, LoadOptions(), setup.config, llm=setup.llm, **spec_changes)
    return RayExecutor(spec, workers=2, progress=False, **changes)


def _run_on_ray(setup: Setup, out: Path, **changes: Any) -> RayExecutor:
    executor = _executor(setup, **changes)
    try:
        _run_locally(setup, out, executor)
    finally:
        executor.close()
    return executor


@pytest.fixture(scope="module")
def cluster() -> Iterator[None]:
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Setup:
    root = tmp_path_factory.mktemp("ray-run")
    model = save_tiny_checkpoint("llava", root / "tiny-llava")
    base = tiny_base_lm(tiny_handle("llava"))
    base.model.save_pretrained(root / "tiny-llava-base")
    base.tokenizer.save_pretrained(root / "tiny-llava-base")
    config = tiny_config(write_task_file(root / "task"), ensemble_examples=(0, 2))
    made = Setup(root, str(model), str(root / "tiny-llava-base"), config, root / "reference")
    _run_locally(made, made.reference)
    return made


def test_a_ray_run_equals_the_sequential_run(cluster: None, setup: Setup, tmp_path: Path) -> None:
    executor = _run_on_ray(setup, tmp_path / "ray")
    assert sum(executor.counts.values()) == executor.completed > 0
    assert all(count > 0 for count in executor.counts.values()), "both workers took steps"
    expected, got = comparable_run(setup.reference), comparable_run(tmp_path / "ray")
    assert expected["vectors"] and expected["steps"] and expected["results"]["meta"]["llm"] is not None
    assert "llm-xpatch" in expected["results"]["meta"]["conditions"]
    assert got == expected
    # Every step was the workers': the driver extracted no vector and computed no step itself.
    meta = json.loads((tmp_path / "ray" / "results.json").read_text())["meta"]
    assert meta["steps"]["vectors_extracted"] == 0


def test_a_worker_dying_mid_run_is_replaced_and_the_results_stay_the_same(
    cluster: None, setup: Setup, tmp_path: Path
) -> None:
    marker = tmp_path / "died"
    executor = _run_on_ray(setup, tmp_path / "ray", exit_once=str(marker))
    assert marker.exists() and executor.deaths == 1
    assert comparable_run(tmp_path / "ray") == comparable_run(setup.reference)


def test_a_run_stopped_on_ray_resumes_locally(cluster: None, setup: Setup, tmp_path: Path) -> None:
    out = tmp_path / "run"
    with pytest.raises(StepsInterrupted):
        _run_on_ray(setup, out, stop_after=3)
    assert len(list(out.glob("vectors/**/*.safetensors"))) == 3
    _run_locally(setup, out)
    meta = json.loads((out / "results.json").read_text())["meta"]
    assert meta["steps"]["vectors_extracted"] > 0  # the rest was computed here
    assert comparable_run(out) == comparable_run(setup.reference)


class _StopBeforeTests(SequentialExecutor):
    def tests(self, steps: StepRunner, jobs: Sequence[TestJob]) -> list[list[TestAnswers]]:
        raise KeyboardInterrupt


def test_a_run_stopped_locally_resumes_on_ray(cluster: None, setup: Setup, tmp_path: Path) -> None:
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        _run_locally(setup, out, _StopBeforeTests())
    assert list(out.glob("cache/sweeps/**/*.json")) and not (out / "cache" / "test").exists()
    executor = _run_on_ray(setup, out)
    # Only the test steps were left: vectors and sweeps came from the cache, none was submitted; at
    # most one call per test step (not per cache entry: steps may share one, as a condition no layer
    # helped asks the bare queries unpatched, as no-context does).
    finished = [method for event, method, _ in executor.history if event == "finish"]
    assert set(finished) == {"tests"} and len(finished) == executor.completed
    results = json.loads((out / "results.json").read_text())["results"]
    steps = {(row["condition"], row["task"], row["seed"]) for row in results}
    assert 0 < executor.completed <= len(steps)
    assert comparable_run(out) == comparable_run(setup.reference)


def test_missing_ray_is_a_one_line_error_naming_the_extra(
    setup: Setup, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from taskvec.cli import main

    monkeypatch.setitem(sys.modules, "ray", None)  # import ray raises ImportError
    with pytest.raises(RayMissingError, match=r'pip install -e "\.\[ray\]"'):
        import_ray()
    argv = ["run", "--model", setup.model, "--tasks", *setup.config.tasks, "--quick", "--ray"]
    assert main([*argv, "--out", str(tmp_path / "run"), "--no-analyses"]) == 2
    error = capsys.readouterr().err.strip()
    assert error.count("\n") == 0 and 'pip install -e ".[ray]"' in error


def test_groups_are_halved_until_every_worker_has_one() -> None:
    from taskvec.experiments.execution.ray_workers import _split

    assert _split([(0, [0, 1, 2, 3]), (1, [0])], 3) == [(1, [0]), (0, [0, 1]), (0, [2, 3])]
    assert _split([(0, [0]), (1, [0])], 4) == [(0, [0]), (1, [0])]  # one-step groups stay whole
    assert _split([(0, [0, 1, 2])], 1) == [(0, [0, 1, 2])]


def test_workers_get_a_task_files_images_from_the_driver(
    cluster: None, setup: Setup, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Workers on other machines cannot read the driver's files: with the images gone from the disk
    once the driver has read them to send, the run still gives the sequential run's results."""
    import shutil

    from taskvec.experiments.execution import ray_workers

    task_dir = tmp_path / "task"
    shutil.copytree(setup.root / "task", task_dir)
    config = setup.config.with_options(tasks=(str(task_dir / "country-capital.jsonl"),))
    read = ray_workers.image_files

    def read_then_hide(task: Any) -> Any:
        files = read(task)
        for image in task_dir.glob("*.png"):
            image.rename(image.with_suffix(".hidden"))
        return files

    monkeypatch.setattr(ray_workers, "image_files", read_then_hide)
    moved = Setup(setup.root, setup.model, setup.llm, config, setup.reference)
    _run_on_ray(moved, tmp_path / "ray")
    assert not list(task_dir.glob("*.png"))
    for image in task_dir.glob("*.hidden"):
        image.rename(image.with_suffix(".png"))
    _run_locally(moved, tmp_path / "local")
    # The results name the driver's image paths, not the workers' copies.
    assert comparable_run(tmp_path / "ray") == comparable_run(tmp_path / "local")
    tests = [json.loads(path.read_text()) for path in (tmp_path / "ray" / "cache" / "test").glob("**/*.json")]
    assert any(str(task_dir) in (image or "") for test in tests for image in test["images"])


def test_analyses_on_ray_equal_the_local_analyses_and_the_driver_computes_no_expensive_step(
    cluster: None, setup: Setup, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import shutil

    from taskvec.analysis import EMBEDDING_MAP, LENS, paper_analyses
    from taskvec.experiments import RunResults
    from taskvec.experiments.execution.run_analyses import run_analyses_of_run

    local_dir, ray_dir = tmp_path / "local", tmp_path / "ray"
    shutil.copytree(setup.reference, local_dir)
    shutil.copytree(setup.reference, ray_dir)
    handle, llm = load_model(setup.model), load_model(setup.llm)
    local = run_analyses_of_run(
        handle, RunResults.read(local_dir / "results.json"), local_dir, llm=llm, progress=False
    )
    assert local.result(LENS) and local.result(EMBEDDING_MAP)

    def not_here(*args: object, **kwargs: object) -> object:
        raise AssertionError("the driver computed an analysis step the workers should have")

    for expensive in ("lens_phases", "collect_prompt_points", "task_conflict"):
        monkeypatch.setattr(paper_analyses, expensive, not_here)  # the driver's process only
    executor = _executor(setup)
    try:
        on_ray = run_analyses_of_run(
            handle,
            RunResults.read(ray_dir / "results.json"),
            ray_dir,
            llm=llm,
            progress=False,
            executor=executor,
        )
        assert executor.completed == 2  # the lens of the one task and the 2-D map
    finally:
        executor.close()
    assert on_ray.errors == local.errors == {}
    assert on_ray.results == local.results
