"""The installed `autosam2` command and the project's two-command set-up."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
AUTOSAM2 = Path(sys.executable).parent / "autosam2"


def run(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=300)


def test_console_script_runs_the_demo_steps(tmp_path):
    root = tmp_path / "pg"
    made = run(
        str(AUTOSAM2),
        "synth",
        "--out",
        str(root),
        "--sequences",
        "2",
        "--frames",
        "6",
        "--size",
        "64",
        "--seed",
        "1",
    )
    assert made.returncode == 0, made.stderr
    checked = run(str(AUTOSAM2), "validate", str(root))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert f"{root}: ok" in checked.stdout
    shown = run(str(AUTOSAM2), "inspect", str(root), "--split", "valid")
    assert shown.returncode == 0, shown.stderr
    assert (
        "valid/seq3: 6 frames 64x64 (frame1 .. frame6), clip batch images (6, 1, 3, 64, 64)" in shown.stdout
    )


def test_bad_root_gives_one_clear_error(tmp_path):
    result = run(str(AUTOSAM2), "inspect", str(tmp_path / "missing"))
    assert result.returncode == 1
    assert result.stderr.strip() == f"autosam2 inspect: {tmp_path / 'missing'}: dataset root does not exist"
    assert "Traceback" not in result.stderr


def test_ci_runs_exactly_the_readme_test_command():
    readme = (REPO / "README.md").read_text()
    ci = (REPO / ".ci" / "run").read_text()
    assert "make test" in readme.split("\n## ", 1)[0] and "make demo" in readme.split("\n## ", 1)[0]
    assert "\nmake test\n" in ci


@pytest.mark.skipif(
    not (REPO / ".venv" / ".installed").exists(), reason="runs under `make test`, which installs .venv"
)
def test_second_make_run_installs_nothing():
    # `make -q` exits 0 only when the install stamp is newer than setup.cfg and pyproject.toml
    result = subprocess.run(["make", "-q", "venv"], cwd=REPO, env={**os.environ, "MAKEFLAGS": ""})
    assert result.returncode == 0


def test_inspect_reads_a_shard_set_through_the_stream(tiny_shards_pristine, capsys):
    from autosam2.cli import main

    assert main(["inspect", "--shards", str(tiny_shards_pristine["valid"]), "--image-size", "64"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and out[0].startswith(
        "valid/seq3: 12 frames 64x64, clip batch images (12, 1, 3, 64, 64)"
    )


@pytest.mark.parametrize(
    ("argv", "line"),
    [
        (
            ["evaluate", "--weights", "{tmp}/none.pt", "--cpu"],
            "autosam2 evaluate: {tmp}/none.pt: weights file not found",
        ),
        (
            ["evaluate", "--weights", "{tmp}/none.pt", "--cpu", "--decode-device", "cuda"],
            "autosam2 evaluate: --decode-device cuda needs a GPU to evaluate on",
        ),
        (["train", "optim.lr=-1"], "autosam2 train: invalid config: optim.lr must be > 0"),
        (
            ["train", "train.dist_timeout_s=0"],
            "autosam2 train: invalid config: train.epochs, checkpoint_every",
        ),
        (
            ["synth", "--out", "{tmp}/pg", "--frames", "0"],
            "autosam2 synth: synthetic dataset needs size >= 32, frames >= 2",
        ),
    ],
)
def test_every_command_reports_bad_input_in_one_line_through_the_one_dispatcher(tmp_path, argv, line):
    result = run(str(AUTOSAM2), *(a.format(tmp=tmp_path) for a in argv))
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith(line.format(tmp=tmp_path))
