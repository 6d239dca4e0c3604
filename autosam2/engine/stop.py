"""Stop signals: SLURM's SIGUSR2 / SIGTERM and Ctrl-C's SIGINT ask for a checkpoint at the next step boundary.

A handler only sets a flag; the loop asks `should_stop` after each optimizer step (every rank agrees
through an all-reduce), checkpoints and returns, and `autosam2 train` exits with `EXIT_STOPPED`. A
second SIGINT ends the process at once, not at a step boundary (the last complete checkpoint stays in
charge). Under torchrun, Ctrl-C reaches torchrun alone (it starts its workers in sessions of their
own): it sends each rank one SIGINT, waits up to its `--shutdown-timeout` (30 s by default), kills what
is left and exits 1; a second Ctrl-C makes it send SIGTERM at once. Light to import (torch only when a
loop asks `should_stop`), so a command can name the status without loading torch.
"""

from __future__ import annotations

import os
import signal
from typing import Any

# sysexits.h EX_TEMPFAIL, "temporary failure; the user is invited to retry": the run stopped early on a
# signal and goes on with `--resume auto`. Distinct from success (0) and from errors (1), so that
# `autosam2 train ... && next_stage` does not take a stopped run for a finished one.
EXIT_STOPPED = 75

STOP_SIGNALS = (signal.SIGUSR2, signal.SIGTERM, signal.SIGINT)

# every stop signal this process received, in the order they came (each once): what a job that stopped
# does next depends on which came (SIGUSR2 asks for a requeue; SIGTERM means SLURM acts on the job itself)
_came: list[int] = []


def signals_received() -> tuple[int, ...]:
    """The stop signals this process received, in the order they came, each once."""
    return tuple(_came)


def signal_names(signums: tuple[int, ...] | list[int]) -> str:
    """``SIGTERM, SIGUSR2``: the names of `signums` (a number no signal has stays a number)."""
    names = []
    for signum in signums:
        try:
            names.append(signal.Signals(signum).name)
        except ValueError:
            names.append(f"signal {signum}")
    return ", ".join(names) or "no signal"


class StopSignal:
    """SIGUSR2 / SIGTERM (SLURM's time-limit and preemption signals) and SIGINT set a flag; ranks agree
    on it. `announce`: this process says what a signal does (rank 0 of a run; the others stay quiet).
    `AT` and `NOW` finish its lines: where the loop stops, and what a second Ctrl-C leaves."""

    AT = "the next step boundary, with a checkpoint"
    NOW = "not at a step boundary; --resume auto goes on from the last complete checkpoint"

    def __init__(self, signals: tuple[int, ...] = STOP_SIGNALS, announce: bool = True):
        self.received: int | None = None
        self.interrupts = 0
        self.announce = announce
        for sig in signals:
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        if signum not in _came:
            _came.append(signum)
        if signum == signal.SIGINT:
            self.interrupts += 1
            if self.interrupts > 1:
                self._say(f"SIGINT again: stopping now, {self.NOW}")
                os._exit(EXIT_STOPPED)
        if self.received is None:
            self.received = signum
            again = "; Ctrl-C again to stop now" if signum == signal.SIGINT else ""
            self._say(f"{signal_names([signum])}: stopping at {self.AT}{again}")

    def _say(self, line: str) -> None:
        # os.write: a handler may run while the main thread is inside print() on the same stream
        if self.announce:
            os.write(2, (line + "\n").encode())

    def request(self, signum: int = signal.SIGTERM) -> None:
        """Stop as if `signum` had arrived (the launcher is gone, for one)."""
        self.received = signum

    def should_stop(self) -> bool:
        """True on every rank as soon as one rank got a signal (a collective: call it on all ranks)."""
        from autosam2.engine.dist import all_reduce  # here: `autosam2 train` reads EXIT_STOPPED without torch

        return all_reduce(1.0 if self.received is not None else 0.0, op="max") > 0


def settle() -> None:
    """The run is over: the signals a StopSignal handles are ignored from now on, so none changes how
    the process ends. (While Python shuts down it gives a handled signal its default action back: a
    late Ctrl-C would end the process by SIGINT instead of with its status.) Signals handled by anyone
    else are left alone."""
    for sig in STOP_SIGNALS:
        if isinstance(getattr(signal.getsignal(sig), "__self__", None), StopSignal):
            signal.signal(sig, signal.SIG_IGN)
