"""The Ray executor's dependency rules, with the order in which steps finish set by the test.

RayExecutor talks to Ray through five calls (remote, wait, get, put, kill). Here they go to an
in-process stand-in whose workers are real StepWorkers, and whose `wait` returns the running step a
test's rule picks instead of whichever a real worker happens to finish first. So each test fixes one
order of completions and asserts what the driver submitted in response, whatever the machine's load.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import tiny_handle
from run_fixtures import (
    comparable_run,
    tiny_base_lm,
    tiny_config,
    write_shared_input_task_file,
    write_task_file,
)
from tiny_models import save_tiny_checkpoint

from taskvec.experiments import RunConfig, run_experiments
from taskvec.experiments.execution import ray_workers
from taskvec.experiments.execution.ray_workers import RayExecutor, StepWorker, WorkerSpec
from taskvec.models import load_model
from taskvec.models.load_options import LoadOptions

FIRST, SECOND = "country-capital", "country-currency"


@dataclass(eq=False)  # a reference: hashed by identity, as Ray's ObjectRefs are keys of a dict
class _Step:
    """One submitted actor call, computed when the test's rule lets it finish."""

    worker: StepWorker
    method: str
    args: tuple[Any, ...]
    number: int

    @property
    def task(self) -> str:
        task = self.args[0]
        return str(getattr(task, "name", ""))

    def result(self) -> Any:
        return getattr(self.worker, self.method)(*self.args)


# Which running step finishes next: the test's rule, given the running steps in submission order.
Rule = Callable[[list[_Step]], _Step]


@dataclass
class _Method:
    ray: _InProcessRay
    worker: StepWorker
    name: str

    def remote(self, *args: Any) -> _Step:
        self.ray.submitted += 1
        return _Step(self.worker, self.name, args, self.ray.submitted)


class _Actor:
    def __init__(self, ray: _InProcessRay, spec: WorkerSpec) -> None:
        self._ray, self._worker = ray, StepWorker(spec)

    def __getattr__(self, name: str) -> _Method:
        return _Method(self._ray, self._worker, name)


@dataclass
class _InProcessRay:
    """The part of the `ray` module RayExecutor uses, run in this process in the order `rule` says."""

    rule: Rule
    submitted: int = 0

    class exceptions:  # as ray.exceptions
        class RayError(Exception):
            pass

        class RayActorError(RayError):
            pass

    def is_initialized(self) -> bool:
        return True

    def remote(self, **options: Any) -> Callable[[type], Any]:
        ray = self

        class ActorClass:
            @staticmethod
            def remote(spec: WorkerSpec) -> _Actor:
                return _Actor(ray, spec)

        return lambda cls: ActorClass

    def wait(self, running: list[_Step], num_returns: int = 1) -> tuple[list[_Step], list[_Step]]:
        chosen = self.rule(sorted(running, key=lambda step: step.number))
        return [chosen], [step for step in running if step is not chosen]

    def get(self, value: Any, timeout: float | None = None) -> Any:
        if isinstance(value, list):
            return [self.get(item) for item in value]
        if isinstance(value, _Step):
            return value.result()
        return value  # put() hands objects over as they are

    def put(self, value: Any) -> Any:
        return value

    def kill(self, actor: Any) -> None:
        pass


def _last_of(task: str, method: str) -> Rule:
    """Every other step first; `method` steps of `task` only when nothing else runs."""

    def rule(running: list[_Step]) -> _Step:
        others = [step for step in running if (step.task, step.method) != (task, method)]
        return (others or running)[0]

    return rule


def _last_of_method(method: str) -> Rule:
    def rule(running: list[_Step]) -> _Step:
        others = [step for step in running if step.method != method]
        return (others or running)[0]

    return rule


@dataclass(frozen=True)
class Setup:
    model: str
    llm: str
    config: RunConfig
    reference: Path


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """Workers run on one thread each (WorkerSpec.threads); the reference run does too, so every
    sum is taken in the same order."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory, one_thread: None) -> Setup:
    root = tmp_path_factory.mktemp("ray-scheduling")
    model = save_tiny_checkpoint("llava", root / "tiny-llava")
    base = tiny_base_lm(tiny_handle("llava"))
    base.model.save_pretrained(root / "tiny-llava-base")
    base.tokenizer.save_pretrained(root / "tiny-llava-base")
    write_task_file(root / "tasks")
    second = write_shared_input_task_file(root / "tasks")
    config = tiny_config(root / "tasks" / f"{FIRST}.jsonl")
    config = config.with_options(tasks=(str(root / "tasks" / f"{FIRST}.jsonl"), str(second)))
    made = Setup(str(model), str(root / "tiny-llava-base"), config, root / "reference")
    _run(made, made.reference, executor=None)
    return made


def _run(setup: Setup, out: Path, executor: RayExecutor | None) -> None:
    handle, llm = load_model(setup.model), load_model(setup.llm)
    run_experiments(handle, setup.config, out, llm=llm, progress=False, executor=executor)


History = list[tuple[str, str, str]]


def _run_in_order(setup: Setup, out: Path, rule: Rule, monkeypatch: pytest.MonkeyPatch) -> History:
    """A run on two in-process workers whose steps finish in the order `rule` picks; the driver's
    history of ("submit" | "finish", method, task)."""
    monkeypatch.setattr(ray_workers, "import_ray", lambda: _InProcessRay(rule))
    spec = WorkerSpec(setup.model, LoadOptions(), setup.config, llm=setup.llm)
    executor = RayExecutor(spec, workers=2, progress=False)
    try:
        _run(setup, out, executor)
    finally:
        executor.close()
    return executor.history


def _first(history: History, event: str, method: str, task: str | None = None) -> int:
    return next(i for i, e in enumerate(history) if e[:2] == (event, method) and task in (None, e[2]))


def _last(history: History, event: str, method: str, task: str | None = None) -> int:
    return max(i for i, e in enumerate(history) if e[:2] == (event, method) and task in (None, e[2]))


def _assert_sweeps_wait_for_their_own_vectors_only(history: History) -> None:
    for task in (FIRST, SECOND):
        assert _first(history, "submit", "sweeps", task) > _last(history, "finish", "vector", task), task


@pytest.mark.parametrize(("ready", "held"), [(FIRST, SECOND), (SECOND, FIRST)])
def test_a_tasks_sweeps_are_submitted_once_its_own_vectors_are_in(
    setup: Setup, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, ready: str, held: str
) -> None:
    """With the `held` task's vectors finishing after everything else, the `ready` task's sweeps
    are submitted (and finish) while they still run; no task's sweeps start before its own vectors."""
    history = _run_in_order(setup, tmp_path / "run", _last_of(held, "vector"), monkeypatch)
    _assert_sweeps_wait_for_their_own_vectors_only(history)
    assert _first(history, "submit", "sweeps", ready) < _last(history, "finish", "vector", held)
    assert _last(history, "finish", "sweeps", ready) < _last(history, "finish", "vector", held)
    assert comparable_run(tmp_path / "run") == comparable_run(setup.reference)


def test_unpatched_tests_do_not_wait_for_the_sweeps(
    setup: Setup, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The tests that patch nothing (no context, ICL baselines) need no layer: with every sweep
    finishing last, they are submitted and done before the last sweep finishes."""
    history = _run_in_order(setup, tmp_path / "run", _last_of_method("sweeps"), monkeypatch)
    _assert_sweeps_wait_for_their_own_vectors_only(history)
    assert _first(history, "submit", "tests") < _last(history, "finish", "sweeps")
    assert _first(history, "finish", "tests") < _last(history, "finish", "sweeps")
    assert comparable_run(tmp_path / "run") == comparable_run(setup.reference)
