"""The one error path of every command: bad input, a full or read-only disk and a refused path are one
line and exit status 1 with nothing partial left; a bug keeps its traceback; AUTOSAM2_DEBUG=1 (or
`autosam2 --debug`) shows the traceback of every error; Ctrl-C is one line and 130."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from autosam2.cli import main as cli
from autosam2.errors import INTERRUPTED, DatasetError, describe, run_command
from launch.__main__ import main as launch
from shards.__main__ import main as shards
from tests.test_outputs import digest

ROOT_ONLY = pytest.mark.skipif(os.geteuid() != 0, reason="mounts a tmpfs (root; CI runs as root)")
FREE_BYTES = 2048  # what a full disk leaves: less than one page of a file


def test_a_user_error_is_one_line_and_status_1(capsys):
    def bad() -> int:
        raise DatasetError("data/seq1/frame3.jpg: cannot decode image (truncated)")

    assert run_command("autosam2 x", bad) == 1
    assert capsys.readouterr().err == "autosam2 x: data/seq1/frame3.jpg: cannot decode image (truncated)\n"


@pytest.mark.parametrize(
    "code, text",
    [
        (errno.ENOSPC, "out/a.tar: no space left on device"),
        (errno.EROFS, "out/a.tar: read-only file system"),
        (errno.EACCES, "out/a.tar: permission denied"),
        (errno.ENOTDIR, "out/a.tar: not a directory"),
        (errno.EEXIST, "out/a.tar: file exists"),
    ],
)
def test_an_os_error_of_the_machine_names_the_path_and_what_happened(capsys, code, text):
    def failing() -> int:
        raise OSError(code, os.strerror(code), "out/a.tar")

    assert run_command("shards build", failing) == 1
    assert capsys.readouterr().err == f"shards build: {text}\n"


@pytest.mark.parametrize(
    "bug", [ValueError("a bug"), KeyError("x"), OSError("no errno"), OSError(errno.EBADF, "Bad fd")]
)
def test_a_bug_keeps_its_traceback(bug):
    def buggy() -> int:
        raise bug

    with pytest.raises(type(bug)):
        run_command("autosam2 x", buggy)


def test_debug_shows_the_traceback_of_a_user_error(monkeypatch):
    monkeypatch.setenv("AUTOSAM2_DEBUG", "1")
    with pytest.raises(DatasetError):
        run_command("autosam2 x", lambda: (_ for _ in ()).throw(DatasetError("bad")))
    done = subprocess.run(
        [sys.executable, "-m", "autosam2.cli", "--debug", "validate", "/nonexistent/root"],
        capture_output=True,
        text=True,
        env={**os.environ, "AUTOSAM2_DEBUG": ""},
    )
    assert done.returncode == 1 and "dataset root does not exist" in done.stdout


def test_ctrl_c_is_one_line_and_130(capsys):
    def interrupted() -> int:
        raise KeyboardInterrupt

    assert run_command("shards build", interrupted) == INTERRUPTED
    assert capsys.readouterr().err.strip() == "shards build: interrupted"


def test_a_decoder_error_reads_the_same_every_run():
    from autosam2.data.codec import decode_image

    messages = set()
    for _ in range(2):
        with pytest.raises(DatasetError) as caught:
            decode_image(bytearray(b"not an image"), "seq/frame1.jpg")
        messages.add(str(caught.value))
    assert messages == {"seq/frame1.jpg: cannot decode image (cannot identify image file)"}


def test_describe_names_both_paths_of_a_rename():
    err = OSError(errno.EXDEV, "Invalid cross-device link", "a/tmp", None, "b/out")
    assert describe(err) == "a/tmp -> b/out: invalid cross-device link"


# full and read-only disks, every command --------------------------------------------------------------


def _mount(path: Path, options: str) -> None:
    path.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], check=True)


@pytest.fixture(scope="module")
def disks(tmp_path_factory) -> Iterator[dict[str, Path]]:
    """A tmpfs left with FREE_BYTES free, and a read-only one; unmounted at the end."""
    base = tmp_path_factory.mktemp("disks")
    full, readonly = base / "full", base / "ro"
    _mount(full, "size=1m")
    _mount(readonly, "ro,size=1m")
    try:
        fill = full / "filler"
        with open(fill, "wb") as f:
            f.write(b"\0" * (1024 * 1024 - FREE_BYTES))
        yield {"full": full, "readonly": readonly}
    finally:
        for disk in (full, readonly):
            subprocess.run(["umount", "-l", str(disk)], check=False)


def _commands(inputs: dict[str, Path]) -> dict[str, Callable[[Path], int]]:
    """Each command writing its output to the given path."""
    root, gt, frames, w = inputs["root"], inputs["gt"], inputs["frames"], inputs["weights"]
    build = ["build", str(root), "--split", "train", "--frames-per-sample", "2", "--max-shard-mb", "0.01"]
    return {
        "shards build": lambda out: shards([*build, "--workers", "1", "--out", str(out)]),
        "shards build --workers 2": lambda out: shards([*build, "--workers", "2", "--out", str(out)]),
        "shards build part": lambda out: shards(
            [*build, "--out", str(out), "--shard-index", "0", "--num-shards", "2"]
        ),
        "synth": lambda out: cli(["synth", "--out", str(out), "--sequences", "2", "--size", "64"]),
        "evaluate": lambda out: cli(
            ["evaluate", "--weights", str(w), "--cpu", "--data", str(root), "--output-dir", str(out)]
        ),
        "predict": lambda out: cli(
            ["predict", str(frames), "--weights", str(w), "--cpu", "--output-dir", str(out)]
        ),
        "score": lambda out: cli(["score", "--pred", str(gt), "--gt", str(gt), "--output-dir", str(out)]),
        "launch shard": lambda out: launch(
            ["shard", "--cluster", "debug", "--", *build[1:], "--out", str(out)]
        ),
    }


# the launcher's own writes (its job folder): on a full disk the job, not the launcher, meets it
CASES = [
    (command, disk)
    for command in _commands({k: Path() for k in ("root", "gt", "frames", "weights")})
    for disk in ("full", "readonly")
    if (command, disk) != ("launch shard", "full")
]
PROG = {
    "shards build --workers 2": "shards build",
    "shards build part": "shards build",
    "launch shard": "launch:",
}
EXPECTED_ERROR = {"full": "no space left on device", "readonly": "read-only file system"}


@pytest.fixture
def inputs(tiny_root_pristine, weights) -> dict[str, Path]:
    return {
        "root": tiny_root_pristine,
        "gt": tiny_root_pristine / "valid" / "masks",
        "frames": tiny_root_pristine / "valid" / "images" / "seq3",
        "weights": weights,
    }


def _one_error_line(err: str, prog: str) -> str:
    assert "Traceback" not in err, err[-3000:]
    lines = [line for line in err.splitlines() if line.startswith(prog)]
    assert len(lines) == 1, err[-3000:]
    return lines[0]


@ROOT_ONLY
@pytest.mark.parametrize("command, disk", CASES)
def test_a_full_or_read_only_disk_is_one_line_and_leaves_nothing(disks, inputs, capsys, command, disk):
    place = disks[disk]
    before = {p.name for p in place.iterdir()}
    source = digest(inputs["root"])
    out = place / "new" / "out"
    capsys.readouterr()
    assert _commands(inputs)[command](out) == 1
    prog = PROG.get(command, command if command.startswith("shards") else f"autosam2 {command}")
    line = _one_error_line(capsys.readouterr().err, prog)
    assert EXPECTED_ERROR[disk] in line and str(place / "new") in line and ".tmp-" not in line, line
    assert {p.name for p in place.iterdir()} == before  # no output, no temp folder, no parent made
    assert digest(inputs["root"]) == source


@ROOT_ONLY
def test_merge_on_a_full_disk_keeps_the_parts(tmp_path, tiny_root_pristine, capsys):
    disk = tmp_path / "disk"
    _mount(disk, "size=2m")
    try:
        out = disk / "set"
        argv = ["build", str(tiny_root_pristine), "--split", "train", "--out", str(out)]
        for index in range(2):
            assert shards([*argv, "--shard-index", str(index), "--num-shards", "2"]) == 0
        parts = digest(out)
        free = os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize
        (disk / "filler").write_bytes(b"\0" * free)
        capsys.readouterr()
        assert shards(["merge", str(out)]) == 1
        assert "no space left on device" in _one_error_line(capsys.readouterr().err, "shards merge")
        assert digest(out) == parts
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


@ROOT_ONLY
def test_readers_work_on_a_read_only_mount(tmp_path, tiny_root_pristine, tiny_shards_pristine, capsys):
    """validate, inspect and shards verify write nothing: a read-only dataset or shard set is fine."""
    import shutil

    disk = tmp_path / "disk"
    _mount(disk, "size=4m")
    try:
        shutil.copytree(tiny_root_pristine, disk / "pg")
        shutil.copytree(tiny_shards_pristine["valid"], disk / "shards")
        subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
        assert cli(["validate", str(disk / "pg")]) == 0
        assert cli(["inspect", str(disk / "pg")]) == 0
        assert cli(["inspect", "--shards", str(disk / "shards"), "--image-size", "64"]) == 0
        assert shards(["verify", str(disk / "shards")]) == 0
        assert "Traceback" not in capsys.readouterr().err
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


@ROOT_ONLY
def test_sync_of_a_run_on_a_read_only_disk_is_one_line(tmp_path, capsys):
    from autosam2.tracking.outbox import Outbox

    disk = tmp_path / "disk"
    _mount(disk, "size=4m")
    try:
        run = disk / "run"
        outbox = Outbox(run / "tracking")
        outbox.append({"op": "metrics", "metrics": {"train/loss": 1.0}, "step": 1, "t": 0})
        outbox.close()
        subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
        uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
        capsys.readouterr()
        assert cli(["sync", str(run), "--tracking-uri", uri, "--timeout", "20"]) == 1
        line = _one_error_line(capsys.readouterr().err, "autosam2 sync")
        assert "read-only file system" in line or "still waiting" in line, line
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)
