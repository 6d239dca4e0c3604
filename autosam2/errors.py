"""Errors users act on that several layers raise; light to import (no torch), so the CLI can catch them."""

from __future__ import annotations

import errno
import os
import shutil
import sys
from collections.abc import Callable
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


class JobFailed(RuntimeError):
    """A job or stage a command waited for failed (its own output says why); the message names it."""


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


class OutputRefused(RuntimeError):
    """An output path a command will not write or replace (not its own kind of output, or overlapping
    its input); the message names the path and what it holds."""


# OSErrors that come from the machine or the user's paths, not from our code: a full or read-only disk,
# permissions, a path that is not what the command was told. Any other OSError is a bug and keeps its
# traceback.
USER_ERRNOS = frozenset(
    {
        errno.ENOSPC,
        errno.EDQUOT,
        errno.EROFS,
        errno.EACCES,
        errno.EPERM,
        errno.ENOTDIR,
        errno.EISDIR,
        errno.EEXIST,
        errno.ENOENT,
        errno.ENAMETOOLONG,
        errno.ELOOP,
        errno.EMFILE,
        errno.EIO,
    }
)
DEBUG_VARIABLE = "AUTOSAM2_DEBUG"  # set (to anything but 0 or empty): every error shows its traceback
INTERRUPTED = 130  # the shell's status of a process ended by Ctrl-C (128 + SIGINT)


def user_error_types() -> tuple[type[BaseException], ...]:
    """The errors a user acts on: reported in one line naming the file and the problem."""
    from autosam2.config import ConfigError  # the config is the ground floor: imports nothing of ours

    return (
        ConfigError,
        DatasetError,
        CheckpointError,
        OutputDirInUse,
        OutputRefused,
        TrainingAborted,
        RankLost,
    )


def is_user_error(err: BaseException) -> bool:
    if isinstance(err, OSError):
        return err.errno in USER_ERRNOS
    return isinstance(err, user_error_types())


def describe(err: BaseException) -> str:
    """One line for a user error: an OSError as ``path: what happened`` (its message varies by origin:
    ``[Errno 28] No space left on device: 'x'``), others their own message's first line."""
    if isinstance(err, OSError) and err.strerror:
        where = err.filename if err.filename is not None else None
        what = err.strerror[0].lower() + err.strerror[1:]
        if err.filename2 is not None:
            return f"{where} -> {err.filename2}: {what}"
        return f"{where}: {what}" if where is not None else what
    text = str(err).strip()
    return text if text else type(err).__name__


def debugging() -> bool:
    return os.environ.get(DEBUG_VARIABLE, "") not in ("", "0")


def run_command(prog: str, command: Callable[[], int | None]) -> int:
    """The one error path of every command: a user error (bad input, a full or read-only disk, a refused
    output path) is one line ``prog: message`` on stderr and exit status 1; Ctrl-C is one line and 130;
    anything else is a bug and raises with its traceback. With AUTOSAM2_DEBUG=1 every error raises."""
    try:
        return command() or 0
    except KeyboardInterrupt:
        if debugging():
            raise
        print(f"\n{prog}: interrupted", file=sys.stderr)
        return INTERRUPTED
    except (OSError, *user_error_types()) as err:
        if debugging() or not is_user_error(err):
            raise
        print(f"{prog}: {describe(err)}", file=sys.stderr, flush=True)
        return 1
