"""Faults a run survives and inputs it refuses: unreadable results, damaged cache entries, concurrent
writers, a second run into a busy directory, Ctrl-C, and a t-SNE map that a resume must not move."""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import subprocess
import sys
import threading
import warnings
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import tiny_handle
from run_fixtures import tiny_config, write_task_file
from tiny_models import save_tiny_checkpoint
from tiny_tasks import make_tiny_tasks

from taskvec.analysis import EMBEDDING_MAP, QUICK, EmbeddingMap, PromptPoints, embedding_map, run_analyses
from taskvec.atomic_files import write_json_atomically
from taskvec.caching import CacheEntryWarning, StepCache
from taskvec.cli import main
from taskvec.experiments import RunConfig, RunResults, run_experiments
from taskvec.experiments.execution.run_lock import LOCK_FILE, run_directory_lock
from taskvec.experiments.execution.steps import StepRunner
from taskvec.experiments.results.run_results import RESULTS_FORMAT
from taskvec.report import PAPER_SECTIONS, ReportSection, with_section, write_report

Run = tuple[Path, RunConfig]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory) -> Run:
    """A tiny run without analyses (the report says they are missing) and its report."""
    root = tmp_path_factory.mktemp("faults")
    config = tiny_config(write_task_file(root / "task"))
    run_experiments(tiny_handle("llava"), config, root / "out", progress=False)
    write_report(root / "out")
    return root / "out", config


def _copy(run: Run, tmp_path: Path) -> Path:
    out = tmp_path / "out"
    shutil.copytree(run[0], out)
    return out


def _files(directory: Path) -> dict[str, bytes]:
    return {
        str(path.relative_to(directory)): path.read_bytes() for path in directory.rglob("*") if path.is_file()
    }


# ---- taskvec report ------------------------------------------------------------------------------


def _future_format(path: Path) -> None:
    path.write_text(json.dumps({**json.loads(path.read_text()), "format": 99}))


def _truncated(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _empty(path: Path) -> None:
    path.write_text("")


def _wrong_types(path: Path) -> None:
    path.write_text(json.dumps({**json.loads(path.read_text()), "results": "not a list"}))


@pytest.mark.parametrize(
    ("damage", "said"),
    [
        (_future_format, f"format 99; this taskvec reads format {RESULTS_FORMAT}"),
        (_truncated, "is not JSON (truncated?)"),
        (_empty, "is empty"),
        (_wrong_types, "results.results: expected a list"),
    ],
)
def test_report_refuses_an_unreadable_results_json_and_keeps_the_last_report(
    finished_run: Run,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    damage: Callable[[Path], None],
    said: str,
) -> None:
    out = _copy(finished_run, tmp_path)
    damage(out / "results.json")
    before = _files(out)
    capsys.readouterr()
    assert main(["report", str(out)]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and error.startswith("taskvec: error: no report written: ")
    assert str(out / "results.json") in error and said in error
    assert _files(out) == before  # report.html and every figure as they were, no temporary left


def test_report_refuses_an_unreadable_analysis_json(
    finished_run: Run, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = _copy(finished_run, tmp_path)
    (out / "analysis.json").write_bytes(b"\xff\xfe not json")
    before = _files(out)
    assert main(["report", str(out)]) == 2
    assert f"{out / 'analysis.json'} is not JSON" in capsys.readouterr().err
    assert _files(out) == before


def test_report_refuses_a_folder_that_is_not_a_run_and_writes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "notes.txt").write_text("not a run")
    assert main(["report", str(tmp_path)]) == 2
    assert "is not a run directory: it has no results.json or analysis.json" in capsys.readouterr().err
    assert sorted(path.name for path in tmp_path.iterdir()) == ["notes.txt"]


def test_a_report_that_fails_half_way_leaves_the_last_report_and_figures(
    finished_run: Run, tmp_path: Path
) -> None:
    out = _copy(finished_run, tmp_path)
    before = _files(out)
    assert any(name.startswith("figures/") for name in before)

    def fail(context: Any) -> str:
        raise RuntimeError("a section failed")

    failing = with_section(PAPER_SECTIONS, ReportSection("failing", "Failing", "results", fail), before=None)
    with pytest.raises(RuntimeError, match="a section failed"):
        write_report(out, sections=failing)
    assert _files(out) == before
    write_report(out)  # and a report that succeeds replaces them, leaving no temporary file
    assert not [path for path in out.rglob("*.partial")]


# ---- the cache -----------------------------------------------------------------------------------


def _first(out: Path, pattern: str) -> Path:
    return sorted(out.glob(pattern))[0]


def _not_utf8(path: Path) -> None:
    path.write_bytes(b"\xff\xfe{\x80")


def _empty_object(path: Path) -> None:
    path.write_text("{}")


def _one_query_short(path: Path) -> None:
    """A sweep entry that reads as a whole sweep of one query fewer: every per-query list shortened."""
    entry = json.loads(path.read_text())
    per_query = {name: entry[name][:-1] for name in ("inputs", "expected", "unpatched", "tokens")}
    per_scale = [grid[:-1] for grid in entry["tokens_per_scale"]]
    path.write_text(json.dumps({**entry, **per_query, "tokens_per_scale": per_scale}))


@pytest.mark.parametrize(
    ("pattern", "damage"),
    [
        ("cache/sweeps/*/*.json", _not_utf8),
        ("cache/sweeps/*/*.json", _empty_object),
        ("cache/sweeps/*/*.json", _one_query_short),
        ("cache/test/*/*.json", _empty_object),
        ("cache/test/*/*.json", _not_utf8),
        ("cache/residuals/vlm/*/text-icl-seed0-*.safetensors", _truncated),
        ("vectors/vlm/*/text-icl-seed0.safetensors", _truncated),
    ],
)
def test_an_unusable_cache_entry_is_recomputed_with_a_warning_naming_it(
    finished_run: Run, tmp_path: Path, pattern: str, damage: Callable[[Path], None]
) -> None:
    out = _copy(finished_run, tmp_path)
    damaged = _first(out, pattern)
    damage(damaged)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rerun = run_experiments(tiny_handle("llava"), finished_run[1], out, progress=False)
    named = [str(w.message) for w in caught if issubclass(w.category, CacheEntryWarning)]
    assert named and all(message.startswith(f"{damaged}: ") for message in named), named
    assert all("\n" not in message and message.endswith("computing it again") for message in named)
    original = RunResults.read(finished_run[0] / "results.json")
    assert rerun.results == original.results and rerun.layers == original.layers
    # Recomputed and rewritten: the next run reads it without a warning.
    with warnings.catch_warnings():
        warnings.simplefilter("error", CacheEntryWarning)
        run_experiments(tiny_handle("llava"), finished_run[1], out, progress=False)


def test_an_unusable_analysis_entry_is_recomputed_with_a_warning(tmp_path: Path) -> None:
    from taskvec.analysis import AnalysisContext

    handle = tiny_handle("llava")
    cache = StepCache(tmp_path / "cache")
    context = AnalysisContext(handle, None, (), 0, {}, QUICK, cache)
    computed: list[int] = []

    def compute() -> _Value:
        computed.append(1)
        return _Value(7)

    assert context.cached("step", compute, _Value) == _Value(7)
    (entry,) = (tmp_path / "cache" / "analysis" / "step").glob("*.json")
    for damage in (_empty_object, _not_utf8):
        damage(entry)
        with pytest.warns(CacheEntryWarning, match=f"^{entry}: .*computing it again$"):
            assert context.cached("step", compute, _Value) == _Value(7)
    assert context.cached("step", compute, _Value) == _Value(7) and len(computed) == 3


@dataclass
class _Value:
    """An analysis step's typed result."""

    value: int


def _write_many(path: Path, writer: int, times: int) -> list[str]:
    """Writes `path` `times` times with payloads of its own; the errors it met."""
    errors = []
    for index in range(times):
        try:
            write_json_atomically(path, {"writer": writer, "index": index, "rows": [[writer, index]] * 2000})
        except Exception as error:  # every failure is counted, whatever it is
            errors.append(f"{type(error).__name__}: {error}")
    return errors


def _write_many_in_a_process(path: str, writer: int, times: int, failures: Any) -> None:
    failures.put(_write_many(Path(path), writer, times))


def test_concurrent_writers_all_succeed_and_readers_see_absent_or_complete_json(tmp_path: Path) -> None:
    path = tmp_path / "cache" / "entry.json"
    reads: list[str] = []
    stop = threading.Event()

    def read() -> None:
        while not stop.is_set():
            try:
                reads.append(path.read_text(encoding="utf-8"))
            except FileNotFoundError:
                reads.append("")

    errors: list[str] = []
    readers = [threading.Thread(target=read) for _ in range(2)]
    writers = [
        threading.Thread(target=lambda w=w: errors.extend(_write_many(path, w, 100))) for w in range(4)
    ]
    context = multiprocessing.get_context("fork")
    failures = context.Queue()
    processes = [
        context.Process(target=_write_many_in_a_process, args=(str(path), 10 + w, 100, failures))
        for w in range(2)
    ]
    for thread in [*readers, *writers]:
        thread.start()
    for process in processes:
        process.start()
    for thread in writers:
        thread.join()
    for process in processes:
        errors.extend(failures.get(timeout=120))
        process.join()
    stop.set()
    for thread in readers:
        thread.join()
    assert errors == []
    assert [process.exitcode for process in processes] == [0, 0]
    for text in filter(None, reads):
        entry = json.loads(text)  # complete: never half a file
        assert entry["rows"] == [[entry["writer"], entry["index"]]] * 2000
    last = json.loads(path.read_text())
    assert last["index"] == 99
    assert [p.name for p in path.parent.iterdir()] == ["entry.json"]  # no temporary left behind


# ---- one run per directory -----------------------------------------------------------------------

_RUN = ["run", "--llm", "none", "--quick", "--no-analyses"]


def test_a_second_run_into_a_busy_directory_stops_at_once(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import taskvec.cli.run_command as command_module

    def must_not_load(*args: object, **kwargs: object) -> object:
        raise AssertionError("a model loaded into a busy run directory")

    monkeypatch.setattr(command_module, "load_model", must_not_load)
    out = tmp_path / "run"
    with run_directory_lock(out):
        assert main([*_RUN, "--out", str(out)]) == 2
    error = capsys.readouterr().err
    assert error == f"taskvec: error: {out} is in use by another taskvec run (process {os.getpid()}); " + (
        "wait for it to finish, or give another --out\n"
    )


def test_the_lock_of_a_killed_run_is_released_by_the_system(tmp_path: Path) -> None:
    out = tmp_path / "run"
    out.mkdir()
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import fcntl, os, sys\n"
            f"handle = open({str(out / LOCK_FILE)!r}, 'a+')\n"
            "fcntl.flock(handle, fcntl.LOCK_EX)\n"
            "handle.write(f'{os.getpid()}\\n'); handle.flush()\n"
            "print('locked', flush=True)\n"
            "sys.stdin.read()\n",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "locked\n"
        busy = f"in use by another taskvec run \\(process {holder.pid}\\)"
        with pytest.raises(OSError, match=busy), run_directory_lock(out):
            pass
    finally:
        holder.kill()  # as a crash would: no unlock, no cleanup
        holder.wait()
    with run_directory_lock(out):
        assert (out / LOCK_FILE).read_text() == f"{os.getpid()}\n"


def test_ctrl_c_during_a_run_says_in_one_line_how_to_resume(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    def interrupted(*args: object, **kwargs: object) -> object:
        raise KeyboardInterrupt

    monkeypatch.setattr(StepRunner, "sweeps", interrupted)
    model = save_tiny_checkpoint("llava", tmp_path / "tiny-llava")
    out = tmp_path / "run"
    argv = [*_RUN, "--model", str(model), "--tasks", str(write_task_file(tmp_path / "task"))]
    argv += ["--shots", "2", "--ensemble-examples", "0", "2", "--no-function-vectors", "--out", str(out)]
    capsys.readouterr()
    assert main(argv) == 130
    error = capsys.readouterr().err.splitlines()
    assert error[-1] == (
        f"taskvec: run stopped; its finished steps are kept in {out}: run the same command again to resume"
    )
    assert not any("Traceback" in line for line in error)
    with run_directory_lock(out):  # the interrupted run let go of its directory
        pass


# ---- the 2-D map after a resume -------------------------------------------------------------------


def test_a_resumed_map_reads_the_stored_points_so_an_upstream_difference_cannot_move_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    handle = tiny_handle("llava")
    tasks = make_tiny_tasks(tmp_path / "images")
    settings = replace(QUICK, prompts=replace(QUICK.prompts, shots=2))
    cache = StepCache(tmp_path / "cache")

    def analyse() -> EmbeddingMap:
        document = run_analyses(
            handle,
            tasks,
            layer=1,
            vectors={},
            cache=cache,
            settings=settings,
            progress=False,
            only=("embedding_map",),
        )
        assert document.errors == {}
        mapped = document.result(EMBEDDING_MAP)
        assert mapped is not None
        return mapped

    first = analyse()
    assert first.method == "tsne"
    (points_file,) = (cache.root / "analysis" / "embedding_map" / "points").glob("*.safetensors")
    (map_entry,) = (cache.root / "analysis" / "embedding_map").glob("*.json")

    # The run is killed after the points were stored, before the map was; the resumed process's
    # kernels then differ from the first one's in the last bits.
    map_entry.unlink()
    # The package exports a function of the module's name: reach the module itself.
    embedding_map_module = sys.modules["taskvec.analysis.embedding_map"]
    computed = embedding_map_module.prompt_points

    def off_by_a_little(*args: Any, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        vectors, embeddings = computed(*args, **kwargs)
        return vectors + 1e-7, embeddings + 1e-7

    monkeypatch.setattr(embedding_map_module, "prompt_points", off_by_a_little)
    assert analyse() == first

    # Not a vacuous equality: those points, mapped, move the picture.
    from taskvec.caching import read_tensor_file

    stored = read_tensor_file(points_file)
    assert stored is not None
    points = PromptPoints.from_tensors(*stored)
    moved = embedding_map(
        replace(points, vectors=points.vectors + np.float32(1e-7)), settings.projection, settings.prompts.seed
    )
    shift = np.abs(np.asarray(moved.vectors.xy) - np.asarray(first.vectors.xy)).max()
    assert shift > 0.01
