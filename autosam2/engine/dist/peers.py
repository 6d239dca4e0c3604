"""What a rank knows of the others: their hosts and addresses, the errors they left in the group's store
before going, and whether a failed collective means a peer was lost."""

from __future__ import annotations

import os
import socket
import time
from typing import TYPE_CHECKING

import torch.distributed as dist

from autosam2.engine.dist.collectives import gather_objects

if TYPE_CHECKING:
    from autosam2.engine.dist.group import DistInfo

_ERROR_KEY = "autosam2/error/rank{}"


def tell_peers(info: DistInfo, err: BaseException) -> None:
    """This rank's error, first line, left in the group's store before the rank goes, so the ranks that
    only see it vanish can say why (a job's first failing task is often one of those)."""
    text = str(err).strip()
    line = (text.splitlines()[0] if text else type(err).__name__)[:500]
    try:
        dist.distributed_c10d._get_default_store().set(_ERROR_KEY.format(info.rank), line)
    except Exception:  # noqa: BLE001 -- the store went with its host: the others say what they can
        pass


def peer_errors(info: DistInfo, wait_s: float = 2.0) -> str:
    """What the ranks that stopped left in the store (`tell_peers`), e.g. ``rank 1: <its error>``."""
    try:
        store = dist.distributed_c10d._get_default_store()
    except Exception:  # noqa: BLE001
        return ""
    keys = {r: _ERROR_KEY.format(r) for r in range(info.world_size) if r != info.rank}
    deadline = time.monotonic() + wait_s
    while True:
        try:
            found = {r: store.get(k).decode(errors="replace") for r, k in keys.items() if store.check([k])}
        except Exception:  # noqa: BLE001 -- the store's host is the rank that went
            return ""
        if found or time.monotonic() > deadline:
            return "; ".join(f"rank {r}: {line}" for r, line in sorted(found.items()))
        time.sleep(0.1)


def peer_lost(err: RuntimeError) -> bool:
    """A collective that failed because another rank went away (gloo closes its connections) or gave
    no answer within the process group's timeout."""
    signs = ("Connection closed by peer", "Connection reset by peer", "Broken pipe")
    return isinstance(err, dist.DistError) or timed_out(err) or any(sign in str(err) for sign in signs)


def timed_out(err: BaseException) -> bool:
    text = str(err).lower()
    return "timed out" in text or "timeout" in text


def host_address() -> str:
    """The address this host reaches the rendezvous host by (the interface the process group's traffic
    leaves from): 127.0.0.1 on one host, the host's own network address across hosts."""
    target = os.environ.get("MASTER_ADDR", "127.0.0.1")
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:  # UDP: routes, sends nothing
            probe.connect((target, int(os.environ.get("MASTER_PORT", "29500"))))
            return probe.getsockname()[0]
    except OSError:
        return "unknown"


_RANK_HOSTS: list[tuple[str, str]] = []  # what rank_hosts gathered: a lost rank's error names its host


def rank_hosts() -> list[tuple[str, str]]:
    """(hostname, address) of every rank, in rank order, on every rank."""
    _RANK_HOSTS[:] = gather_objects((socket.gethostname(), host_address()))
    return list(_RANK_HOSTS)


def announce_ranks(info: DistInfo) -> list[tuple[str, str]]:
    """`rank_hosts`, and rank 0 prints them on one line: ``ranks: 0 node1 10.0.0.1, 1 node2 ...``."""
    hosts = rank_hosts()
    if info.is_main:
        print("ranks: " + ", ".join(f"{r} {name} {addr}" for r, (name, addr) in enumerate(hosts)), flush=True)
    return hosts


def other_ranks(rank: int) -> str:
    hosts = [f"{r} on {name} ({address})" for r, (name, address) in enumerate(_RANK_HOSTS) if r != rank]
    return f"; the other ranks: {', '.join(hosts)}" if hosts else ""
