"""Stop signals: a flag for the loop, one line for the first Ctrl-C, and an immediate exit for the second."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from autosam2.engine.stop import (
    EXIT_STOPPED,
    STOP_SIGNALS,
    StopSignal,
    settle,
    signal_names,
    signals_received,
)

REPO = Path(__file__).resolve().parents[1]
WAIT = """
import sys, time
from autosam2.engine.stop import StopSignal
stop = StopSignal()
print("ready", flush=True)
while True:
    time.sleep(0.05)
    if stop.received is not None and sys.argv[1] == "finish":
        print("stopping at the step boundary", flush=True)
        sys.exit(0)
"""


def test_the_first_signal_sets_the_flag_and_says_so_once(capfd):
    previous = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}
    try:
        stop = StopSignal()
        assert not stop.should_stop()
        signal.raise_signal(signal.SIGINT)  # no KeyboardInterrupt: the loop decides when to stop
        signal.raise_signal(signal.SIGTERM)  # submitit's preemption: SIGTERM, then SIGUSR2
        signal.raise_signal(signal.SIGUSR2)
        assert stop.should_stop() and stop.received == signal.SIGINT
        err = capfd.readouterr().err
        assert (
            err == "SIGINT: stopping at the next step boundary, with a checkpoint; Ctrl-C again to stop now\n"
        )
        quiet = StopSignal((signal.SIGUSR2,), announce=False)  # ranks other than 0
        signal.raise_signal(signal.SIGUSR2)
        assert quiet.received == signal.SIGUSR2 and capfd.readouterr().err == ""
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def test_every_signal_that_came_is_recorded_once_in_order_and_named(monkeypatch):
    from autosam2.engine import stop as module

    monkeypatch.setattr(module, "_came", [])
    previous = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}
    try:
        stop = StopSignal(announce=False)
        assert signals_received() == ()
        for sig in (signal.SIGTERM, signal.SIGTERM, signal.SIGUSR2):  # `scontrol requeue`, then a warning
            signal.raise_signal(sig)
        assert stop.received == signal.SIGTERM  # the first decides the stop line
        assert signals_received() == (signal.SIGTERM, signal.SIGUSR2)
        assert signal_names(signals_received()) == "SIGTERM, SIGUSR2"
        stop.request()  # the launcher gone is no signal that came
        assert signals_received() == (signal.SIGTERM, signal.SIGUSR2)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    assert signal_names([]) == "no signal" and signal_names([999]) == "signal 999"


def start(mode: str) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-c", WAIT, mode],
        cwd=REPO,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout.readline() == "ready\n"
    return proc


def test_a_second_sigint_exits_at_once_with_the_stopped_status_and_no_traceback():
    proc = start("wait")
    proc.send_signal(signal.SIGINT)
    first = proc.stderr.readline()
    assert (
        first == "SIGINT: stopping at the next step boundary, with a checkpoint; Ctrl-C again to stop now\n"
    )
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=10) == EXIT_STOPPED == 75
    assert proc.stderr.read() == (
        "SIGINT again: stopping now, not at a step boundary; --resume auto goes on from the last "
        "complete checkpoint\n"
    )


def test_once_the_run_is_over_its_stop_signals_are_ignored_and_no_other_handler_is_touched():
    previous = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}
    try:
        StopSignal((signal.SIGUSR2, signal.SIGTERM))
        signal.signal(signal.SIGINT, signal.default_int_handler)  # someone else's
        settle()
        assert signal.getsignal(signal.SIGUSR2) == signal.getsignal(signal.SIGTERM) == signal.SIG_IGN
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def test_sigterm_twice_is_still_one_stop_request():
    """SLURM may signal a job step more than once (submitit's preemption sends SIGTERM, then SIGUSR2):
    only Ctrl-C pressed again means "now"."""
    proc = start("finish")
    proc.send_signal(signal.SIGTERM)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=10) == 0
    assert proc.stdout.read() == "stopping at the step boundary\n"
    assert proc.stderr.read() == "SIGTERM: stopping at the next step boundary, with a checkpoint\n"
