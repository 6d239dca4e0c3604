"""Errors users act on that several layers raise; light to import (no torch), so the CLI can catch them."""

from __future__ import annotations

import errno
import shutil
from pathlib import Path


class DatasetError(ValueError):
    """A dataset root or file that cannot be read; the message names the file and the problem."""


class SequenceSkipped(DatasetError):
    """A sequence that could not be read to its end under ``on_error=skip``: the reader has warned, and
    whoever consumed its frames forgets it."""


class CheckpointError(RuntimeError):
    """A checkpoint or weights file that cannot be written or loaded; the message names the file."""


class OutputDirInUse(RuntimeError):
    """Another live run holds the output directory's lock; the message names the holder."""


class RankLost(RuntimeError):
    """Another rank of the run stopped (its own error says why), so this rank's collective failed."""


class TrainingAborted(RuntimeError):
    """Training cannot go on (too many non-finite losses in a row); the message gives the remedy."""


def write_failure(err: BaseException, path: str | Path) -> str:
    """Why writing `path` failed, in words: torch.save and DeepSpeed report a full disk as a bare
    RuntimeError ("unexpected pos"), so the OS error behind it, or the free space, tells."""
    cause: BaseException | None = err
    while cause is not None and not isinstance(cause, OSError):
        cause = cause.__cause__ or cause.__context__
    if isinstance(cause, OSError) and cause.errno in (errno.ENOSPC, errno.EDQUOT):
        return "no space left on device"
    if isinstance(cause, OSError) and cause.strerror:
        return cause.strerror.lower()
    if _free_bytes(Path(path)) < 1 << 20:
        return "no space left on device"
    return f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}".rstrip(": ")


def _free_bytes(path: Path) -> int:
    for folder in (path, *path.parents):
        try:
            return shutil.disk_usage(folder).free
        except OSError:
            continue
    return 1 << 62
