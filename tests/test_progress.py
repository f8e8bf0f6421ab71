"""Progress: one bar mechanism that shows itself only to a person at a terminal."""

import io
import logging

from covidxray import progress as progress_module
from covidxray.progress import Steps, progress


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_bars_only_on_a_terminal_and_not_when_quiet(monkeypatch, caplog):
    caplog.set_level(logging.INFO, logger="covidxray")  # restored after the test
    monkeypatch.setattr(progress_module.sys, "stderr", io.StringIO())
    assert progress(range(3), desc="x").disable  # a log file or a pipe: no bar
    terminal = Terminal()
    monkeypatch.setattr(progress_module.sys, "stderr", terminal)
    assert list(progress(range(3), desc="loading images")) == [0, 1, 2]
    assert "loading images:" in terminal.getvalue() and "0/3" in terminal.getvalue()
    assert progress(range(3), desc="x", enabled=False).disable
    caplog.set_level(logging.WARNING, logger="covidxray")  # --quiet
    assert progress(range(3), desc="x").disable


def test_steps_say_which_of_how_many_and_estimate_the_rest(monkeypatch, caplog):
    caplog.set_level(logging.INFO, logger="covidxray")
    clock = iter([0.0, 0.0, 120.0, 300.0])
    monkeypatch.setattr(progress_module.time, "monotonic", lambda: next(clock))
    steps = Steps(3, "fold")
    steps.start("hold out a")
    steps.finish()
    steps.start("hold out b")
    steps.finish()
    steps.start("hold out c")
    assert [r.getMessage() for r in caplog.records] == [
        "fold 1 of 3 (hold out a): 0.0 min elapsed",
        "fold 2 of 3 (hold out b): 2.0 min elapsed, about 4.0 min left",
        "fold 3 of 3 (hold out c): 5.0 min elapsed, about 2.5 min left"]
