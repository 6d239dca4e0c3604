"""Progress for people watching: a bar on a terminal, plain throttled lines in logs, nothing off rank 0."""

from __future__ import annotations

import io
import re

from autosam2.progress import Progress, hms


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_hms():
    assert (hms(0), hms(59.9), hms(61), hms(3 * 3600 + 7)) == ("0:00:00", "0:00:59", "0:01:01", "3:00:07")


def test_plain_lines_in_a_log_throttled_with_the_last_always_said(monkeypatch):
    clock = iter([0.0, 1.0, 2.0, 20.0, 21.0])  # start, then one reading per update
    monkeypatch.setattr("autosam2.progress.time.monotonic", lambda: next(clock))
    log = io.StringIO()
    with Progress(4, "evaluate", "sequence", file=log, every_s=10.0) as bar:
        for name in ("a", "b", "c", "d"):
            bar.update(note=name)
    lines = log.getvalue().splitlines()
    assert "\r" not in log.getvalue()
    assert lines == [
        "evaluate: 1/4 sequences (a) elapsed 0:00:01 eta 0:00:03",  # the first at once
        "evaluate: 3/4 sequences (c) elapsed 0:00:20 eta 0:00:06",  # b fell inside 10 s of a
        "evaluate: 4/4 sequences (d) elapsed 0:00:21",  # the last, however soon
    ]


def test_a_bar_on_a_terminal_and_silence_off_rank_0():
    term = _Terminal()
    with Progress(3, "valid step 10", "sequence", file=term) as bar:
        for name in ("x", "y", "z"):
            bar.update(note=name)
    assert "\r" in term.getvalue() and re.search(r"valid step 10: 100%.*3/3", term.getvalue())
    quiet = _Terminal()
    with Progress(3, "valid", "sequence", enabled=False, file=quiet) as bar:
        bar.update()
    assert quiet.getvalue() == "" and bar.done == 1


def test_unknown_total_counts_without_eta():
    log = io.StringIO()
    bar = Progress(None, "predict", "sequence", file=log, every_s=0.0)
    bar.update(note="clip1")
    assert re.fullmatch(r"predict: 1 sequences \(clip1\) elapsed 0:00:0\d\n", log.getvalue())
