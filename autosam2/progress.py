"""Progress of long work for the people watching it: a tqdm bar on a terminal; in SLURM logs and pipes
(stderr not a TTY) plain lines, at most one every `every_s` seconds plus the last, never a carriage
return. Shown on rank 0 only (`enabled`)."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator
from typing import TextIO, TypeVar

T = TypeVar("T")


def hms(seconds: float) -> str:
    """``H:MM:SS`` of a duration (rounded down to the second)."""
    s = max(0, int(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


class Progress:
    """`update(n, note)` as items are done; a context manager that closes the bar (or says the last line).
    `total` None: counts without an ETA."""

    def __init__(
        self,
        total: int | None,
        desc: str,
        unit: str = "item",
        enabled: bool = True,
        file: TextIO | None = None,
        every_s: float = 10.0,
    ):
        self.total, self.desc, self.unit, self.enabled = total, desc, unit, enabled
        self.file = file or sys.stderr
        self.every_s = every_s
        self.done = 0
        self.start = time.monotonic()
        self._said = -float("inf")  # when the last plain line was written
        self._note = ""
        self._bar = None
        if enabled and _is_terminal(self.file):
            from tqdm import tqdm

            self._bar = tqdm(total=total, desc=desc, unit=unit, file=self.file, dynamic_ncols=True)

    def update(self, n: int = 1, note: str = "") -> None:
        self.done += n
        self._note = note
        if not self.enabled:
            return
        if self._bar is not None:
            if note:
                self._bar.set_postfix_str(note, refresh=False)
            self._bar.update(n)
            return
        now = time.monotonic()
        if now - self._said >= self.every_s or self.done == self.total:
            self._said = now
            print(self.line(now), file=self.file, flush=True)

    def line(self, now: float | None = None) -> str:
        """``desc: 3/10 sequences (note) elapsed 0:00:12 eta 0:00:28``."""
        elapsed = (time.monotonic() if now is None else now) - self.start
        count = f"{self.done}/{self.total}" if self.total is not None else str(self.done)
        text = f"{self.desc}: {count} {self.unit}s"
        if self._note:
            text += f" ({self._note})"
        text += f" elapsed {hms(elapsed)}"
        if self.total and 0 < self.done < self.total:
            text += f" eta {hms(elapsed / self.done * (self.total - self.done))}"
        return text

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _is_terminal(file: TextIO) -> bool:
    try:
        return file.isatty()
    except (AttributeError, ValueError):
        return False


def track(
    items: Iterable[T], total: int | None, desc: str, unit: str = "item", enabled: bool = True
) -> Iterator[T]:
    """`items`, with a `Progress` updated as each is taken."""
    with Progress(total, desc, unit, enabled) as bar:
        for item in items:
            yield item
            bar.update()
