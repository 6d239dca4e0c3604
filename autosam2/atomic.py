"""Atomic file and folder writes: readers see the old content or the new, never a half-written one."""

from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO


@contextmanager
def atomic_directory(out: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temp folder beside `out`; on success it replaces `out` (a folder, with `overwrite`), on
    error it is removed, with the parent folders made for it. An empty folder `out` (a mount point, say,
    which cannot be renamed) is filled in place from a temp folder inside it. An OSError names `out`
    (or the path under it), never the temp folder."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise FileExistsError(errno.EEXIST, "already exists; pass --overwrite to replace it", str(out))
    inside = out.is_dir() and not any(out.iterdir())
    made = [] if inside else make_folders(out.parent)
    tmp: Path | None = None
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out if inside else out.parent))
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod(0o777 & ~umask)  # mkdtemp makes it private; the result should be as readable as any folder
        yield tmp
        _put_in_place(tmp, out, inside)
    except BaseException as err:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        remove_empty(made)
        if isinstance(err, OSError):
            name_output(err, tmp, out)
        raise


def _put_in_place(tmp: Path, out: Path, inside: bool) -> None:
    if inside:  # moved entry by entry into the empty folder, then the temp folder goes
        moved = []
        try:
            for entry in list(tmp.iterdir()):
                entry.rename(out / entry.name)
                moved.append(out / entry.name)
            tmp.rmdir()
        except BaseException:
            for path in moved:  # the folder is left as empty as it was
                shutil.rmtree(path) if path.is_dir() else path.unlink()
            raise
    elif out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old)
    else:
        tmp.rename(out)


def name_output(err: OSError, tmp: Path | None, out: Path) -> None:
    """An OSError of the writing names the output path, not the temp folder (a full disk's error from a
    file object names no path at all)."""
    if err.filename is None:
        err.filename = str(out)
    elif tmp is not None and str(err.filename).startswith(str(tmp)):
        err.filename = str(out) + str(err.filename)[len(str(tmp)) :]
    elif str(err.filename).startswith(str(out.parent / f".{out.name}.tmp-")):
        err.filename = str(out)


def make_folders(folder: Path) -> list[Path]:
    """Make `folder` and its missing parents; return those made, deepest first."""
    missing = []
    while not folder.exists() and folder != folder.parent:
        missing.append(folder)
        folder = folder.parent
    try:
        for path in reversed(missing):
            path.mkdir(exist_ok=True)
    except BaseException:
        remove_empty(missing)
        raise
    return missing


def remove_empty(folders: list[Path]) -> None:
    """Remove folders we made, deepest first, while they are empty."""
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:
            return


@contextmanager
def atomic_file(path: str | Path) -> Iterator[BinaryIO]:
    """A binary file object on a temp name beside `path`; on success it replaces `path`, on error it is
    removed. Writers that take a file object (torch.save, PIL, tar) report a full disk as the OSError it is."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            yield f
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    with atomic_file(path) as f:
        f.write(text.encode())


def atomic_write_json(path: str | Path, payload: Any) -> None:
    atomic_write_text(path, json.dumps(payload, indent=1, sort_keys=True) + "\n")
