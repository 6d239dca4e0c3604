"""The watch on torchrun: a rank whose launcher is gone stops with a checkpoint, or exits after a grace."""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Callable
from typing import Protocol

from autosam2.config import TrainConfig


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


PEER_TIMEOUT_S = TrainConfig.peer_timeout_s  # a rank silent this long is taken for unreachable
# a rank's beat counter ("beat") and its farewell ("bye"), per round of torchrun's restarts (its store
# lives on across them)
_KEY = "autosam2/peers/" + os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") + "/{}/rank{}"


class PeerWatch:
    """Each rank counts a beat in the rendezvous store (its own connection, with a short timeout) every
    `bound_s` / 10 s; rank 0 watches every rank's beats, the others rank 0's. A watched rank whose
    count stays the same for `bound_s` (its process stopped, or its host unreachable), or a store that
    gives no answer that long, ends this process: one line naming the rank, its host and the bound, exit
    status 1. This bounds a rank's wait on unreachable peers whatever the collective timeout. A rank
    that leaves the group says so (`stop`) and is watched no more; a store that refuses the connection
    (its process ended) stops the watch: the collectives report a peer that went.

    The thread that talks to the store is not a daemon: Python ends a daemon thread that is inside a
    C++ call when the interpreter shuts down, and torch's bindings then abort the whole process
    ("terminate called without an active exception"). Every store call has a timeout (2 beats), so the
    interpreter waits at most that long for it; the thread also ends once the main thread has."""

    def __init__(self, rank: int, world_size: int, bound_s: float, address: tuple[str, int]):
        self.rank, self.bound_s, self.address = rank, float(bound_s), address
        self.watched = [r for r in range(1, world_size)] if rank == 0 else [0]
        self.beat_s = max(0.2, min(5.0, self.bound_s / 10))
        self._stop = threading.Event()
        self._store = None
        now = time.monotonic()
        self._contact = now  # the store's last answer
        self._seen = {r: (-1, now) for r in self.watched}  # rank: (its count, when it last changed)
        self._thread = threading.Thread(target=self._run, name="peer-watch", daemon=False)

    def start(self) -> PeerWatch:
        self._thread.start()
        return self

    def stop(self) -> None:
        """This rank leaves the group: the watch says so (`_run`, its last call) and ends; a store that
        answers nothing holds this rank back two beats at most."""
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(self.beat_s * 2 + 1)

    def _connect(self):
        import datetime

        import torch.distributed as dist

        return dist.TCPStore(
            self.address[0],
            self.address[1],
            is_master=False,
            timeout=datetime.timedelta(seconds=max(1.0, self.beat_s * 2)),
            wait_for_workers=False,
        )

    def _run(self) -> None:
        """Beat and read the watched ranks' beats until `stop` (or the main thread's end), then say bye;
        a store call may block (a stopped store answers nothing), so `_judge`, on its own thread,
        decides from what this one last saw."""
        threading.Thread(target=self._judge, name="peer-judge", daemon=True).start()
        main = threading.main_thread()
        while not self._stop.wait(self.beat_s) and main.is_alive():
            self._beat()
        self._stop.set()
        if self._store is not None:
            try:
                self._store.set(_KEY.format("bye", self.rank), "1")
            except Exception:  # noqa: BLE001 -- the store went first: nobody is left to tell
                pass

    def _beat(self) -> None:
        from autosam2.engine.dist.peers import timed_out

        try:
            self._store = self._store or self._connect()
            self._store.add(_KEY.format("beat", self.rank), 1)
            for r in [r for r in self.watched if self._store.check([_KEY.format("bye", r)])]:
                self.watched.remove(r)
            for r in list(self.watched):
                count = self._store.add(_KEY.format("beat", r), 0)
                if count != self._seen[r][0]:
                    self._seen[r] = (count, time.monotonic())
            self._contact = time.monotonic()
        except Exception as err:  # noqa: BLE001 -- no answer (a timeout) counts; a refusal ends the watch
            if not timed_out(err) and self._store is not None:
                self._stop.set()  # the store's process ended: the collectives report the rank that went

    def _judge(self) -> None:
        while not self._stop.wait(self.beat_s):
            now = time.monotonic()
            if now - self._contact > self.bound_s:
                self._lost(
                    f"the rendezvous store at {self.address[0]}:{self.address[1]} (rank 0's host"
                    f"{_host_of(0)}) gave no answer for {self.bound_s:.0f} s"
                )
            for r in list(self.watched):
                if now - self._seen[r][1] > self.bound_s:
                    self._lost(f"rank {r}{_host_of(r)} gave no sign of life for {self.bound_s:.0f} s")

    def _lost(self, what: str) -> None:
        if self._stop.is_set():
            return
        print(
            f"rank {self.rank}: {what} (train.peer_timeout_s={self.bound_s:.0f}): its process is stopped or "
            "its host is unreachable, so this rank exits",
            file=sys.stderr,
            flush=True,
        )
        os._exit(1)


def _host_of(rank: int) -> str:
    from autosam2.engine.dist.peers import _RANK_HOSTS

    if rank < len(_RANK_HOSTS):
        name, address = _RANK_HOSTS[rank]
        return f" on {name} ({address})"
    return ""
