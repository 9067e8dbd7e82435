"""Progress on a terminal is a tqdm bar; off one (a file, a CI log) it is one line per finished stage."""

from __future__ import annotations

import pytest
from tqdm import tqdm

from taskvec import progress
from taskvec.progress import progress_counter, with_progress


def test_off_a_terminal_a_stage_prints_one_line_with_its_count(capsys: pytest.CaptureFixture[str]) -> None:
    assert list(with_progress(range(5), "vectors")) == [0, 1, 2, 3, 4]
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("vectors: 5/5 in ") and lines[0].endswith(" s")


def test_off_a_terminal_steps_inside_a_stage_print_nothing(capsys: pytest.CaptureFixture[str]) -> None:
    assert list(with_progress(iter("abc"), "batches", leave=False)) == ["a", "b", "c"]
    assert list(with_progress(range(3), "vectors", enabled=False)) == [0, 1, 2]
    assert list(with_progress(range(3), None)) == [0, 1, 2]
    assert capsys.readouterr().err == ""


def test_a_stage_that_stops_part_way_is_not_reported_as_finished(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(KeyboardInterrupt):
        for item in with_progress(range(5), "sweeps"):
            if item == 2:
                raise KeyboardInterrupt
    assert capsys.readouterr().err == ""


def test_a_counter_prints_its_count_total_and_postfix_once(capsys: pytest.CaptureFixture[str]) -> None:
    counter = progress_counter("steps on Ray", unit="steps")
    counter.total = (counter.total or 0) + 3
    for _ in range(3):
        counter.update()
    counter.set_postfix({"w0": 2, "w1": 1}, refresh=False)
    counter.close()
    counter.close()
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("steps on Ray: 3/3 steps in ") and lines[0].endswith("(w0=2, w1=1)")


def test_on_a_terminal_progress_is_a_tqdm_bar(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(progress, "on_terminal", lambda: True)
    bar = with_progress(range(3), "vectors")
    assert isinstance(bar, tqdm) and list(bar) == [0, 1, 2]
    counter = progress_counter("steps on Ray")
    assert isinstance(counter, tqdm)
    counter.close()
