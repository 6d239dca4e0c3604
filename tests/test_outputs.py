"""Output paths: every command that writes a folder takes a missing path, an empty folder or its own kind
of output (with --overwrite), and refuses, before any work and in one line, an unrelated folder, a file,
or a path that is, holds or lies inside its input, which stays byte for byte as it was."""

from __future__ import annotations

import hashlib
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from autosam2.cli import main as cli
from autosam2.data.sample_format import SHARD_SET
from autosam2.errors import OutputRefused
from autosam2.outputs import EVALUATION, SCORES, SYNTH_DATASET, claim
from launch.__main__ import main as launch
from shards.__main__ import main as shards


def digest(root: Path) -> dict[str, str]:
    """Every path under `root` (itself included) and its bytes' hash."""
    paths = [root, *sorted(root.rglob("*"))] if root.is_dir() else [root]
    return {
        str(p.relative_to(root.parent)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
        for p in paths
    }


# name -> (the input the command reads, under `box`; the call writing to `out`)
def _commands(box: Path, tiny_root: Path, weights: Path) -> dict[str, tuple[Path, Callable[[Path], int]]]:
    data = box / "polyp_gen"
    shutil.copytree(tiny_root, data)
    gt = data / "valid" / "masks"
    frames = data / "valid" / "images" / "seq3"
    build = ["build", str(data), "--split", "valid", "--overwrite"]
    model = ["--weights", str(weights), "--cpu", "--overwrite"]
    return {
        "shards build": (data, lambda out: shards([*build, "--out", str(out)])),
        "shards build part": (
            data,
            lambda out: shards([*build, "--out", str(out), "--shard-index", "0", "--num-shards", "2"]),
        ),
        "evaluate": (
            data,
            lambda out: cli(["evaluate", *model, "--data", str(data), "--output-dir", str(out)]),
        ),
        "predict": (frames, lambda out: cli(["predict", str(frames), *model, "--output-dir", str(out)])),
        "score": (
            gt,
            lambda out: cli(
                ["score", "--pred", str(gt), "--gt", str(gt), "--output-dir", str(out), "--overwrite"]
            ),
        ),
        "launch shard": (
            data,
            lambda out: launch(["shard", "--cluster", "debug", "--", *build[1:], "--out", str(out)]),
        ),
    }


HOSTILE = ("unrelated folder", "the input", "inside the input", "holding the input", "a file")
EXPECTED = {
    "unrelated folder": "holds notes.txt, which is not",
    "the input": "is the input",
    "inside the input": "lies inside the input",
    "holding the input": "holds the input",
    "a file": "is a file, not a folder",
}


@pytest.mark.parametrize("case", HOSTILE)
@pytest.mark.parametrize(
    "command", ["shards build", "shards build part", "evaluate", "predict", "score", "launch shard"]
)
def test_a_hostile_output_path_is_refused_in_one_line_and_nothing_changes(
    tmp_path, tiny_root_pristine, weights, capsys, command, case
):
    box = tmp_path / "box"
    source, run = _commands(box, tiny_root_pristine, weights)[command]
    unrelated = tmp_path / "mine"
    unrelated.mkdir()
    (unrelated / "notes.txt").write_text("a week of notes")
    (tmp_path / "afile").write_text("not a folder")
    out = {
        "unrelated folder": unrelated,
        "the input": source,
        "inside the input": source / "sub" if source.is_dir() else source,
        "holding the input": box,
        "a file": tmp_path / "afile",
    }[case]
    before = digest(tmp_path)
    capsys.readouterr()
    assert run(out) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and EXPECTED[case] in err[0] and str(out) in err[0], err
    assert digest(tmp_path) == before


@pytest.mark.parametrize("command", ["synth", "demo"])
@pytest.mark.parametrize("case", ["unrelated folder", "a file"])
def test_commands_without_input_refuse_what_is_not_theirs(tmp_path, capsys, command, case):
    out = tmp_path / "out"
    if case == "a file":
        out.write_text("not a folder")
    else:
        out.mkdir()
        (out / "notes.txt").write_text("notes")
    before = digest(tmp_path)
    flag = ["--out", str(out), "--overwrite"]
    assert cli([command, *flag]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(out) in err[0] and EXPECTED[case] in err[0], err
    assert digest(tmp_path) == before


def test_synth_replaces_its_own_dataset_and_an_empty_folder_only_when_asked(tmp_path, capsys):
    out = tmp_path / "ds"
    out.mkdir()
    synth = ["synth", "--out", str(out), "--sequences", "1", "--frames", "2", "--size", "32"]
    assert cli(synth) == 0  # an empty folder is taken as it is
    first = digest(out)
    assert cli(synth) == 1
    assert "already holds a synthetic dataset; pass --overwrite" in capsys.readouterr().err
    assert cli([*synth, "--seed", "1", "--overwrite"]) == 0
    assert digest(out) != first and sorted(p.name for p in tmp_path.iterdir()) == ["ds"]


def test_merge_removes_only_the_records_it_merged(tmp_path, tiny_root_pristine, capsys):
    out = tmp_path / "set"
    for index in range(2):
        argv = ["build", str(tiny_root_pristine), "--split", "train", "--out", str(out), "--workers", "1"]
        assert shards([*argv, "--shard-index", str(index), "--num-shards", "2"]) == 0
    (out / "parts" / "README.txt").write_text("someone's note")
    assert shards(["merge", str(out)]) == 0
    assert sorted(p.name for p in (out / "parts").iterdir()) == ["README.txt"]
    assert shards(["verify", str(out)]) == 0
    assert shards(["merge", str(out)]) == 1  # nothing left to merge
    assert "no part records to merge" in capsys.readouterr().err


def test_a_rejected_dataset_leaves_no_parent_folder(tmp_path, tiny_root, capsys):
    (tiny_root / "valid" / "val_list.txt").write_text("seq404\n")
    out = tmp_path / "new" / "shards" / "valid"
    assert shards(["build", str(tiny_root), "--split", "valid", "--out", str(out)]) == 1
    assert "sequence 'seq404' is listed in val_list.txt but has no images folder" in capsys.readouterr().err
    assert not (tmp_path / "new").exists()


@pytest.mark.parametrize(
    "kind, marker, text, entry",
    [
        (SHARD_SET, "manifest.json", '{"format": "autosam2-polyp-shards"}', "train-000-00000.tar"),
        (SYNTH_DATASET, "synth.json", '{"spec": {}}', "train"),
        (EVALUATION, "metrics.json", '{"summary": {}, "weights": "w.pt"}', "masks"),
        (SCORES, "metrics.json", '{"summary": {}, "pred": "p", "gt": "g"}', "metrics.csv"),
    ],
)
def test_a_kind_is_told_by_its_marker_and_nothing_else(tmp_path, kind, marker, text, entry):
    out = tmp_path / "out"
    out.mkdir()
    (out / entry).mkdir()
    with pytest.raises(OutputRefused, match="which is not"):
        claim(out, kind, overwrite=True)
    (out / marker).write_text("{not json")
    with pytest.raises(OutputRefused, match="which is not"):
        claim(out, kind, overwrite=True)
    (out / marker).write_text(text)
    with pytest.raises(OutputRefused, match="pass --overwrite"):
        claim(out, kind, overwrite=False)
    assert claim(out, kind, overwrite=True) == out


def test_overwrite_never_takes_what_the_command_does_not_write(tmp_path, tiny_root_pristine, capsys):
    out = tmp_path / "set"
    build = ["build", str(tiny_root_pristine), "--split", "valid", "--out", str(out)]
    assert shards(build) == 0
    (out / "notes.txt").write_text("mine")
    before = digest(out)
    assert shards([*build, "--overwrite"]) == 1
    err = capsys.readouterr().err
    assert "holds notes.txt beside a shard set, which this command does not write" in err
    assert digest(out) == before


def test_an_empty_mount_point_is_filled_in_place(tmp_path, capsys):
    import os
    import subprocess

    if os.geteuid() != 0:
        pytest.skip("mounts a tmpfs (root; CI runs as root)")
    disk = tmp_path / "disk"
    disk.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(disk)], check=True)
    try:
        assert cli(["synth", "--out", str(disk), "--sequences", "1", "--frames", "2", "--size", "32"]) == 0
        assert sorted(p.name for p in disk.iterdir()) == ["synth.json", "test", "train", "valid"]
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def test_a_run_is_never_written_into_its_own_data(train_data, capsys):
    from tests.helpers import train_overrides

    for out in (train_data["train"], train_data["valid"] / "run"):
        before = digest(train_data["train"].parent)
        assert cli(["train", *train_overrides(train_data, out)]) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "the input" in err[0], err
        assert digest(train_data["train"].parent) == before


def test_a_part_of_another_job_array_is_refused(tmp_path, tiny_root_pristine, capsys):
    out = tmp_path / "set"
    argv = ["build", str(tiny_root_pristine), "--split", "train", "--out", str(out)]
    assert shards([*argv, "--shard-index", "0", "--num-shards", "2"]) == 0
    before = digest(out)
    assert shards([*argv, "--shard-index", "0", "--num-shards", "3"]) == 1
    assert "a part of another job array" in capsys.readouterr().err
    assert digest(out) == before


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda r: r.update(shards="abc"), "its shard list is not a list"),
        (lambda r: r.update(num_parts="two"), "not a part record of a shard set"),
        (lambda r: r["shards"][0].pop("name"), "shard entry 0 does not hold"),
    ],
)
def test_merge_of_a_garbled_part_record_is_one_line(tmp_path, tiny_root_pristine, capsys, edit, message):
    import json

    out = tmp_path / "set"
    argv = ["build", str(tiny_root_pristine), "--split", "train", "--out", str(out)]
    assert shards([*argv, "--shard-index", "0", "--num-shards", "1"]) == 0
    record = out / "parts" / "part-000-of-001.json"
    data = json.loads(record.read_text())
    edit(data)
    record.write_text(json.dumps(data))
    capsys.readouterr()
    assert shards(["merge", str(out)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0] and "Traceback" not in err[0], err
    assert record.exists() and not (out / "manifest.json").exists()


def test_merge_refuses_a_shard_cut_short(tmp_path, tiny_root_pristine, capsys):
    out = tmp_path / "set"
    argv = ["build", str(tiny_root_pristine), "--split", "train", "--out", str(out)]
    assert shards([*argv, "--shard-index", "0", "--num-shards", "1"]) == 0
    shard = sorted(out.glob("*.tar"))[0]
    shard.write_bytes(shard.read_bytes()[:1000])
    assert shards(["merge", str(out)]) == 1
    assert "bytes, its part record says" in capsys.readouterr().err
    assert (out / "parts").is_dir() and not (out / "manifest.json").exists()


def test_verify_of_a_garbled_manifest_is_one_line(tmp_path, tiny_shards, capsys):
    import json

    manifest = tiny_shards["valid"] / "manifest.json"
    data = json.loads(manifest.read_text())
    data["shards"] = [{}]
    manifest.write_text(json.dumps(data))
    assert shards(["verify", str(tiny_shards["valid"])]) == 1
    said = capsys.readouterr()
    assert "Traceback" not in said.err and "shard entry 0 does not hold" in said.out + said.err, said


def test_the_demo_checks_its_configs_before_any_work(tmp_path, capsys):
    out = tmp_path / "demo"
    assert cli(["demo", "--out", str(out), "no.such.key=1"]) == 1
    assert "override 'no.such.key=1'" in capsys.readouterr().err
    assert not out.exists()


def test_bench_longvideo_keeps_only_into_a_new_folder(tmp_path, capsys):
    keep = tmp_path / "keep"
    keep.mkdir()
    (keep / "w.pt").write_text("precious")
    assert cli(["bench", "longvideo", "--lengths", "2", "--keep", str(keep)]) == 1
    assert "--keep needs a new or empty folder" in capsys.readouterr().err
    assert (keep / "w.pt").read_text() == "precious"
