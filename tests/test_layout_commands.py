"""Every command that reads a dataset folder takes `--layout` and `--split`: shards build, evaluate, score,
predict and training on folders, on the SUN-SEG fixture (its test splits by their folder names) and the
tiny polyp_gen root; a split that is not there, one outside the dataset and a layout that does not fit
are one line each."""

from __future__ import annotations

import json
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from autosam2.cli import main as cli
from autosam2.data.sample_format import FORMAT_VERSION, SampleRecord, read_manifest
from shards.__main__ import main as shards
from shards.verify import verify
from shards.writer import build_part, merge
from tests.helpers import train_overrides
from tests.layout_fixtures.sunseg import CLASSES, SPLIT_CASES, frame_stems, write_sunseg

REPO = Path(__file__).resolve().parents[1]
HARD = "TestHardDataset/Unseen"


@pytest.fixture(scope="module")
def sunseg_root(tmp_path_factory):
    return write_sunseg(tmp_path_factory.mktemp("sunseg") / "SUN-SEG")


def records(shard_dir: Path) -> list[dict]:
    """The json records of every sample of a shard set, in file order."""
    found = []
    for tar in sorted(shard_dir.glob("*.tar")):
        with tarfile.open(tar) as f:
            found += [json.loads(f.extractfile(m).read()) for m in f.getmembers() if m.name.endswith(".json")]
    return found


def test_shards_build_of_a_sunseg_test_split_names_layout_and_split_and_keeps_order_and_labels(
    sunseg_root, tmp_path, capsys
):
    out = tmp_path / "hard"
    assert (
        shards(["build", str(sunseg_root), "--split", HARD, "--out", str(out), "--frames-per-sample", "4"])
        == 0
    )
    manifest = read_manifest(out)
    assert manifest["layout"] == "sunseg" and manifest["split"] == HARD
    assert manifest["source"]["layout"] == "sunseg" and manifest["source"]["split"] == HARD
    assert manifest["format_version"] == FORMAT_VERSION  # labels: the version that carries them
    assert [p.name for p in out.glob("*.tar")] == ["TestHardDataset-Unseen-000-00000.tar"]  # no '/'
    found = records(out)
    (case,) = SPLIT_CASES[HARD]
    assert [f for r in found for f in r["frames"]] == frame_stems(case, 6)  # the evaluator's order
    labels = [label for r in found for label in r["labels"]]
    assert labels == [{"pathology": CLASSES[0]}] * 6
    assert verify(out) == []


def test_labels_survive_the_record_round_trip_and_a_record_without_them_reads_as_before():
    record = SampleRecord(
        "c", "s", 0, 1, 0, ["a"], ["f0000.jpg"], ["m0000.png"], [4, 4], 1, [{"pathology": "x"}]
    )
    assert SampleRecord.from_json(record.to_json(), "here") == record
    bare = SampleRecord("c", "s", 0, 1, 0, ["a"], ["f0000.jpg"], ["m0000.png"], [4, 4], 1)
    assert "labels" not in json.loads(bare.to_json())  # what a version-1 reader reads
    assert SampleRecord.from_json(bare.to_json(), "here").labels is None


def test_a_job_array_shards_a_nested_split_and_merges(sunseg_root, tmp_path):
    out = tmp_path / "train"
    for i in (1, 0):
        build_part(sunseg_root, "TrainDataset", out, i, 2, frames_per_sample=4, layout="sunseg")
    manifest = merge(out)
    assert manifest["layout"] == "sunseg" and sorted(manifest["sequences"]) == SPLIT_CASES["TrainDataset"]


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (
            ["--split", "../x"],
            "no split '../x' in this sunseg folder (splits: TrainDataset, TestEasyDataset/Seen",
        ),
        (
            ["--split", "test"],
            "no split 'test' in this sunseg folder (splits: TrainDataset, TestEasyDataset/Seen",
        ),
        (
            ["--split", "train", "--layout", "polyp_gen"],
            "not a polyp_gen folder (its folders are in the sunseg layout; name that with --layout)",
        ),
    ],
)
def test_a_split_or_layout_that_does_not_fit_is_one_line_and_writes_nothing(
    sunseg_root, tmp_path, capsys, args, expected
):
    assert shards(["build", str(sunseg_root), *args, "--out", str(tmp_path / "out")]) != 0
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and expected in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("split", "name"),
    [
        ([], "TrainDataset"),  # the layout's train split by default
        (["--split", "TestHardDataset/Unseen/"], HARD),  # a shell's completion adds the slash
        (["--split", "./TestHardDataset//Unseen"], HARD),
    ],
)
def test_shards_build_names_the_split_as_the_layout_does(sunseg_root, tmp_path, split, name):
    out = tmp_path / "out"
    assert shards(["build", str(sunseg_root), *split, "--out", str(out)]) == 0
    manifest = read_manifest(out)
    assert manifest["split"] == name and manifest["source"]["split"] == name
    assert [p.name for p in out.glob("*.tar")] == [f"{name.replace('/', '-')}-000-00000.tar"]


def test_a_symlink_loop_as_input_is_one_line_not_a_traceback(tmp_path, capsys):
    loop = tmp_path / "loop"
    loop.symlink_to(loop)
    assert shards(["build", str(loop), "--out", str(tmp_path / "out")]) == 1
    assert capsys.readouterr().err.strip() == f"shards build: {loop}: dataset root does not exist"
    gt = tmp_path / "gt"
    gt.mkdir()
    assert cli(["score", "--pred", str(loop), "--gt", str(gt), "--output-dir", str(tmp_path / "s")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"autosam2 score: {loop}: not a folder") and len(err.splitlines()) == 1
    assert not (tmp_path / "out").exists() and not (tmp_path / "s").exists()


def test_polyp_gen_shards_any_split_with_its_layout_named(tiny_root, tmp_path):
    import shutil

    shutil.copytree(tiny_root / "valid", tiny_root / "test")
    out = tmp_path / "test"
    assert (
        shards(["build", str(tiny_root), "--layout", "polyp_gen", "--split", "test", "--out", str(out)]) == 0
    )
    manifest = read_manifest(out)
    assert manifest["split"] == "test" and manifest["format_version"] == 1  # no labels: readable as before
    assert "labels" not in records(out)[0]


@pytest.mark.slow  # runs the commands (MLflow, the trainer in a process)
def test_evaluate_score_and_predict_read_a_sunseg_split_in_the_official_order(
    sunseg_root, weights, tmp_path, capsys
):
    model = ["--weights", str(weights), "--cpu", "--no-overlays"]
    evaluated = tmp_path / "eval"
    evaluate = [
        "evaluate",
        *model,
        "--data",
        str(sunseg_root),
        "--split",
        HARD,
        "--output-dir",
        str(evaluated),
    ]
    assert cli([*evaluate, "--metric-mode", "sunseg"]) == 0
    metrics = json.loads((evaluated / "metrics.json").read_text())
    assert metrics["layout"] == "sunseg" and metrics["split"] == HARD
    (case,) = SPLIT_CASES[HARD]
    assert sorted(p.stem for p in (evaluated / "soft" / case).glob("*.png")) == sorted(frame_stems(case, 6))

    scored = tmp_path / "scored"
    score = ["score", "--pred", str(evaluated / "soft"), "--gt", str(sunseg_root), "--layout", "sunseg"]
    assert cli([*score, "--split", HARD, "--output-dir", str(scored)]) == 0
    # the same frames dropped as evaluate's sunseg mode (the official first and last), the same figures
    again = json.loads((scored / "metrics.json").read_text())
    assert again["summary"] == metrics["summary"] and (again["layout"], again["split"]) == ("sunseg", HARD)
    assert cli(["score", "--pred", str(evaluated / "soft"), "--gt", str(sunseg_root), "--split", "nope"]) != 0
    assert "no split 'nope' in this sunseg folder" in capsys.readouterr().err

    predicted = tmp_path / "pred"
    assert cli(["predict", str(sunseg_root), "--split", HARD, *model, "--output-dir", str(predicted)]) == 0
    rows = (predicted / "frames.csv").read_text().splitlines()
    assert [line.split(",")[1] for line in rows if line.startswith(case)] == frame_stems(case, 6)


def test_score_on_a_sunseg_gt_tree_drops_the_official_first_and_last(sunseg_root, tmp_path):
    from autosam2.eval.score import pair_frames

    gt = sunseg_root / HARD / "GT"
    pairing = pair_frames(gt, gt, drop_first_last=True)  # the masks scored against themselves
    (case,) = SPLIT_CASES[HARD]
    assert [g.stem for g, _ in pairing.sequences[0].frames] == frame_stems(case, 6)[1:-1]


def test_score_pairs_by_the_layouts_order_not_by_name(sunseg_root):
    from autosam2.eval.score import layout_truth, pair_frames

    truth = layout_truth(sunseg_root, "sunseg", "TestEasyDataset/Unseen")
    pairing = pair_frames(sunseg_root / "TestEasyDataset/Unseen/GT", sunseg_root, True, truth)
    (sequence,) = pairing.sequences
    stems = frame_stems("case3_1", 6)
    assert [gt.stem for gt, _ in sequence.frames] == stems[1:-1]  # not the first and last by name


@pytest.mark.slow  # runs the commands (MLflow, the trainer in a process)
def test_training_runs_on_a_sunseg_folder_with_its_train_split_by_default(sunseg_root, tmp_path):
    out = tmp_path / "run"
    data = {"train": sunseg_root, "valid": sunseg_root}
    settings = {
        "data.layout": "sunseg",
        "data.valid_split": HARD,
        "model.image_size": 64,
        "train.max_steps": 2,
        "train.validate_every": 2,
        "data.num_workers": 0,
        "tracking.enabled": "false",
    }
    cmd = [sys.executable, "-m", "autosam2.cli", "train", *train_overrides(data, out, **settings)]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "data: sunseg folder" in done.stdout + done.stderr
    assert (out / "valid" / "step_00000002" / "overlays" / f"{SPLIT_CASES[HARD][0]}.gif").is_file()


@pytest.mark.slow  # runs the commands (MLflow, the trainer in a process)
def test_a_training_split_that_is_not_there_is_one_line_before_any_work(sunseg_root, tmp_path):
    cmd = [sys.executable, "-m", "autosam2.cli", "train", "--train-split", "TestHardDataset/Nope"]
    cmd += train_overrides({"train": sunseg_root, "valid": sunseg_root}, tmp_path / "run")
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0 and "Traceback" not in done.stderr
    assert "no split 'TestHardDataset/Nope' in this sunseg folder (splits: TrainDataset" in done.stderr
    assert not (tmp_path / "run").exists()


def test_the_data_page_holds_the_table_the_readers_render():
    import re

    from autosam2.data.layouts import layouts_markdown

    page = (REPO / "docs" / "data.md").read_text()
    between = re.search(r"<!-- layouts -->\n(.*?)<!-- /layouts -->", page, re.S)
    assert between, "docs/data.md lost its layouts markers"
    assert between.group(1) == layouts_markdown(), (
        "docs/data.md is behind autosam2/data/layouts: paste layouts_markdown() between its markers"
    )


@pytest.mark.slow  # commands in processes of their own
def test_bench_layouts_measures_each_layout_against_polyp_gen(tmp_path):
    from autosam2.bench import build_parser, layouts

    args = build_parser().parse_args(["layouts", "--frames", "30", "--repeats", "1", "--keep", str(tmp_path)])
    figures = layouts.run(args)
    names = [layout.value for layout in layouts.WRITERS]
    assert set(figures) >= {"polyp_gen", "sunseg", "polypgen"} and set(figures) >= set(names)
    assert figures["polyp_gen"]["shard_build_vs_polyp_gen"] == 1.0
    for name in names:
        assert figures[name]["validate"]["s"] > 0 and figures[name]["inspect"]["peak_rss_mb"] > 0
        assert read_manifest(tmp_path / f"shards-{name}")["totals"]["frames"] == 30


def test_bench_layouts_keeps_its_fixtures_only_in_a_new_or_empty_folder(tmp_path, capsys):
    data = tmp_path / "data"
    mine = data / "polyp_gen" / "train" / "images" / "seq0" / "frame0.jpg"
    mine.parent.mkdir(parents=True)
    mine.write_bytes(b"the user's frame")
    assert cli(["bench", "layouts", "--frames", "2", "--keep", str(data)]) == 1
    assert capsys.readouterr().err.strip() == (
        f"autosam2 bench: {data}: --keep takes a new or empty folder (the fixtures are written there); it "
        "holds files already, nothing was written"
    )
    assert mine.read_bytes() == b"the user's frame"
    assert [p for p in data.rglob("*") if p.is_file()] == [mine]


def test_evaluate_on_a_shard_set_takes_its_split_and_refuses_another(tiny_shards_pristine, weights, capsys):
    from argparse import Namespace

    from autosam2.evaluate import resolve_folder

    args = Namespace(data=str(tiny_shards_pristine["valid"]), layout="auto", split=None)
    resolve_folder(args)
    assert (args.layout, args.split) == ("polyp_gen", "valid")
    data = ["--data", str(tiny_shards_pristine["valid"]), "--split", "train"]
    assert cli(["evaluate", "--weights", str(weights), "--cpu", *data]) != 0
    err = capsys.readouterr().err
    assert f"--split train: {tiny_shards_pristine['valid']} is a shard set of split valid" in err
    assert len(err.strip().splitlines()) == 1
