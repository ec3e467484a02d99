"""`track` and `phase`: the progress of long steps outside the training loop, silent where asked."""

from __future__ import annotations

import pytest

from posttrain.runtime.logging import RunLogger, phase, track


def test_track_yields_every_item_and_says_how_many_and_how_long(capsys: pytest.CaptureFixture[str]) -> None:
    assert list(track(range(5), "reference log-probs", unit="batches")) == [0, 1, 2, 3, 4]
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("reference log-probs: 5 batches in ") and lines[0].endswith(" s")


def test_track_of_an_iterator_with_a_total_and_of_nothing(capsys: pytest.CaptureFixture[str]) -> None:
    assert list(track(iter("abc"), "letters", total=3)) == ["a", "b", "c"]
    assert capsys.readouterr().err.startswith("letters: 3 in ")
    assert list(track([], "nothing")) == []  # nothing to wait for: no line
    assert capsys.readouterr().err == ""


def test_phase_says_how_long_and_nothing_when_the_step_raises(capsys: pytest.CaptureFixture[str]) -> None:
    with phase("saving"):
        pass
    assert capsys.readouterr().err.startswith("saving: ")
    with pytest.raises(RuntimeError), phase("saving"):
        raise RuntimeError("disk full")
    assert capsys.readouterr().err == ""


def test_disabled_or_inside_a_run_without_progress_is_silent(tmp_path, capsys: pytest.CaptureFixture[str]) -> None:
    assert list(track(range(3), "x", enabled=False)) == [0, 1, 2]
    with phase("y", enabled=False):
        pass
    log = RunLogger(tmp_path, total_steps=1, progress=False)
    assert list(track(range(3), "held-out generation")) == [0, 1, 2]  # the run's progress=False holds
    with phase("checkpoint"):
        pass
    log.close()
    assert capsys.readouterr().err == ""
    list(track(range(2), "after the run"))  # the run's setting ends with it
    assert capsys.readouterr().err.startswith("after the run: 2 in ")


def test_inside_a_run_with_progress_the_line_goes_to_its_display(tmp_path, capsys) -> None:
    log = RunLogger(tmp_path, total_steps=2, progress=True)
    assert list(track(range(4), "held-out generation", unit="batches")) == [0, 1, 2, 3]
    log.close()
    assert "held-out generation: 4 batches in " in capsys.readouterr().err
