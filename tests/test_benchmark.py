"""`autosam2 benchmark sunseg` and `autosam2 score --layout sunseg`: every SUN-SEG test split by the
toolbox's protocol, one table beside the published methods' figures."""

from __future__ import annotations

import csv
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from autosam2.eval.benchmark import OURS, SplitResult, headline, print_benchmark, table
from autosam2.eval.published import load
from autosam2.metrics import TOOLBOX_METRICS
from autosam2.tracking.choice import RunRecord, Store, read_run, record_store

REPO = Path(__file__).resolve().parents[1]
TESTS = ("TestEasyDataset/Seen", "TestEasyDataset/Unseen", "TestHardDataset/Seen", "TestHardDataset/Unseen")


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "autosam2.cli", *args], cwd=REPO, capture_output=True, text=True, timeout=900
    )


# the published figures ------------------------------------------------------------------------------------


def test_published_figures_carry_their_provenance_and_the_toolbox_names():
    published = load("sunseg")
    assert published.repository == "https://github.com/GewelsJI/VPS"
    assert re.fullmatch(r"[0-9a-f]{40}", published.commit)
    assert {s["paths"] for s in published.sources} == {
        "eval/eval-result/<method folder>/<split>_eval.txt",
        "docs/RELEASE_NOTES.md",
    }
    for row in published.rows:
        assert row.path.startswith("eval/eval-result/") or row.path == "docs/RELEASE_NOTES.md", row
        assert set(row.figures) <= set(TOOLBOX_METRICS), row
        assert all(0 <= v <= 1 for v in row.figures.values()), row
    # 14 methods x 2 splits of the March 2022 release (DCFNet ... PNSPlus), PNS+ on the 4 current splits
    assert len([r for r in published.rows if r.path != "docs/RELEASE_NOTES.md"]) == 28
    pns = {
        (r.split, r.path.split("/")[-1]): r.figures for r in published.rows if r.method == "2022-MIR-PNSPlus"
    }
    assert pns["TestEasyDataset", "TestEasyDataset_eval.txt"]["Smeasure"] == 0.837
    assert pns["TestHardDataset/Unseen", "RELEASE_NOTES.md"] == {
        "Smeasure": 0.798,
        "meanEm": 0.793,
        "wFmeasure": 0.654,
        "maxDice": 0.737,
        "meanFm": 0.709,
        "meanSen": 0.624,
    }
    # 2020-MICCAI-23DCNN's files report no maxFm: absent, never made up
    dcnn = [r for r in published.rows if r.method == "2020-MICCAI-23DCNN"]
    assert len(dcnn) == 2 and all("maxFm" not in r.figures for r in dcnn)


def test_the_table_puts_each_split_s_published_rows_under_ours_and_other_releases_apart():
    published = load("sunseg")
    figures = {name: 0.5 for name in TOOLBOX_METRICS}
    results = [SplitResult(s, {}, figures) for s in ("TestHardDataset/Unseen", "TestEasyDataset/Seen")]
    rows = table("mine", results, published, TESTS)
    assert [(r.split, r.method) for r in rows[:2]] == [
        ("TestHardDataset/Unseen", "mine"),
        ("TestHardDataset/Unseen", "2022-MIR-PNSPlus"),
    ]
    assert rows[0].source == OURS and rows[1].source.endswith("docs/RELEASE_NOTES.md")
    splits = list(dict.fromkeys(r.split for r in rows))
    assert splits == ["TestHardDataset/Unseen", "TestEasyDataset/Seen", "TestEasyDataset", "TestHardDataset"]
    assert not any(r.method == "mine" for r in rows if r.split in ("TestEasyDataset", "TestHardDataset"))
    assert headline(published) == [
        "Smeasure",
        "wFmeasure",
        "meanEm",
        "maxEm",
        "meanFm",
        "maxFm",
        "meanSen",
        "maxDice",
        "maxIoU",
    ]


def test_the_printed_table_shows_a_dash_where_a_figure_is_not_published(capsys):
    published = load("sunseg")
    rows = table(
        "mine",
        [SplitResult("TestEasyDataset/Seen", {}, dict.fromkeys(TOOLBOX_METRICS, 0.25))],
        published,
        TESTS,
    )
    print_benchmark(rows, "sunseg")
    lines = capsys.readouterr().out.splitlines()
    mine = next(line for line in lines if " mine " in line)
    assert mine.split()[2:] == ["0.250"] * 9
    pns = next(line for line in lines if line.startswith("TestEasyDataset/Seen") and "PNSPlus" in line)
    assert pns.split()[2:] == ["0.917", "0.848", "0.924", "-", "-", "-", "-", "0.888", "-"]
    assert (
        sum(
            line.startswith(f"published: https://github.com/GewelsJI/VPS/blob/{published.commit[:7]}/")
            for line in lines
        )
        == 2
    )


def test_the_training_run_is_read_from_the_run_folder_of_the_weights(tmp_path):
    run_dir = tmp_path / "run"
    (run_dir / "tracking").mkdir(parents=True)
    assert read_run(run_dir) is None
    outbox = run_dir / "tracking" / "outbox.jsonl"
    outbox.write_text('{"op":"start","experiment":"e","name":null,"resume":null,"run":null}\n{"op":"opened"')
    assert read_run(run_dir) is None  # a cut line is no record
    outbox.write_text('{"op":"opened","run":"abc"}\n{"op":"end","status":"FINISHED","run":null}\n')
    assert read_run(run_dir) == RunRecord(run_dir.resolve(), "abc", None, None)
    (run_dir / "tracking" / "sent.json").write_text('{"sent": 10, "run_id": "def"}')
    assert read_run(run_dir).run_id == "def"


# the commands ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sunseg(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """SUN-SEG's four test splits, two cases of four 64 px frames each (the lead fixture's names, whose
    natural order is not the evaluator's)."""
    from tests.layout_fixtures.sunseg import write_sunseg

    cases = {split: [f"case{i}_1", f"case{i}_2"] for i, split in enumerate(TESTS, start=2)}
    return write_sunseg(tmp_path_factory.mktemp("sunseg") / "SUN-SEG", frames=4, splits=cases)


def trained_weights(run_dir: Path) -> Path:
    """A random-init 64 px model's weights, in a run folder of its own (base.pt beside it)."""
    import torch

    from autosam2.config import load_config
    from autosam2.model.sam2_builder import build_autosam2
    from autosam2.model.weights import RunWeights

    cfg = load_config(None, ["model.image_size=64"])
    torch.manual_seed(0)
    return RunWeights(run_dir, build_autosam2(cfg.model, torch.device("cpu")), cfg.model, True).save(
        "final.pt", 0
    )


def training_store(tmp_path: Path, run_dir: Path) -> tuple[str, str]:
    """An MLflow store holding a training run, recorded in `run_dir` as train's tracking records it."""
    import mlflow

    uri = f"sqlite:///{tmp_path.resolve()}/store/mlflow.db"
    (tmp_path / "store").mkdir()
    client = mlflow.MlflowClient(uri)
    experiment = client.create_experiment("autosam2", artifact_location=str(tmp_path / "store" / "artifacts"))
    run_id = client.create_run(experiment, run_name="train").info.run_id
    (run_dir / "tracking").mkdir(parents=True)
    (run_dir / "tracking" / "sent.json").write_text(json.dumps({"sent": 0, "run_id": run_id}))
    record_store(run_dir, Store(uri, "autosam2", "explicit"))
    return uri, run_id


def ours(out: Path) -> dict[str, dict]:
    rows = json.loads((out / "benchmark.json").read_text())["rows"]
    return {r["split"]: r["figures"] for r in rows if r["source"] == OURS}


@pytest.mark.slow
def test_benchmark_on_two_ranks_then_score_on_its_predictions_gives_the_same_rows(tmp_path, sunseg):
    import mlflow

    from autosam2.data.layouts.sunseg import frame_order
    from tests.helpers import TORCHRUN_2

    run_dir = tmp_path / "run"
    weights = trained_weights(run_dir)
    uri, train_id = training_store(tmp_path, run_dir)
    out = tmp_path / "bench"
    done = subprocess.run(
        [*TORCHRUN_2, "-m", "autosam2.cli", "benchmark", "sunseg", "--weights", str(weights), "--data",
         str(sunseg), "--output-dir", str(out), "--no-overlays", "--cpu"],  # the store: the run's
        cwd=REPO, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    for split in TESTS:
        metrics = json.loads((out / split.replace("/", "_") / "metrics.json").read_text())
        assert set(metrics["summary"]) == set(TOOLBOX_METRICS) and metrics["ranks"] == 2
        assert metrics["frames"] == {
            f"case{TESTS.index(split) + 2}_{k}": 2 for k in (1, 2)
        }  # first, last dropped
    with open(out / "benchmark.csv") as f:
        table_rows = list(csv.DictReader(f))
    assert [r["split"] for r in table_rows if r["method"] == "run/final"] == list(TESTS)
    assert {r["method"] for r in table_rows if r["split"] == "TestEasyDataset"} >= {"2021-MICCAI-PNSNet"}
    assert "run/final" in done.stdout and "2022-MIR-PNSPlus" in done.stdout

    client = mlflow.MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("autosam2").experiment_id])
    split_runs = {r.data.tags["split"]: r for r in runs if "split" in r.data.tags}
    assert set(split_runs) == set(TESTS)
    for split, found in split_runs.items():
        assert found.data.tags["trained_by"] == train_id
        assert found.data.tags["mlflow.parentRunId"] == train_id
        assert found.info.run_name == f"benchmark-{split.replace('/', '_')}-step0"
        assert found.data.metrics["eval/Smeasure"] == pytest.approx(ours(out)[split]["Smeasure"])

    # the soft maps in the toolbox's prediction layout, scored: the same rows
    pred = tmp_path / "Pred" / "run"
    for split in TESTS:
        shutil.copytree(out / split.replace("/", "_") / "soft", pred / split)
    case = sunseg / TESTS[0] / "GT" / "case2_1"
    stems = [p.stem for p in case.iterdir()]
    assert frame_order(stems)[1:-1] != sorted(stems)[1:-1]  # the evaluator's order decides what is dropped
    scored = run("score", "--layout", "sunseg", "--pred", str(pred), "--gt", str(sunseg), "--output-dir",
                 str(tmp_path / "scored"))  # fmt: skip
    assert scored.returncode == 0, scored.stderr[-3000:]
    assert ours(tmp_path / "scored") == ours(out)
    with open(tmp_path / "scored" / "benchmark.csv") as f:
        again = list(csv.DictReader(f))
    assert [r for r in again if r["method"] != "run"] == [r for r in table_rows if r["method"] != "run/final"]


def test_a_root_without_a_split_is_one_line_and_nothing_is_written(tmp_path, sunseg):
    root = tmp_path / "SUN-SEG"
    shutil.copytree(sunseg, root)
    shutil.rmtree(root / "TestHardDataset" / "Unseen")
    out = tmp_path / "bench"
    done = run("benchmark", "sunseg", "--weights", str(tmp_path / "w.pt"), "--data", str(root),
               "--output-dir", str(out), "--cpu")  # fmt: skip
    assert done.returncode == 1
    assert done.stderr.strip().splitlines()[-1] == (
        f"autosam2 benchmark: {root}: no TestHardDataset/Unseen (a SUN-SEG root holds <split>/Frame/<case>/ "
        f"and <split>/GT/<case>/; found: {', '.join(TESTS[:3])})"
    )
    assert not out.exists()
    pred = tmp_path / "Pred" / "m"
    (pred / TESTS[0]).mkdir(parents=True)
    done = run(
        "score", "--layout", "sunseg", "--pred", str(pred), "--gt", str(sunseg), "--output-dir", str(out)
    )
    assert done.returncode == 1
    assert done.stderr.strip().removeprefix("autosam2 score: ").splitlines()[-3:] == [
        f"{pred}: no {split} folder (the toolbox's prediction layout: <method>/{split}/<case>/<frame>.png)"
        for split in TESTS[1:]
    ]
    assert not out.exists()


def test_a_broken_last_split_is_found_before_the_first_is_run(tmp_path, sunseg):
    import argparse

    from autosam2.benchmark import _splits
    from autosam2.errors import DatasetError

    root = shutil.copytree(sunseg, tmp_path / "SUN-SEG")
    gt = sorted((root / TESTS[-1] / "GT").glob("*/*.png"))[0]
    gt.unlink()
    with pytest.raises(DatasetError, match=f"image has no mask .*--split {TESTS[-1]}` to list them all"):
        _splits(argparse.Namespace(data=str(root), splits=None))


def test_score_with_the_sunseg_layout_takes_the_toolbox_s_protocol_only(capsys):
    from autosam2.score import main

    for extra, said in (
        (["--layout", "sunseg", "--splits", "TestEasyDataset/Seen", "--metric-mode", "ours"], "sunseg only"),
        (["--splits", "TestEasyDataset/Seen", "--split", "TestEasyDataset/Seen"], "name one of them"),
        (["--splits", "TestEasyDataset/Seen"], "--splits is for --layout sunseg"),
    ):
        with pytest.raises(SystemExit) as exit_:
            main(["--pred", "p", "--gt", "g", *extra])
        assert exit_.value.code == 2 and said in capsys.readouterr().err
