"""Checkpoints that survive preemption: atomic step folders, exact resume, the loop state.

A checkpoint is ``OUT/checkpoints/step_XXXXXXXX/`` holding the engine's state (model, optimizer,
scheduler), ``state.json`` (the LoopState: step, epoch, position in the data stream, counters) and one RNG file per
rank. It is written under a ``.tmp`` name and renamed by rank 0 once every rank is done; ``latest``
names the newest one. An asynchronous save (`train.checkpoint_async`) copies the state to host memory and
rank 0 writes the same folder on a background thread; `latest` moves only once it is complete, so a kill
during the write leaves the previous checkpoint in charge. A write that fails (a full disk) fails on every
rank with one error and leaves the earlier checkpoints as they were; trained weights that are not finite
are never written (one error on every rank). Resuming takes the checkpoint ``latest`` names if it is
complete, else the newest complete one, with a warning naming what was skipped; a skipped folder (damaged,
weights that are not finite, or set aside by a run whose losses its weights made non-finite) is moved
aside as ``step_XXXXXXXX.damaged-<time>``, kept for inspection and never matched, pruned or overwritten.
Pruning never removes the last complete checkpoint nor the one resumed from, and moves a damaged folder
aside with a line instead of removing it. Stop signals are `engine.stop`'s.
"""

from __future__ import annotations

import json
import pickle
import random
import re
import shutil
import sys
import threading
import time
import zipfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch

from autosam2.atomic import atomic_write_json, atomic_write_text
from autosam2.engine.dist import DistInfo, broadcast_object, gather_objects
from autosam2.engine.run_lock import guard
from autosam2.errors import CheckpointError, write_failure
from autosam2.model.weights import NonFiniteWeights, nonfinite, trained_tensors


@dataclass
class LoopState:
    """Where training stands; saved in every checkpoint. `batch` counts the batches of `epoch` each rank
    consumed, `world_size` ranks of `batch_size` clips each (0: not recorded, an older checkpoint).
    `config`: the config in effect, as plain values (None: an older checkpoint); `changes`: the settings
    the run changed as it resumed (`engine.resume`), oldest first."""

    step: int = 0
    epoch: int = 0
    batch: int = 0
    sample: int = -1  # global samples of `epoch` consumed (-1: not recorded, an older checkpoint)
    world_size: int = 0
    batch_size: int = 0
    bad_steps: int = 0
    skipped_steps: int = 0
    best_dice: float = -1.0
    run_id: str | None = None
    stopped: bool = False
    config: dict[str, Any] | None = None
    changes: list[dict[str, Any]] = field(default_factory=list)


def rng_state() -> dict[str, Any]:
    state = {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@dataclass
class SaveReport:
    """One checkpoint's cost: `stall_s` the loop was blocked (for an asynchronous save: the snapshot to
    host memory and the small per-rank files), `write_s` from the start of the save to its commit, `bytes`
    the folder's size (both 0 until an asynchronous write has committed)."""

    step: int
    stall_s: float
    asynchronous: bool
    write_s: float = 0.0
    bytes: int = 0


class Checkpointer:
    """Writes, prunes, chooses and reads the step folders of one output directory (every rank calls
    `save`, `finish` and `load`; rank 0 alone calls `resolve`). `keep`: complete checkpoints kept, the
    newest first (`weights/best.pt` is separate and always kept). `asynchronous`: engines that can
    (`Engine.snapshot`) copy their state to host memory and a background thread of rank 0 writes and
    commits it while training goes on; the next `save` or `finish` waits for it, and a failed write fails
    there, on every rank."""

    def __init__(self, output_dir: str | Path, info: DistInfo, keep: int = 2, asynchronous: bool = False):
        self.root = Path(output_dir) / "checkpoints"
        self.info = info
        self.keep = max(1, keep)
        self.asynchronous = asynchronous
        self.protected: Path | None = None  # the folder this run resumed from: never pruned
        self.written: list[SaveReport] = []  # committed saves not yet taken (`take_reports`)
        self.last: SaveReport | None = None  # the latest save, committed or not
        self._pending: tuple[Path, Path, threading.Thread | None] | None = None  # (final, tmp, writer)
        self._pending_error: str | None = None

    # writing ---------------------------------------------------------------------------------------
    def save(self, engine, state: LoopState) -> Path:
        """Every rank calls this; returns the final folder (for an asynchronous save, where it will be). A
        write that fails on any rank (a full disk) fails the save on every rank with one CheckpointError;
        the partial folder is removed and the previous checkpoints are untouched. Trained weights that are
        not finite are refused before anything is written (NonFiniteWeights on every rank). A rank whose
        run no longer holds the output directory leaves first (`run_lock.guard`)."""
        guard("a checkpoint")
        start = time.perf_counter()
        self.finish()
        final = self.root / f"step_{state.step:08d}"
        self._refuse_nonfinite(engine, final)
        tmp = final.with_name(final.name + ".tmp")
        write = engine.snapshot() if self.asynchronous else None
        report = SaveReport(state.step, 0.0, asynchronous=write is not None)
        try:
            if self.info.is_main:
                self._agree(final, tmp, _attempt(lambda: _fresh_folder(tmp), tmp))
            else:
                self._agree(final, tmp, None)
            if write is None:
                self._agree(final, tmp, _attempt(lambda: self._write(engine, tmp, state), tmp))
                if self.info.is_main:
                    self._agree(final, tmp, _attempt(lambda: self._commit(tmp, final), self.root / "latest"))
                else:
                    self._agree(final, tmp, None)
            else:
                self._agree(final, tmp, _attempt(lambda: self._write_rng(tmp), tmp))
                writer = None
                if self.info.is_main:
                    saved = asdict(state)  # the loop's counters now, not when the thread gets to them
                    writer = threading.Thread(
                        target=self._write_behind,
                        args=(write, tmp, final, saved, report, start),
                        name=f"checkpoint-{final.name}",
                    )
                self._pending = (final, tmp, writer)
                if writer is not None:
                    writer.start()
        except BaseException:
            # a rank lost mid-save (its collective failed), or a signal: no partial folder stays behind
            if self.info.is_main:
                shutil.rmtree(tmp, ignore_errors=True)
            raise
        report.stall_s = time.perf_counter() - start
        self.last = report
        if write is None:
            self._done(report, final, start)
        return final

    def _refuse_nonfinite(self, engine, final: Path) -> None:
        """Every rank: one NonFiniteWeights on every rank when any rank's trained weights are not finite."""
        problems = [p for p in gather_objects(nonfinite(trained_tensors(engine.module))) if p]
        if problems:
            kept = self._pointed()
            where = f"checkpoints/latest stays {kept.name}" if kept else "no earlier checkpoint exists"
            raise NonFiniteWeights(
                f"{final}: not written: the trained weights are not finite: {problems[0]}; {where}"
            )

    def set_aside(self, step: int, reason: str) -> Path | None:
        """Rank 0: mark the complete checkpoint of `step`, if there is one, so that resuming skips it as a
        damaged one (its weights are the cause of `reason`); returns the folder marked."""
        folder = self.root / f"step_{step:08d}"
        if not self.info.is_main or self.check(folder) is not None:
            return None
        try:
            atomic_write_json(folder / UNSOUND_FILE, {"reason": reason})
        except OSError:
            return None  # a full disk: the caller says nothing of a mark that is not there
        return folder

    def finish(self) -> None:
        """Every rank: wait for an asynchronous write in flight; if it failed, one CheckpointError on every
        rank (the partial folder removed, the previous checkpoints as they were)."""
        if self._pending is None:
            return
        final, tmp, writer = self._pending
        self._pending = None
        if writer is not None:
            writer.join()
        error, self._pending_error = self._pending_error, None
        self._agree(final, tmp, error)

    def take_reports(self) -> list[SaveReport]:
        """The saves committed since the last call (rank 0 knows their sizes; others report 0 bytes)."""
        reports, self.written = self.written, []
        return reports

    def _write_behind(
        self, write, tmp: Path, final: Path, saved: dict, report: SaveReport, start: float
    ) -> None:
        """Rank 0's background writer: the engine's snapshot, then state.json (the mark of a complete
        folder), then the commit. Any failure is kept for `finish`, never raised on this thread."""
        try:
            error = _attempt(lambda: (write(tmp), atomic_write_json(tmp / STATE_FILE, saved)), tmp)
            if error is None:
                error = _attempt(lambda: self._commit(tmp, final), self.root / "latest")
        except BaseException as err:  # noqa: BLE001 -- a thread's exception would otherwise vanish
            error = f"{tmp}: {type(err).__name__}: {err}"
        if error is not None:
            shutil.rmtree(tmp, ignore_errors=True)
            self._pending_error = error
            return
        self._done(report, final, start)

    def _done(self, report: SaveReport, final: Path, start: float) -> None:
        report.write_s = time.perf_counter() - start
        if self.info.is_main:
            report.bytes = sum(f.stat().st_size for f in final.rglob("*") if f.is_file())
            how = (
                f"in the background; the loop was blocked {report.stall_s:.2f} s"
                if report.asynchronous
                else "the loop was blocked meanwhile"
            )
            print(
                f"checkpoint {final.name}: {report.bytes / 1e6:.1f} MB written in {report.write_s:.2f} s ({how})",
                flush=True,
            )
        self.written.append(report)

    def _write(self, engine, tmp: Path, state: LoopState) -> None:
        engine.save(tmp)
        self._write_rng(tmp)
        if self.info.is_main:
            atomic_write_json(tmp / STATE_FILE, asdict(state))

    def _write_rng(self, tmp: Path) -> None:
        # python's pickle of numpy/random state is not weights_only-loadable: keep it out of torch.load
        rng = {k: v for k, v in rng_state().items() if k in ("torch", "cuda")}
        with open(tmp / f"rng_rank{self.info.rank}.pt", "wb") as f:  # a file object: a full disk says so
            torch.save(rng, f)
        (tmp / f"rng_rank{self.info.rank}.json").write_text(json.dumps(_py_rng()))

    def _commit(self, tmp: Path, final: Path) -> None:
        """Rename into place. A folder of the same step is moved aside first (and found by `resolve`
        under its `.old` name if the process dies in between): there is always a complete checkpoint."""
        displaced = final.with_name(final.name + ".old") if final.exists() else None
        if displaced is not None:
            shutil.rmtree(displaced, ignore_errors=True)
            final.rename(displaced)
        tmp.rename(final)
        atomic_write_text(self.root / "latest", final.name + "\n")
        if displaced is not None:
            shutil.rmtree(displaced, ignore_errors=True)
        self._prune(final)

    def _prune(self, newest: Path) -> None:
        """Keep `keep` complete checkpoints up to `newest` and the one resumed from; a damaged folder is
        moved aside with a line. Folders of higher steps belong to another timeline (a run resumed from
        an older checkpoint) and are left alone."""
        limit = _step_of(newest)
        kept = 1
        for folder in self.folders():
            if folder == newest or folder == self.protected or _step_of(folder) > limit:
                continue
            problem = self.check(folder)
            if problem is not None:
                _warn(f"checkpoint {folder.name} is not complete ({problem}): {self._move_aside(folder)}")
            elif kept < self.keep:
                kept += 1
            else:
                shutil.rmtree(folder, ignore_errors=True)

    def _move_aside(self, folder: Path) -> str:
        """Rename a damaged folder to a name no step pattern matches, never reused; says where it went."""
        stamp = time.strftime("%Y%m%d-%H%M%S")
        target = folder.with_name(f"{folder.name}.{DAMAGED}-{stamp}")
        extra = 1
        while target.exists():
            extra += 1
            target = folder.with_name(f"{folder.name}.{DAMAGED}-{stamp}-{extra}")
        try:
            folder.rename(target)
        except OSError as err:
            return f"left in place (cannot move it aside: {err.strerror or err})"
        return f"moved to {target}"

    def _pointed(self) -> Path | None:
        """The step folder `latest` names, if it names one."""
        pointer = self.root / "latest"
        name = pointer.read_text(errors="replace").strip() if pointer.is_file() else ""
        return self.root / name if _FOLDER.match(name) else None

    def _agree(self, final: Path, tmp: Path, error: str | None) -> None:
        """A barrier that carries failures: every rank raises the first rank's error."""
        errors = [e for e in gather_objects(error) if e]
        if not errors:
            return
        if self.info.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        intact = next((f for f in self.folders() if f != final and self.check(f) is None), None)
        kept = f"{intact.name} is intact" if intact else "no earlier checkpoint exists"
        raise CheckpointError(f"{errors[0]} writing checkpoint {final.name} (partial folder removed); {kept}")

    # choosing --------------------------------------------------------------------------------------
    def folders(self) -> list[Path]:
        """Step folders, newest first (a `.old` one after the folder of its step); `.tmp` ones never."""
        if not self.root.is_dir():
            return []
        found = [p for p in self.root.iterdir() if _FOLDER.match(p.name) and p.is_dir()]
        return sorted(found, key=lambda p: (_step_of(p), not p.name.endswith(".old")), reverse=True)

    @staticmethod
    def check(folder: Path, deep: bool = False) -> str | None:
        """Why `folder` is not a complete checkpoint, or None. Reads the JSON files and the directory at
        the end of every torch file (a zip, so a cut file shows); `deep` also checks every byte against
        the zip's CRCs and that the stored weights are finite (resume does; pruning, at every save, does
        not). A folder set aside (`set_aside`) is not complete either."""
        if not folder.is_dir():
            return "does not exist"
        if (folder / UNSOUND_FILE).is_file():
            try:
                reason = json.loads((folder / UNSOUND_FILE).read_text())["reason"]
            except (OSError, ValueError, KeyError, TypeError):
                reason = "no reason readable"
            return f"set aside by the run that resumed or wrote it: {reason}"
        state = folder / STATE_FILE
        if not state.is_file():
            return f"{STATE_FILE} is missing (the save did not finish)"
        try:
            fields = json.loads(state.read_text())
        except (OSError, ValueError) as err:
            return f"{STATE_FILE} is unreadable ({err})"
        counters = ("step", "epoch", "batch", "world_size", "batch_size", "bad_steps", "skipped_steps")
        if not isinstance(fields, dict) or not all(isinstance(fields.get(k, 0), int) for k in counters):
            return f"{STATE_FILE} does not hold the loop's counters"
        if not (folder / "engine.pt").is_file() and not (folder / "deepspeed").is_dir():
            return "it holds no engine state (engine.pt or deepspeed/)"
        for path in sorted(folder.rglob("*.pt")):
            try:
                with zipfile.ZipFile(path) as archive:
                    bad = archive.testzip() if deep else None
            except (OSError, zipfile.BadZipFile) as err:
                return f"{path.relative_to(folder)} is truncated or corrupt ({err})"
            if bad is not None:
                return f"{path.relative_to(folder)} is corrupt (its record {bad} fails its checksum)"
        unpaired = {p.stem for p in folder.glob("rng_rank*.pt")} ^ {
            p.stem for p in folder.glob("rng_rank*.json")
        }
        if unpaired:
            stem = min(unpaired)
            return f"{stem}.pt or {stem}.json is missing (one RNG file of a pair)"
        for path in sorted(folder.glob("rng_rank*.json")):
            try:
                json.loads(path.read_text())
            except (OSError, ValueError) as err:
                return f"{path.name} is unreadable ({err})"
        return _nonfinite_weights(folder) if deep else None

    def latest(self) -> Path | None:
        """The checkpoint `--resume auto` takes: the one `latest` names when it is complete, else the
        newest complete one."""
        return self._choose()[0]

    def _choose(self) -> tuple[Path | None, list[tuple[Path | None, str]]]:
        """The newest complete checkpoint, and what was skipped: (folder or None, why)."""
        candidates = []
        pointer = self.root / "latest"
        if pointer.is_file():
            candidates.append(self._pointed())
        candidates += self.folders()
        skipped: list[tuple[Path | None, str]] = []
        seen: set[Path] = set()
        for folder in candidates:
            if folder is None:
                skipped.append((None, "checkpoints/latest (it names no step folder)"))
                continue
            if folder in seen:
                continue
            seen.add(folder)
            problem = self.check(folder, deep=True)
            if problem is None:
                return folder, skipped
            named = " (named by checkpoints/latest)" if not skipped and folder == candidates[0] else ""
            skipped.append((folder, f"{folder}{named}: {problem}"))
        return None, skipped

    def resolve(self, resume: str) -> Path | None:
        """The folder to resume from: `auto` (the newest complete checkpoint here; a warning names any
        skipped; None when there is none, said once), `none`, or a folder (which must be complete)."""
        for stale in self.root.glob("step_*.tmp") if self.root.is_dir() else ():
            # a save cut short (a kill -9 during a write): this run holds the output dir's lock, so no
            # writer is still at it
            shutil.rmtree(stale, ignore_errors=True)
        if resume == "none":
            return None
        if resume != "auto":
            folder = Path(resume)
            problem = self.check(folder, deep=True)
            if problem:
                raise CheckpointError(f"{folder}: not a checkpoint folder to resume from ({problem})")
            return folder
        chosen, found = self._choose()
        # kept for a look, under a name that no later save, prune or resume touches
        skipped = [f"{why} ({self._move_aside(f)})" if f and f.is_dir() else why for f, why in found]
        if found and self._pointed() != chosen:  # `latest` names what was skipped: it names the choice now
            if chosen is not None:
                atomic_write_text(self.root / "latest", chosen.name + "\n")
            else:
                (self.root / "latest").unlink(missing_ok=True)
        if chosen is not None and skipped:
            _warn(
                f"resuming from {chosen.name}, the newest complete checkpoint; skipped " + "; ".join(skipped)
            )
        elif chosen is None and skipped:
            _warn(
                f"no complete checkpoint in {self.root}, starting from scratch; skipped " + "; ".join(skipped)
            )
        elif chosen is None:
            print(f"no checkpoint in {self.root}: starting from scratch", flush=True)
        return chosen

    # reading ---------------------------------------------------------------------------------------
    def resume(self, engine, request: str) -> LoopState:
        """The loop state to start from, on every rank: rank 0 chooses the folder (`resolve`), every rank
        restores it into `engine`; a fresh LoopState when there is none."""
        folder = agree_on_resume(self.resolve(request) if self.info.is_main else None)
        if folder is None:
            return LoopState()
        state = self.load(engine, folder)
        if self.info.is_main:
            print(
                f"resumed from {folder} at step {state.step} (epoch {state.epoch}, batch {state.batch})",
                flush=True,
            )
        return state

    def load(self, engine, folder: Path) -> LoopState:
        """Read everything of this rank first, then restore: a file that cannot be read changes nothing."""
        state_file = folder / STATE_FILE
        try:
            saved = json.loads(state_file.read_text())
        except (OSError, ValueError) as err:
            raise CheckpointError(f"{state_file}: unreadable ({err})") from err
        known = {f.name for f in fields(LoopState)}
        state = LoopState(**{k: v for k, v in saved.items() if k in known})
        state.stopped = False
        rng = None
        rng_file = folder / f"rng_rank{self.info.rank}.pt"
        if rng_file.is_file():
            py_file = folder / f"rng_rank{self.info.rank}.json"
            try:
                tensors = torch.load(rng_file, map_location="cpu", weights_only=True)
            except Exception as err:  # torch.load raises many types for a damaged file
                raise CheckpointError(f"{rng_file}: unreadable ({_first_line(err)})") from err
            try:
                rng = {**tensors, **_py_rng_restore(json.loads(py_file.read_text()))}
            except (OSError, ValueError, KeyError) as err:
                raise CheckpointError(f"{py_file}: unreadable ({_first_line(err)})") from err
        try:
            engine.load(folder)
        except CheckpointError:
            raise
        except Exception as err:  # DeepSpeed and torch.load raise many types for a damaged file
            raise CheckpointError(f"{folder}: cannot load the engine state ({_first_line(err)})") from err
        if rng is not None:
            set_rng_state(rng)
        self.protected = folder
        return state


STATE_FILE = "state.json"
UNSOUND_FILE = "unsound.json"  # a checkpoint set aside: {"reason": why its weights are not to be resumed}
DAMAGED = "damaged"  # step_XXXXXXXX.damaged-<time>: a folder resume or pruning found damaged, kept as it was
_FOLDER = re.compile(r"^step_(\d+)(\.old)?$")


def _nonfinite_weights(folder: Path) -> str | None:
    """Why the weights stored in `folder` are not to be resumed (some value is not finite), or None."""
    engine = folder / "engine.pt"
    files = [engine] if engine.is_file() else sorted((folder / "deepspeed").glob("mp_rank_*_model_states.pt"))
    for path in files:
        try:
            payload = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except pickle.UnpicklingError:
            continue  # holds more than tensors: the engine's own load judges it
        except Exception as err:  # torch.load raises many types for a damaged file
            return f"{path.relative_to(folder)} is unreadable ({_first_line(err)})"
        stored = payload.get("model", payload.get("module")) if isinstance(payload, dict) else None
        tensors = (
            {k: v for k, v in stored.items() if isinstance(v, torch.Tensor)}
            if isinstance(stored, dict)
            else {}
        )
        problem = nonfinite(tensors)
        if problem:
            return f"{path.relative_to(folder)} holds weights that are not finite: {problem}"
    return None


def _step_of(folder: Path) -> int:
    match = _FOLDER.match(folder.name)
    return int(match.group(1)) if match else -1


def _fresh_folder(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)


def _attempt(write: Callable[[], None], where: Path) -> str | None:
    """None when `write` succeeds, else why it failed (torch.save reports a full disk as RuntimeError)."""
    try:
        write()
    except (OSError, RuntimeError) as err:
        return f"{where}: {write_failure(err, where)}"
    return None


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0]}" if text else type(err).__name__


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)


def _py_rng() -> dict[str, Any]:
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss = random.getstate()
    return {
        "numpy": [kind, keys.tolist(), pos, has_gauss, cached],
        "python": [version, list(internal), gauss],
    }


def _py_rng_restore(data: dict[str, Any]) -> dict[str, Any]:
    kind, keys, pos, has_gauss, cached = data["numpy"]
    version, internal, gauss = data["python"]
    return {
        "numpy": (kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached),
        "python": (version, tuple(internal), gauss),
    }


def agree_on_resume(folder: Path | None) -> Path | None:
    """Rank 0's choice of checkpoint, for every rank (they may see the file system at slightly different times)."""
    chosen = broadcast_object(str(folder) if folder else None)
    return Path(chosen) if chosen else None
