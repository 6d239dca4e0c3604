"""A run's tracking outbox: every call of its MLflow logger, kept on disk until the tracking store has it.

``OUT/tracking/outbox.jsonl`` holds one JSON record per line, appended by the training process (the
only thing a logging call does on the training thread); ``sent.json`` holds the byte offset up to which
the store has confirmed the records (the watermark) and the run they go to. A record that failed to
reach the store stays after the watermark: the logger's sender retries it, and `autosam2 sync OUT`
replays whatever a finished job left. Records are delivered in order; metrics carry the time they were
logged, so a batch sent twice (the store took it, the reply was lost) is the same rows again, which SQL
stores keep once. The next system-metrics step is read back from the records (`next_system_step`).

An artifact is spooled into ``artifacts/`` when logged (a folder file by file), so what is sent is the
file as it was then. Weights files (`REPLACED_BY_RENAME`: written to a temporary name and renamed into
place, never rewritten) are hard-linked, without a second copy on the disk; every other file is copied,
as is a weights file where no link can be made (another file system). Each link or copy is removed once
the store has it.

Records (``op``): ``opened`` (the run the logger opened itself), ``start`` (experiment, run name, run to
resume: for the sender to open), ``params``, ``metrics`` (step, time, values), ``tags``, ``artifact``
(spooled path, artifact path), ``end`` (status). Each names its ``run``, or null: the run the latest
``start`` opened.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
import uuid
from pathlib import Path
from typing import Any

from autosam2.atomic import atomic_write_json
from autosam2.engine.run_lock import guard
from autosam2.errors import DatasetError

FOLDER = "tracking"  # a run's outbox, in its output directory
OUTBOX = "outbox.jsonl"
SENT = "sent.json"
ARTIFACTS = "artifacts"
SYSTEM_PREFIX = "system/"


class Outbox:
    """The records of one folder (normally ``OUT/tracking``). `append` is for the logging process (any
    thread); `pending` and `mark_sent` for the one sender at a time."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.path = self.folder / OUTBOX
        self.state: dict[str, Any] = {"sent": 0, "run_id": None}
        sent = self.folder / SENT
        if sent.is_file():
            try:
                saved = json.loads(sent.read_text())
                if not isinstance(saved, dict) or not isinstance(saved.get("sent", 0), int):
                    raise ValueError("not the outbox's watermark")
                self.state.update(saved)
            except ValueError as err:
                raise DatasetError(
                    f"{sent}: unreadable ({err}); delete it to send the whole outbox again"
                ) from err
        self._lock = threading.Lock()
        # unbuffered: a write the disk refuses fails in `append`, with nothing left in a buffer to fail
        # again at the next append or at close
        self._file = open(self.path, "ab", buffering=0)
        # a line cut by a kill (or by a full disk) is ended before the next record
        self._cut = self._file.tell() > 0 and _last_byte(self.path) != b"\n"

    def append(self, record: dict[str, Any]) -> None:
        """One record, whole on its line; OSError (a full disk) when it could not be written. A rank whose
        run no longer holds its output directory leaves instead (`run_lock.guard`)."""
        guard("a tracking record")
        line = (json.dumps(record, separators=(",", ":"), allow_nan=True) + "\n").encode()
        with self._lock:
            if self._cut:
                self._write_all(b"\n")
                self._cut = False
            try:
                self._write_all(line)
            except OSError:
                self._cut = True  # part of the line may be there: the sender steps over it
                raise

    def _write_all(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[self._file.write(view) :]

    def close(self) -> None:
        with self._lock:
            self._file.close()

    def pending(self, limit: int = 1000) -> list[tuple[int, dict[str, Any] | None]]:
        """Up to `limit` records after the watermark, each with the offset just past it; a line that is
        not a whole record (cut by a kill, or edited by hand) comes as None, to be stepped over. A line still being written is left."""
        found: list[tuple[int, dict[str, Any] | None]] = []
        with open(self.path, "rb") as f:
            f.seek(int(self.state["sent"]))
            offset = f.tell()
            for line in f:
                if not line.endswith(b"\n"):
                    break
                offset += len(line)
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except ValueError:
                    record = None
                found.append((offset, record if _well_formed(record) else None))
                if len(found) >= limit:
                    break
        return found

    def mark_sent(self, offset: int, **state: Any) -> None:
        self.state.update(state, sent=offset)
        atomic_write_json(self.folder / SENT, self.state)

    def unsent(self) -> int:
        """Records after the watermark."""
        return len(self.pending(limit=1 << 62))

    def next_system_step(self) -> int:
        """One past the highest system-metrics step in the outbox (0 when there is none)."""
        step, quoted = -1, f'"{SYSTEM_PREFIX}'.encode()
        with open(self.path, "rb") as f:
            for line in f:
                if quoted not in line:
                    continue
                try:
                    record = json.loads(line)
                except ValueError:
                    continue
                if any(key.startswith(SYSTEM_PREFIX) for key in record.get("metrics", {})):
                    step = max(step, int(record["step"]))
        return step + 1

    def spool(self, path: Path) -> str:
        """`path` (a file or a folder) linked or copied into the outbox as it is now (`link_or_copy`);
        returns its place, relative."""
        place = Path(ARTIFACTS) / uuid.uuid4().hex / path.name
        target = self.folder / place
        target.parent.mkdir(parents=True)
        try:
            if path.is_dir():
                shutil.copytree(path, target, copy_function=link_or_copy)
            else:
                link_or_copy(path, target)
        except BaseException:
            shutil.rmtree(target.parent, ignore_errors=True)  # a full disk: no half copy stays
            raise
        return str(place)

    def unspool(self, place: str) -> None:
        shutil.rmtree((self.folder / place).parent, ignore_errors=True)


# Files the project only ever replaces by rename (weights and checkpoints: temp, then rename), so a hard
# link keeps what was logged; they are the large artifacts. Any other file (an overlay, a CSV, a caller's
# own) may be rewritten in place after it is logged: it is copied.
REPLACED_BY_RENAME = (".pt",)


def link_or_copy(source: str | Path, target: str | Path) -> None:
    """A hard link of `source` at `target` for a file replaced only by rename (REPLACED_BY_RENAME); a
    copy for any other file, or where the file system refuses the link."""
    if Path(source).suffix in REPLACED_BY_RENAME:
        try:
            os.link(source, target)
            return
        except OSError:  # another file system (EXDEV), or one without hard links
            pass
    shutil.copy2(source, target)


def _last_byte(path: Path) -> bytes:
    with open(path, "rb") as f:
        f.seek(-1, os.SEEK_END)
        return f.read(1)


# what each kind of record holds, by type (`MLflowLogger` writes them)
RECORD_FIELDS: dict[str, dict[str, type | tuple[type, ...]]] = {
    "opened": {},
    "start": {"experiment": str, "name": (str, type(None)), "resume": (str, type(None))},
    "params": {"params": dict},
    "metrics": {"step": int, "t": (int, float), "metrics": dict},
    "tags": {"tags": dict},
    "artifact": {"file": str},
    "end": {"status": str},
}


def _well_formed(record: Any) -> bool:
    if not isinstance(record, dict) or record.get("op") not in RECORD_FIELDS:
        return False
    return all(isinstance(record.get(k), t) for k, t in RECORD_FIELDS[record["op"]].items())


def recorded_run(folder: str | Path) -> str | None:
    """The run a folder's records went to, read without opening the outbox: the one ``sent.json`` names
    (the store confirmed it), else the last the logger recorded opening; None when neither is there."""
    folder = Path(folder)
    try:
        sent = json.loads((folder / SENT).read_text())
    except (OSError, ValueError):
        sent = None
    if isinstance(sent, dict) and isinstance(sent.get("run_id"), str):
        return sent["run_id"]
    opened = None
    try:
        with open(folder / OUTBOX, "rb") as f:
            for line in f:
                if b'"opened"' in line:
                    try:
                        record = json.loads(line)
                    except ValueError:
                        continue
                    if (
                        _well_formed(record)
                        and record["op"] == "opened"
                        and isinstance(record.get("run"), str)
                    ):
                        opened = record["run"]
    except OSError:
        return None
    return opened
