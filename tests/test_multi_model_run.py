"""`taskvec run --model A B C`: independent runs, one directory each, one after another or on one Ray
cluster; a failing model does not stop the others, and one model keeps the single-run layout.

The two models are a tiny LLaVA (with its base LM as --llm) and a tiny text-only Llama (--llm none),
so each model's own --llm and its own conditions reach its own directory.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from conftest import tiny_handle
from run_fixtures import tiny_base_lm, untimed_results, write_task_file
from tiny_models import save_tiny_checkpoint

import taskvec.cli.run_command as command
from taskvec.cli import main
from taskvec.cli.run_command import RunCommandOptions, models_at_once, per_model_options, run_names

RAY_MISSING = importlib.util.find_spec("ray") is None


@dataclass(frozen=True)
class Models:
    llava: Path
    base: Path  # the tiny LLaVA's own language model, its --llm
    llama: Path
    task: Path

    def argv(self, out: Path, *extra: str) -> list[str]:
        """A quick run on the tiny task, analyses included unless `extra` says --no-analyses."""
        quick = ["--tasks", str(self.task), "--quick", "--shots", "2", "--ensemble-examples", "0", "2"]
        return ["run", *quick, "--quiet", "--threads", "1", "--out", str(out), *extra]

    def both(self) -> list[str]:
        return ["--model", str(self.llava), str(self.llama), "--llm", str(self.base), "none"]


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Models:
    root = tmp_path_factory.mktemp("models")
    base = tiny_base_lm(tiny_handle("llava"))
    base.model.save_pretrained(root / "tiny-llava-base")
    base.tokenizer.save_pretrained(root / "tiny-llava-base")
    return Models(
        save_tiny_checkpoint("llava", root / "tiny-llava"),
        root / "tiny-llava-base",
        save_tiny_checkpoint("llama", root / "tiny-llama"),
        write_task_file(root / "task"),
    )


@pytest.fixture(scope="module")
def sequential(models: Models, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """Both models, one after another, analyses and reports included: the run directory and stdout."""
    out = tmp_path_factory.mktemp("sequential") / "runs"
    printed = io.StringIO()  # a module fixture cannot take capsys
    with contextlib.redirect_stdout(printed):
        assert main([*models.argv(out), *models.both()]) == 0
    return out, printed.getvalue()


def _comparable(run_dir: Path) -> dict[str, Any]:
    return untimed_results(run_dir)


def test_two_models_run_one_after_another_each_in_its_own_directory(
    models: Models, sequential: tuple[Path, str]
) -> None:
    out, printed = sequential
    assert sorted(path.name for path in out.iterdir()) == ["tiny-llama", "tiny-llava"]
    llava, llama = (
        json.loads((out / name / "results.json").read_text()) for name in ("tiny-llava", "tiny-llama")
    )
    assert llava["meta"]["llm"] is not None and "llm-xpatch" in llava["meta"]["conditions"]
    assert llama["meta"]["llm"] is None and "image->text" not in llama["meta"]["conditions"]
    for name in ("tiny-llava", "tiny-llama"):
        assert (out / name / "report.html").is_file() and (out / name / "analysis.json").is_file()
    assert "2 models, 0 failed:" in printed
    assert f"{models.llava} -> {out / 'tiny-llava'}" in printed
    assert f"{models.llama} -> {out / 'tiny-llama'}" in printed


def test_one_model_keeps_the_run_directory_layout(
    models: Models, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    argv = [*models.argv(out, "--no-analyses"), "--model", str(models.llama), "--llm", "none"]
    assert main(argv) == 0
    assert (out / "results.json").is_file() and not (out / "tiny-llama").exists()
    assert "models," not in capsys.readouterr().out  # no summary of several models


@pytest.mark.parametrize("count", [(3, 2), (1, 2)])
def test_an_llm_count_that_fits_no_model_count_fails_before_any_model_loads(
    models: Models,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    count: tuple[int, int],
) -> None:
    def no_loading(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("a model loaded")

    monkeypatch.setattr(command, "load_model", no_loading)
    given, llms = count
    names = [str(models.llava), str(models.llama), "default-vlm"][:given]
    out = tmp_path / "runs"
    argv = [*models.argv(out), "--model", *names, "--llm", *(["none"] * llms)]
    assert main(argv) == 2
    error = capsys.readouterr().err.strip()
    assert error.count("\n") == 0
    assert f"--llm takes one value for every model or one per --model: got {llms} for {given}" in error
    assert not out.exists()


def test_a_failing_model_does_not_stop_the_others(
    models: Models, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    unknown = tmp_path / "unknown-architecture"
    unknown.mkdir()
    (unknown / "config.json").write_text(json.dumps({"architectures": ["NoSuchModel"], "model_type": "nope"}))
    missing = tmp_path / "missing"
    out = tmp_path / "runs"
    argv = [*models.argv(out, "--no-analyses", "--json"), "--model", str(unknown), str(missing)]
    assert main([*argv, str(models.llama), "--llm", "none"]) == 1
    captured = capsys.readouterr()
    runs = {run["model"]: run for run in json.loads(captured.out)["runs"]}
    assert runs[str(models.llama)]["error"] is None
    assert runs[str(models.llama)]["results"] == str(out / "tiny-llama" / "results.json")
    assert (out / "tiny-llama" / "results.json").is_file()
    assert "'NoSuchModel' is not a class" in runs[str(unknown)]["error"]
    assert "is not a checkpoint directory" in runs[str(missing)]["error"]
    for failed in (unknown, missing):
        assert runs[str(failed)]["results"] is None
        assert f"taskvec: error: model {failed}: " in captured.err
        assert f"FAILED  {failed} -> {out / failed.name}: " in captured.err  # --json: printed to stderr
    assert "3 models, 2 failed:" in captured.err


def test_run_names_are_safe_unique_and_independent_of_the_order() -> None:
    assert run_names([("default-vlm", "default"), ("org/Some Model", "none")]) == [
        "default-vlm",
        "Some_Model",
    ]
    assert run_names([("../..", "none"), ("/ckpt/.hidden/", "none")]) == ["model", "hidden"]
    clashing = [("a/model", "none"), ("b/model", "none"), ("c/MODEL", "none")]
    names = run_names(clashing)
    assert len({name.casefold() for name in names}) == 3 and all(
        n.lower().startswith("model-") for n in names
    )
    assert run_names(clashing[::-1]) == names[::-1]
    # The same checkpoint under two base LMs: two runs.
    assert len(set(run_names([("a/model", "x"), ("a/model", "y")]))) == 2
    with pytest.raises(ValueError, match="given twice"):
        run_names([("a/model", "x"), ("a/model", "x")])


def test_one_llm_serves_every_model_and_one_model_keeps_out() -> None:
    options = RunCommandOptions(out="runs")
    (one,) = per_model_options(options, ("a/x",), ("none",))
    assert (one.model, one.llm, one.out) == ("a/x", "none", "runs")
    several = per_model_options(options, ("a/x", "b/y"), ("default",))
    assert [(o.model, o.llm, o.out) for o in several] == [
        ("a/x", "default", str(Path("runs") / "x")),
        ("b/y", "default", str(Path("runs") / "y")),
    ]


class _Cluster:
    def __init__(self, **resources: float) -> None:
        self.resources = resources

    def cluster_resources(self) -> dict[str, float]:
        return self.resources


def test_as_many_models_run_at_once_as_the_cluster_holds_all_their_workers() -> None:
    def at_once(cluster: _Cluster, models: int, workers: int, gpus: float = 0.0) -> int:
        options = RunCommandOptions(workers=workers, gpus_per_worker=gpus)
        return models_at_once(cluster, models, options)  # type: ignore[arg-type]

    assert at_once(_Cluster(CPU=2), 2, 1) == 2
    assert at_once(_Cluster(CPU=2), 2, 2) == 1
    assert at_once(_Cluster(CPU=1), 3, 2) == 1  # too small for one: the run waits as a single run would
    assert at_once(_Cluster(CPU=64, GPU=4), 3, 2, gpus=1) == 2


@pytest.mark.skipif(RAY_MISSING, reason="needs Ray: pip install -e '.[ray]'")
def test_two_models_on_one_ray_cluster_give_the_sequential_results(
    models: Models, sequential: tuple[Path, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import ray

    # Each model's run waits at the barrier until the other's has begun too: run one after the other,
    # the first would wait alone, the barrier would break and its model would fail.
    together = threading.Barrier(2, timeout=300)
    run_model = command.run_model

    def run_model_once_both_started(*args: Any, **kwargs: Any) -> Any:
        together.wait()
        return run_model(*args, **kwargs)

    monkeypatch.setattr(command, "run_model", run_model_once_both_started)
    reference, _ = sequential
    out = tmp_path / "runs"
    # One worker each: on 2 CPUs both models' workers fit, so the two run at the same time.
    argv = [*models.argv(out, "--no-analyses", "--ray", "--workers", "1"), *models.both()]
    assert main(argv) == 0
    assert not ray.is_initialized()  # the command stopped the cluster it started
    for name in ("tiny-llava", "tiny-llama"):
        assert _comparable(out / name) == _comparable(reference / name), name
        meta = json.loads((out / name / "results.json").read_text())["meta"]
        assert meta["steps"]["vectors_extracted"] == 0, "every vector was a worker's"
