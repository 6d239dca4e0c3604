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
SPLIT = "TestEasyDataset/Seen"  # the SUN-SEG split of the benchmark's and its job's inputs


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
    benchmark = ["sunseg", "--data", str(inputs["sunseg"]), "--splits", SPLIT, "--weights", str(w), "--cpu"]
    predict = [str(frames), "--weights", str(w)]
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
        "benchmark": lambda out: cli(["benchmark", *benchmark, "--no-overlays", "--output-dir", str(out)]),
        "launch predict": lambda out: launch(
            ["predict", "--cluster", "debug", "--", *predict, "--output-dir", str(out)]
        ),
        "launch benchmark": lambda out: launch(
            ["benchmark", "--cluster", "debug", "--", *benchmark, "--output-dir", str(out)]
        ),
    }


# the launcher's own writes (its job folder): on a full disk the job, not the launcher, meets it
CASES = [
    (command, disk)
    for command in _commands({k: Path() for k in ("root", "gt", "frames", "weights", "sunseg")})
    for disk in ("full", "readonly")
    if not (command.startswith("launch") and disk == "full")
]
PROG = {
    "shards build --workers 2": "shards build",
    "shards build part": "shards build",
    "launch shard": "launch:",
    "launch predict": "launch:",
    "launch benchmark": "launch:",
}
EXPECTED_ERROR = {"full": "no space left on device", "readonly": "read-only file system"}


@pytest.fixture(scope="module")
def sunseg_root(tmp_path_factory) -> Path:
    """A SUN-SEG root of one test split (one case of four frames)."""
    from tests.layout_fixtures.sunseg import write_sunseg

    return write_sunseg(tmp_path_factory.mktemp("sunseg") / "SUN-SEG", frames=4, splits={SPLIT: ["case2_1"]})


@pytest.fixture
def inputs(tiny_root_pristine, weights, sunseg_root) -> dict[str, Path]:
    return {
        "root": tiny_root_pristine,
        "sunseg": sunseg_root,
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


# bad input to benchmark, predict and their launcher jobs: one line, nothing made --------------------------

SCORERS = ("benchmark", "predict", "launch benchmark", "launch predict")


@pytest.fixture
def box(tmp_path, weights, sunseg_root) -> dict[str, Path]:
    """A SUN-SEG root of one split, and beside it what a user gets wrong: a text file, an empty file, a
    weights file cut off, a folder where a file belongs, an empty folder, a folder of the user's notes, an
    earlier benchmark's and prediction's output with the user's notes put in it."""
    import shutil

    root = shutil.copytree(sunseg_root, tmp_path / "SUN-SEG")
    (tmp_path / "notes.pt").write_text("my notes\n")
    (tmp_path / "empty.pt").write_bytes(b"")
    (tmp_path / "cut.pt").write_bytes(weights.read_bytes()[:100_000])  # a copy cut off
    (tmp_path / "folder.pt").mkdir()
    (tmp_path / "empty").mkdir()
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("mine")
    for kind, name, marker in [
        ("benchmark", "benchmark.json", '{"benchmark": "sunseg", "rows": []}'),
        ("predict", "frames.csv", "sequence,frame,presence,pixels\n"),
    ]:  # an earlier run's output, and the user's notes put beside it
        (tmp_path / f"earlier-{kind}").mkdir()
        (tmp_path / f"earlier-{kind}" / name).write_text(marker)
        (tmp_path / f"earlier-{kind}" / "notes.txt").write_text("mine")
    return {"box": tmp_path, "root": root, "weights": weights}


def _scorer_argv(command: str, box: dict[str, Path], case: dict) -> tuple[Callable[[list[str]], int], list]:
    """The call of `command` (the launcher's job with --cluster debug) with a case's inputs."""
    where = box["box"]
    model = ["--weights", case.get("weights", str(box["weights"])), *case.get("model", [])]
    out = ["--output-dir", case.get("out", str(where / "out")), "--cpu", *case.get("flags", [])]
    if command.endswith("benchmark"):
        data = case.get("data", str(box["root"]))
        argv = ["sunseg", "--data", data, "--splits", *case.get("splits", [SPLIT]), *model, *out]
    else:
        frames = box["root"] / SPLIT / "Frame" / "case2_1"
        argv = [case.get("input", str(frames)), *case.get("split", []), *model, *out]
    if command.startswith("launch"):
        return launch, [command.split()[1], "--cluster", "debug", *case.get("launcher", []), "--", *argv]
    return cli, [command, *argv]


# case -> (what it gives in place of the good input; the one line, a pattern (for benchmark, predict where
# they differ)); `{box}` is the test's folder, `{polyp_gen}` a dataset in another layout, `{kind}` the
# command (benchmark or predict), `{base}` the SAM2 checkpoint the weights were trained on
HOSTILE_INPUTS: dict[str, tuple[dict, str | tuple[str, str]]] = {
    "missing weights": ({"weights": "{box}/gone.pt"}, r"{box}/gone\.pt: (weights )?file not found$"),
    "text weights": (
        {"weights": "{box}/notes.pt"},
        r"{box}/notes\.pt: not a loadable weights file: a text file, which torch\.load cannot read",
    ),
    "empty weights": (
        {"weights": "{box}/empty.pt"},
        r"{box}/empty\.pt: not a loadable weights file: an empty file, which torch\.load cannot read",
    ),
    "cut-off weights": (
        {"weights": "{box}/cut.pt"},
        r"{box}/cut\.pt: not a loadable weights file: a cut-off or damaged zip .*, which torch\.load cannot read",
    ),
    "SAM2 checkpoint as weights": (
        {"weights": "{base}"},
        r"{base}: not an AutoSAM2 weights file \(written by `autosam2 train`\)$",
    ),
    "weights a folder": (
        {"weights": "{box}/folder.pt"},
        r"{box}/folder\.pt: a folder, not a (weights )?file$",
    ),
    "checkpoint not SAM2": (
        {"model": ["--checkpoint", "{box}/notes.pt"]},
        r"{box}/notes\.pt: not a SAM2 checkpoint: a text file, which torch\.load cannot read",
    ),
    "checkpoint a folder": (
        {"model": ["--checkpoint", "{box}/folder.pt"]},
        r"{box}/folder\.pt: (a folder, not a file$|is not a file, not the SAM2 weights .* was trained on)",
    ),
    "missing data": (
        {"data": "{box}/nowhere", "input": "{box}/nowhere"},
        (r"{box}/nowhere: does not exist, not a SUN-SEG root$", r"{box}/nowhere: no such file or folder$"),
    ),
    "empty data folder": (
        {"data": "{box}/empty", "input": "{box}/empty"},
        (r"{box}/empty: no TestEasyDataset/Seen .*found: none\)$", r"{box}/empty: holds no frames, no video"),
    ),
    "data a text file": (
        {"data": "{box}/notes.pt", "input": "{box}/notes.pt"},
        (r"{box}/notes\.pt: is a file, not a SUN-SEG root$", r"{box}/notes\.pt: not a video file"),
    ),
    "data in another layout": (
        {"data": "{polyp_gen}", "input": "{polyp_gen}", "split": ["--layout", "sunseg"]},
        (r"{polyp_gen}: no TestEasyDataset/Seen .*found: none\)$", r"{polyp_gen}: not a sunseg folder"),
    ),
    "split not there": (
        {
            "splits": ["TestHardDataset/Seen"],
            "input": "{box}/SUN-SEG",
            "split": ["--split", "TestHardDataset/Seen"],
        },
        (r"{box}/SUN-SEG: no TestHardDataset/Seen ", r"{box}/SUN-SEG: no split 'TestHardDataset/Seen'"),
    ),
    "output a file": ({"out": "{box}/notes.pt"}, r"{box}/notes\.pt: is a file, not a folder; refusing"),
    "output holds the user's files": ({"out": "{box}/mine"}, r"{box}/mine: holds notes\.txt, which is not"),
    "output holds the user's files, --overwrite": (
        {"out": "{box}/mine", "flags": ["--overwrite"]},
        r"{box}/mine: holds notes\.txt, which is not",
    ),
    "output holds our output and the user's file, --overwrite": (
        {"out": "{box}/earlier-{kind}", "flags": ["--overwrite"]},
        r"{box}/earlier-\w+: holds notes\.txt beside (a benchmark|predictions), which this command does not write",
    ),
    "output under a file": (
        {"out": "{box}/notes.pt/out"},
        r"{box}/notes\.pt/out: cannot be made, {box}/notes\.pt is a file$",
    ),
}


def _filled(value, places: dict[str, str]):
    if isinstance(value, list):
        return [_filled(v, places) for v in value]
    return value.format(**places)


@pytest.mark.parametrize("case", HOSTILE_INPUTS)
@pytest.mark.parametrize("command", SCORERS)
def test_bad_input_to_a_scorer_or_its_job_is_one_line_and_nothing_changes(
    box, tiny_root_pristine, capsys, command, case
):
    import re

    given, says = HOSTILE_INPUTS[case]
    places = {"box": str(box["box"]), "polyp_gen": str(tiny_root_pristine), "kind": command.split()[-1]}
    places["base"] = str(box["weights"].parent / "base.pt")  # the SAM2 file the weights were trained on
    call, argv = _scorer_argv(command, box, {k: _filled(v, places) for k, v in given.items()})
    before = digest(box["box"])
    capsys.readouterr()
    assert call(argv) == 1
    err = capsys.readouterr().err
    prog = "launch" if command.startswith("launch") else f"autosam2 {command}"
    line = _one_error_line(err, f"{prog}: ")
    assert err.strip() == line
    pattern = says if isinstance(says, str) else says[command.endswith("predict")]
    escaped = {k: re.escape(v) for k, v in places.items()}
    assert re.search(pattern.format(**escaped), line.removeprefix(f"{prog}: ")), line
    assert digest(box["box"]) == before  # no output, no job folder, the user's files as they were


# flag -> the value a user gets wrong; argparse's usage line and status 2
ODD_VALUES = {
    "benchmark": [("--splits", "TestEasy"), ("--encode-batch", "0"), ("--gpu", "-1")],
    "predict": [("--fps", "0"), ("--fps", "nan"), ("--encode-batch", "-2"), ("--gpu", "x")],
    "launch": [
        ("--time", "1:2:3:4"),
        ("--time", "2h"),
        ("--nodes", "0"),
        ("--tasks-per-node", "0"),
        ("--tasks-per-node", "-1"),
        ("--cpus-per-task", "-4"),
        ("--gpus-per-node", "-1"),
        ("--mem-gb", "-4"),
        ("--mem-gb", "nan"),
        ("--signal-delay-s", "-1"),
    ],
}


@pytest.mark.parametrize(
    "command, flag, value",
    [(c, f, v) for c in ("benchmark", "predict") for f, v in ODD_VALUES[c]]
    + [(f"launch {c}", f, v) for c in ("benchmark", "predict") for f, v in ODD_VALUES[c][:1]]
    + [(f"launch {c}", f, v) for c in ("benchmark", "predict") for f, v in ODD_VALUES["launch"]],
)
def test_an_odd_value_is_one_usage_line_and_nothing_changes(box, capsys, command, flag, value):
    launcher = command.startswith("launch") and flag in dict(ODD_VALUES["launch"])
    case = {"launcher": [flag, value]} if launcher else {"flags": [flag, value]}
    if flag == "--splits":
        case = {"splits": [value]}
    call, argv = _scorer_argv(command, box, case)
    before = digest(box["box"])
    capsys.readouterr()
    with pytest.raises(SystemExit) as refused:
        call(argv)
    err = capsys.readouterr().err.strip().splitlines()
    prog = "python -m launch" if launcher else f"autosam2 {command.split()[-1]}"
    assert refused.value.code == 2 and [line for line in err if "error" in line] == err[-1:]  # after usage
    assert err[-1].startswith(f"{prog}: error: argument {flag}") and value in err[-1], err[-1]
    assert digest(box["box"]) == before


@pytest.fixture(scope="module")
def full_weights(tmp_path_factory) -> Path:
    """A weights file holding every weight of a random-init model at 64 px (no SAM2 file beside it)."""
    import torch

    from autosam2.config import load_config
    from autosam2.model.sam2_builder import build_autosam2
    from autosam2.model.weights import RunWeights

    folder = tmp_path_factory.mktemp("full")
    cfg = load_config(None, ["model.image_size=64"])
    RunWeights(folder, build_autosam2(cfg.model, torch.device("cpu")), cfg.model, True, full=True).save(
        "w.pt", 0
    )
    return folder / "w.pt"


@pytest.mark.parametrize("command", SCORERS)
def test_a_checkpoint_beside_weights_that_hold_every_weight_is_still_read(box, full_weights, capsys, command):
    """The SAM2 file is not needed, but one that is given is no dead flag: a text file is refused."""
    notes = box["box"] / "notes.pt"
    call, argv = _scorer_argv(
        command, box, {"weights": str(full_weights), "model": ["--checkpoint", str(notes)]}
    )
    before = digest(box["box"])
    capsys.readouterr()
    assert call(argv) == 1
    prog = "launch" if command.startswith("launch") else f"autosam2 {command}"
    line = _one_error_line(capsys.readouterr().err, f"{prog}: ")
    assert line.startswith(f"{prog}: {notes}: not a SAM2 checkpoint: a text file, which torch.load cannot")
    assert digest(box["box"]) == before
