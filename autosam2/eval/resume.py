"""An output folder filled sequence by sequence (`evaluate`, `predict`), so that a stopped run goes on
where it stopped.

From its first write the folder holds ``progress.json``: the command and what the folder is made from
(files by path, size and modification time; the options that change the outputs). Each sequence's
outputs (masks, soft maps, overlays) are written as it runs; its record, ``sequences/<name>.json``, is
written last and atomically: a sequence is finished exactly when its record is there. The command's
summary (``metrics.json``, ``frames.csv``) is written once every sequence is finished, and
``progress.json`` then says ``"finished": true``. A stop signal (SLURM's SIGUSR2 or SIGTERM, Ctrl-C)
ends the run at the end of the sequence in progress, with status ``EXIT_STOPPED``.

``--resume`` goes on with an unfinished folder of the same inputs (another set is refused in one line
naming what differs): the finished sequences are skipped, their records read back, and what an
unfinished one left is removed first. ``--overwrite`` starts again: the folder's earlier contents go when
the new run starts.
"""

from __future__ import annotations

import datetime
import json
import os
import shutil
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from autosam2.atomic import atomic_write_json, make_folders, remove_empty
from autosam2.config import ConfigError
from autosam2.data.video import LazyVideo
from autosam2.engine.stop import StopSignal
from autosam2.errors import OutputRefused
from autosam2.outputs import PROGRESS, OutputKind, claim, json_object

RECORDS = "sequences"  # sequences/<name>.json, one a finished sequence


class SequenceStop(StopSignal):
    """SLURM's SIGUSR2 / SIGTERM and Ctrl-C end the run at the end of the sequence in progress."""

    AT = "the end of the sequence in progress (the finished ones are kept; --resume goes on)"
    NOW = "not at the end of a sequence; --resume goes on from the finished ones"


def identity(path: str | Path | None) -> dict[str, Any] | None:
    """What a resumed run must find unchanged of an input: a file's real path, size and modification
    time; a folder's real path (None for no input)."""
    if path is None:
        return None
    found: dict[str, Any] = {"path": os.path.realpath(path)}
    if Path(path).is_file():
        stat = Path(path).stat()
        found.update(bytes=stat.st_size, modified_ns=stat.st_mtime_ns)
    return found


def _shown(value: Any) -> str:
    """An identity as a message shows it: ``/w.pt (1234 bytes, modified 2026-12-06 11:59:15)``."""
    if not isinstance(value, dict) or "path" not in value:
        return value if isinstance(value, str) else json.dumps(value)
    if "modified_ns" not in value:
        return str(value["path"])
    when = datetime.datetime.fromtimestamp(value["modified_ns"] / 1e9).isoformat(" ", "seconds")
    return f"{value['path']} ({value.get('bytes')} bytes, modified {when})"


def differences(then: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """``name: then X, now Y`` for each input that differs."""
    return [
        f"{name}: then {_shown(then.get(name))}, now {_shown(now.get(name))}"
        for name in sorted(set(then) | set(now))
        if then.get(name) != now.get(name)
    ]


class SequenceFolder:
    """An output folder claimed for a run of `command` over sequences. `done`: the sequences finished
    by earlier runs; `finished`: the whole folder is (a resume has nothing left to do)."""

    def __init__(
        self, out: Path, command: str, inputs: dict[str, Any], done: set[str], fresh: bool, finished: bool
    ):
        self.out, self.command, self.inputs = out, command, inputs
        self.done, self.fresh, self.finished = done, fresh, finished
        self.stop: StopSignal | None = None

    @property
    def records(self) -> Path:
        return self.out / RECORDS

    @contextmanager
    def writing(self, is_main: bool) -> Iterator[SequenceFolder]:
        """The run: stop signals end it at a sequence's end; rank 0 prepares the folder (`_start`) while
        the other ranks wait. On an error before any sequence is finished, rank 0 removes what was
        written (and the folders made for it), so a run that never got anywhere leaves nothing; a disk's
        error names the output folder, never a temp name."""
        from autosam2.engine.dist import barrier

        self.stop = SequenceStop(announce=is_main)
        made: list[Path] = []
        try:
            if is_main:
                made = make_folders(self.out)
                self._start()
                if not self.fresh:
                    print(
                        f"resuming {self.out}: {len(self.done)} sequences finished before, skipped",
                        flush=True,
                    )
            barrier()
            yield self
        except BaseException as err:
            if is_main and not self._finished_records():
                self._remove_all(made)
            if isinstance(err, OSError) and (err.filename is None or ".tmp-" in str(err.filename)):
                err.filename = str(self.out)
            raise

    def _start(self) -> None:
        """Empty the folder when starting again, or clear what an unfinished sequence left when
        resuming; then write ``progress.json``."""
        from autosam2.eval.report import remove_unfinished

        if self.fresh:
            for entry in list(self.out.iterdir()):  # claimed: every entry is this command's own
                shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
        else:
            remove_unfinished(self.out, self.done)
            for entry in self.out.glob(".*.tmp-*"):  # an atomic write a kill cut short
                entry.unlink()
            for entry in self.records.glob("*") if self.records.is_dir() else []:
                if entry.stem not in self.done or entry.name.startswith("."):
                    entry.unlink()
        self.records.mkdir(exist_ok=True)
        atomic_write_json(self.out / PROGRESS, self._progress(False))

    def _progress(self, finished: bool) -> dict[str, Any]:
        return {"command": self.command, "inputs": self.inputs, "finished": finished}

    def _finished_records(self) -> list[Path]:
        return [p for p in self.records.glob("*.json") if not p.name.startswith(".")]

    def _remove_all(self, made: list[Path]) -> None:
        if self.out.is_dir():
            for entry in list(self.out.iterdir()):
                shutil.rmtree(entry, ignore_errors=True) if entry.is_dir() else entry.unlink(missing_ok=True)
        remove_empty(made)

    def todo(self, sequences: Iterable[LazyVideo]) -> Iterator[LazyVideo]:
        """`sequences` without the finished ones, ending before the next one once a stop signal came."""
        for video in sequences:
            if self.stop is not None and self.stop.received is not None:
                return
            if video.video_id not in self.done:
                yield video

    def keep(self, name: str, record: dict[str, Any]) -> None:
        """Record a sequence as finished (after its outputs are written)."""
        atomic_write_json(self.records / f"{name}.json", record)

    def earlier(self) -> dict[str, dict[str, Any]]:
        """The records of the sequences finished by earlier runs, read back."""
        found = {}
        for name in sorted(self.done):
            path = self.records / f"{name}.json"
            try:
                found[name] = json.loads(path.read_text())
            except (OSError, ValueError) as err:
                raise OutputRefused(
                    f"{path}: cannot be read back ({err}); pass --overwrite to start again"
                ) from err
        return found

    def gather(self, mine: dict[str, Any], todo: int, is_main: bool) -> list[dict[str, Any]] | None:
        """The records of every sequence: each rank's of this run (`mine`; `todo`: how many it had to
        do), gathered, and those of earlier runs, read back; None (rank 0 having said so) when a stop
        signal ended the run early on any rank. A collective: every rank calls it."""
        from autosam2.engine.dist import gather_objects

        parts = gather_objects((mine, todo))
        if self.stop is not None and self.stop.should_stop():
            if is_main:
                finished = len(self.done) + sum(len(m) for m, _ in parts)
                self._say_stopped(finished, len(self.done) + sum(n for _, n in parts))
            return None
        return [*(m for m, _ in parts), self.earlier()]

    def _say_stopped(self, finished: int, total: int) -> None:
        import signal

        received = self.stop.received if self.stop else None
        by = signal.Signals(received).name if received else "a signal to another rank"
        print(
            f"stopped by {by}: {finished} of {total} sequences finished, kept in {self.out}; the same "
            "command with --resume goes on (a job the launcher requeues does so itself)",
            flush=True,
        )

    def finish(self, summary: Sequence[str]) -> None:
        """Every sequence is finished and the summary written (the files `summary` names, in the folder):
        ``progress.json`` says so, and names them. A folder whose summary files are gone is resumed, not
        complete: its records make the summary again."""
        atomic_write_json(self.out / PROGRESS, {**self._progress(True), "summary": list(summary)})


def claim_sequences(
    out: str | Path,
    kind: OutputKind,
    command: str,
    inputs: dict[str, Any],
    paths: Iterable[str | Path | None],
    overwrite: bool,
    resume: bool,
) -> SequenceFolder:
    """Refuse, before any work and without writing, an output path this run may not take (`claim`'s
    rules, and an unfinished folder without --resume or --overwrite, or of other `inputs` with --resume);
    return the folder and what is finished in it."""
    if resume and overwrite:
        raise ConfigError("--resume and --overwrite: choose one (go on with the folder, or start it again)")
    out = Path(out)
    progress = json_object(out / PROGRESS) if out.is_dir() else {}
    ours = progress.get("command") == command
    if not resume:
        if ours and not progress.get("finished") and not overwrite:
            claim(out, kind, True, paths)  # an input, or what is not ours, is said first
            raise OutputRefused(
                f"{out}: holds {kind.noun}, unfinished ({len(_done(out))} sequences finished); pass "
                "--resume to go on with it, or --overwrite to start again"
            )
        claim(out, kind, overwrite, paths)
        return SequenceFolder(out, command, inputs, set(), True, False)
    claim(out, kind, True, paths)
    if not out.is_dir() or not any(out.iterdir()):
        return SequenceFolder(out, command, inputs, set(), True, False)
    if not (out / PROGRESS).exists():
        raise OutputRefused(
            f"{out}: holds {kind.noun} with no {PROGRESS} to resume; pass --overwrite to replace it"
        )
    problem = _progress_problem(out / PROGRESS, progress, command) or _records_problem(out)
    if problem:
        raise OutputRefused(f"{problem}; cannot resume from it, pass --overwrite to start again")
    differ = differences(progress["inputs"], inputs)
    if differ:
        raise OutputRefused(
            f"{out}: holds {kind.noun} of other inputs ({'; '.join(differ)}); resume with the same ones, or "
            "pass --overwrite to start again"
        )
    return SequenceFolder(out, command, inputs, _done(out), False, _complete(out, progress))


def _complete(out: Path, progress: dict[str, Any]) -> bool:
    """Whether `progress` says the folder is finished and the summary files it names are all there."""
    summary = progress.get("summary")
    names = summary if isinstance(summary, list) else []
    return progress.get("finished") is True and all(
        isinstance(name, str) and (out / name).is_file() for name in names
    )


def _progress_problem(path: Path, progress: dict[str, Any], command: str) -> str | None:
    """What makes `progress` (``progress.json`` at `path` as `json_object` reads it: {} when unreadable)
    no record of a run of `command`; None when it is one."""
    if not progress:
        return f"{path}: not a JSON object"
    if progress.get("command") != command:
        return f"{path}: the progress of {progress.get('command')!r}, not of {command!r}"
    if not isinstance(progress.get("inputs"), dict):
        return f"{path}: its inputs are not a JSON object"
    return None


def _records_problem(out: Path) -> str | None:
    """The first finished sequence's record that cannot be read back as a JSON object; None if none."""
    for name in sorted(_done(out)):
        path = out / RECORDS / f"{name}.json"
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError) as err:
            return f"{path}: cannot be read back ({err})"
        if not isinstance(record, dict):
            return f"{path}: not a JSON object"
    return None


def _done(out: Path) -> set[str]:
    return {p.stem for p in (out / RECORDS).glob("*.json") if not p.name.startswith(".")}
