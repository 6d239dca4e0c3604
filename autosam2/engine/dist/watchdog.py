"""The watch on torchrun: a rank whose launcher is gone stops with a checkpoint, or exits after a grace."""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Callable
from typing import Protocol


def watch_launcher(on_gone: Callable[[int], None], poll_s: float = 1.0) -> bool:
    """Under torchrun, call `on_gone(pid)` once when torchrun, our parent, is gone (killed with -9,
    say): ranks must not train on unsupervised. Returns whether a watch was started."""
    if "TORCHELASTIC_RUN_ID" not in os.environ:
        return False  # alone, the parent is a shell that may exit on purpose (nohup); srun's stays
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(poll_s)
        on_gone(parent)

    threading.Thread(target=watch, name="launcher-watch", daemon=True).start()
    return True


class StopRequest(Protocol):
    def request(self) -> None: ...


LAUNCHER_GRACE_S = 300.0  # a rank whose torchrun is gone checkpoints at the next step, or dies after this


def stop_when_launcher_gone(stop: StopRequest, rank: int) -> bool:
    """Under torchrun, ask `stop` (the loop's StopSignal) for a checkpoint at the next step once torchrun is gone,
    and exit the process `LAUNCHER_GRACE_S` later if the loop has not ended by then."""

    def gone(pid: int) -> None:
        print(
            f"rank {rank}: its launcher (pid {pid}) is gone: stopping at the next step with a checkpoint "
            f"(or exiting in {LAUNCHER_GRACE_S:.0f} s)",
            file=sys.stderr,
            flush=True,
        )
        stop.request()
        deadline = threading.Timer(LAUNCHER_GRACE_S, os._exit, args=(1,))
        deadline.daemon = True
        deadline.start()

    return watch_launcher(gone)
