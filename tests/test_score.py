"""`autosam2 score`: any method's saved masks, paired by name, scored with the toolbox's figures."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from autosam2.metrics import DICE_RULES, TOOLBOX_METRICS, MetricAccumulator

REPO = Path(__file__).resolve().parents[1]


def score(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "autosam2.cli", "score", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )


def write(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def method(
    tmp_path: Path, frames: int = 5, size=(24, 32), pred_size=None, seed: int = 0
) -> tuple[Path, Path]:
    """Ground truth (grey-edged 0..255 disks, one empty frame) and a method's soft maps, two sequences."""
    rng = np.random.default_rng(seed)
    gt_root, pred_root = tmp_path / "GT", tmp_path / "Pred" / "method"
    yy, xx = np.mgrid[: size[0], : size[1]]
    for seq in ("case1", "case2"):
        for i in range(1, frames + 1):
            dist = np.hypot(yy - rng.uniform(6, 18), xx - rng.uniform(8, 24))
            gt = np.clip((6 - dist) * 60 + 128, 0, 255).astype(np.uint8)
            if i == 3:
                gt[:] = 0
            pred = (
                np.clip(1 / (1 + np.exp(dist / 2 - 3)) + rng.normal(0, 0.1, dist.shape), 0, 1) * 255
            ).astype(np.uint8)
            if pred_size:
                pred = np.asarray(Image.fromarray(pred).resize(pred_size[::-1]))
            write(gt_root / seq / f"{i}.png", gt)
            write(pred_root / seq / f"{i}.png", pred)
    return pred_root, gt_root


def expected_summary(pred_root: Path, gt_root: Path, keep=slice(1, -1)) -> dict[str, float]:
    acc = MetricAccumulator("sunseg", drop_first_last=False)
    for seq in sorted(p.name for p in gt_root.iterdir()):
        for gt in sorted((gt_root / seq).iterdir(), key=lambda p: int(p.stem))[keep]:
            acc.add_map(seq, np.asarray(Image.open(pred_root / seq / gt.name)), np.asarray(Image.open(gt)))
    return acc.summary()


def test_score_writes_the_toolbox_figures_under_its_names_dropping_first_and_last(tmp_path):
    pred, gt = method(tmp_path / "data")
    out = tmp_path / "out"
    done = score("--pred", str(pred), "--gt", str(tmp_path / "data"), "--output-dir", str(out))  # holds GT/
    assert done.returncode == 0, done.stderr
    result = json.loads((out / "metrics.json").read_text())
    assert set(result["summary"]) == set(TOOLBOX_METRICS)  # metrics.csv keeps the toolbox order
    assert result["summary"] == pytest.approx(expected_summary(pred, gt), abs=1e-12)
    assert result["frames"] == {"case1": 3, "case2": 3} and result["first_last_dropped"] is True
    assert set(result["per_sequence"]) == {"case1", "case2"}
    csv = (out / "metrics.csv").read_text().splitlines()
    assert csv[0] == "sequence," + ",".join(TOOLBOX_METRICS) and csv[-1].startswith("mean,")
    assert "maxDice" in done.stdout and "mean" in done.stdout  # the printed table
    kept = score(
        "--pred", str(pred), "--gt", str(gt), "--output-dir", str(tmp_path / "all"), "--keep-first-last"
    )
    assert kept.returncode == 0, kept.stderr
    assert json.loads((tmp_path / "all" / "metrics.json").read_text())["summary"] == pytest.approx(
        expected_summary(pred, gt, slice(None)), abs=1e-12
    )
    shown = score("--help").stdout
    assert "drops the first and" in shown and DICE_RULES in shown  # the Dice rule of each mode, stated


def test_predictions_of_another_size_are_resized_as_the_toolbox_does_and_said_once(tmp_path):
    import cv2

    pred, gt = method(tmp_path, pred_size=(12, 20))
    done = score("--pred", str(pred), "--gt", str(gt), "--output-dir", str(tmp_path / "out"))
    assert done.returncode == 0, done.stderr
    said = [line for line in done.stderr.splitlines() if "resized to the ground truth" in line]
    assert len(said) == 2 and "20x12, the ground truth 32x24" in said[0]  # one line a sequence
    acc = MetricAccumulator("sunseg", drop_first_last=False)
    for seq in ("case1", "case2"):
        for i in (2, 3, 4):
            small = cv2.imread(str(pred / seq / f"{i}.png"), cv2.IMREAD_GRAYSCALE)
            acc.add_map(
                seq, cv2.resize(small, (32, 24)), cv2.imread(str(gt / seq / f"{i}.png"), cv2.IMREAD_GRAYSCALE)
            )
    summary = json.loads((tmp_path / "out" / "metrics.json").read_text())["summary"]
    assert summary == pytest.approx(acc.summary(), abs=1e-12)


def test_missing_and_extra_frames_are_each_named_and_skip_scores_the_rest(tmp_path):
    pred, gt = method(tmp_path)
    (pred / "case1" / "3.png").unlink()  # a kept frame
    (pred / "case2" / "1.png").unlink()  # a first frame: the toolbox never reads it, nor do we
    write(pred / "case2" / "99.png", np.zeros((24, 32), np.uint8))
    write(pred / "case9" / "1.png", np.zeros((24, 32), np.uint8))
    failed = score("--pred", str(pred), "--gt", str(gt), "--output-dir", str(tmp_path / "out"))
    assert failed.returncode == 1 and not (tmp_path / "out").exists()
    lines = failed.stderr.strip().splitlines()
    assert any(str(pred / "case1" / "3.png") in line and "missing" in line for line in lines)
    assert any(str(pred / "case2" / "99.png") in line and "no ground truth" in line for line in lines)
    assert any(str(pred / "case9") in line and "does not have" in line for line in lines)
    assert not any("case2/1.png" in line for line in lines)
    skipped = score(
        "--pred", str(pred), "--gt", str(gt), "--output-dir", str(tmp_path / "out"), "--on-missing", "skip"
    )
    assert skipped.returncode == 0, skipped.stderr
    assert json.loads((tmp_path / "out" / "metrics.json").read_text())["frames"] == {"case1": 2, "case2": 3}
    assert skipped.stderr.count("warning: skipped:") == 3


def test_unreadable_files_and_label_maps_are_errors_naming_the_file(tmp_path):
    pred, gt = method(tmp_path)
    (pred / "case1" / "2.png").write_bytes(b"not a png")
    done = score("--pred", str(pred), "--gt", str(gt), "--output-dir", str(tmp_path / "out"))
    assert done.returncode == 1 and f"{pred / 'case1' / '2.png'}: unreadable" in done.stderr
    assert "Traceback" not in done.stderr
    pred, gt = method(tmp_path / "labels")
    for mask in (gt / "case2").iterdir():
        write(mask, (np.asarray(Image.open(mask)) > 128).astype(np.uint8))  # 0/1, not 0/255
    done = score("--pred", str(pred), "--gt", str(gt), "--output-dir", str(tmp_path / "out"))
    assert done.returncode == 1 and "0/1 label map" in done.stderr and str(gt / "case2") in done.stderr


def test_scores_can_be_logged_to_mlflow_beside_our_runs(tmp_path):
    import mlflow

    pred, gt = method(tmp_path)
    out = tmp_path / "out"
    done = score(
        "--pred", str(pred), "--gt", str(gt), "--output-dir", str(out), "--mlflow", "--run-name", "PNSNet"
    )
    assert done.returncode == 0, done.stderr
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path.resolve()}/mlflow.db")  # beside the output folder
    (run,) = client.search_runs([client.get_experiment_by_name("autosam2").experiment_id])
    assert run.info.run_name == "PNSNet" and run.data.params["metric_mode"] == "sunseg"
    summary = json.loads((out / "metrics.json").read_text())["summary"]
    assert run.data.metrics["eval/maxDice"] == pytest.approx(summary["maxDice"])


def mlflow_runs(store: Path, experiment: str) -> list:
    """The runs of `experiment` in the SQLite store `store`."""
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{store.resolve()}")
    found = client.get_experiment_by_name(experiment)
    return client.search_runs([found.experiment_id]) if found else []


@pytest.mark.slow
def test_scores_of_our_predictions_log_beside_the_run_that_trained_the_weights(
    train_data, tmp_path, monkeypatch, capsys
):
    """A 2-step training, `predict` and `evaluate` with its weights, then `score --mlflow` on their
    masks: the score runs go into the training run's store and experiment, tagged with it and nested
    under it; MLflow's variable wins over that store (still tagged, not nested there); an evaluation's
    folder found by its metrics.json alone (as a benchmark's split folder keeps it) is linked too."""
    from autosam2.cli import main as cli
    from autosam2.tracking.choice import PARENT_TAG, read_run
    from tests.helpers import train_overrides

    run_dir = tmp_path / "runs" / "a"
    train = train_overrides(train_data, run_dir, **{"train.max_steps": 2, "tracking.experiment": "polyp"})
    assert cli(["train", *train]) == 0
    weights, root = run_dir / "final.pt", train_data["root"]
    model = ["--weights", str(weights), "--cpu", "--no-overlays"]
    assert cli(["predict", str(root), *model, "--output-dir", str(tmp_path / "predicted")]) == 0
    evaluate = ["evaluate", "--data", str(train_data["valid"]), *model]
    assert cli([*evaluate, "--output-dir", str(tmp_path / "evaluated")]) == 0
    capsys.readouterr()

    def scored(pred: Path, out: str) -> None:
        argv = ["score", "--pred", str(pred), "--gt", str(root), "--output-dir", str(tmp_path / out)]
        assert cli([*argv, "--mlflow"]) == 0
        assert "note:" not in capsys.readouterr().err

    train_id = read_run(run_dir).run_id
    scored(tmp_path / "predicted" / "soft", "s_predicted")
    scored(tmp_path / "evaluated" / "masks", "s_evaluated")
    (tmp_path / "evaluated" / "progress.json").unlink()  # what a benchmark's split folder keeps
    scored(tmp_path / "evaluated" / "soft", "s_metrics")
    runs = mlflow_runs(tmp_path / "runs" / "mlflow.db", "polyp")
    scores = {Path(r.data.tags["output_dir"]).name: r for r in runs if r.info.run_name.startswith("score")}
    assert sorted(r.info.run_name for r in runs if r not in scores.values()) == [
        "eval-valid-step2",
        "hiera_t-video-a",
    ]
    assert {out: r.info.run_name for out, r in scores.items()} == {
        "s_predicted": "score-valid-final-soft",
        "s_evaluated": "score-valid-final-masks",
        "s_metrics": "score-valid-final-soft",
    }
    for found in scores.values():
        tags = found.data.tags
        assert tags["trained_by"] == tags[PARENT_TAG] == train_id  # nested under it in the UI
        assert tags["trained_by_dir"] == str(run_dir.resolve())
        assert found.data.params["weights"] == str(weights.resolve())
    assert not list(tmp_path.glob("mlflow.db*"))  # nothing in the default store beside the outputs

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path.resolve()}/env.db")
    scored(tmp_path / "predicted" / "masks", "s_env")
    (run,) = mlflow_runs(tmp_path / "env.db", "polyp")  # the run's experiment in the variable's store
    assert run.info.run_name == "score-valid-final-masks" and run.data.tags["trained_by"] == train_id
    assert PARENT_TAG not in run.data.tags  # that store lacks the training run


def test_predictions_with_no_record_of_their_weights_are_logged_unlinked(tmp_path, capsys):
    """Predictions of elsewhere (no progress.json) log as ever: beside the output folder, unlinked, no
    note; a damaged progress.json, or one naming weights of no training run, is one note and no crash."""
    from autosam2.score import main
    from autosam2.tracking.choice import PARENT_TAG

    pred, gt = method(tmp_path)
    argv = ["--pred", str(pred), "--gt", str(gt), "--mlflow"]
    weights = tmp_path / "downloads" / "w.pt"
    records = {
        "foreign": None,
        "damaged": "{not json",
        "listed": "[1, 2]",
        "no_weights": json.dumps({"command": "predict", "inputs": {"weights": None}}),
        "no_run": json.dumps({"command": "predict", "inputs": {"weights": {"path": str(weights)}}}),
    }
    for name, record in records.items():
        if record is not None:
            (pred.parent / "progress.json").write_text(record)
        assert main([*argv, "--output-dir", str(tmp_path / name)]) == 0
        notes = [line for line in capsys.readouterr().err.splitlines() if line.startswith("note:")]
        said = {
            "foreign": None,
            "no_run": f"note: {weights} is not in a training run's output directory",
        }.get(name, f"note: {pred.parent.resolve() / 'progress.json'}: names no weights file")
        assert (notes == []) if said is None else (len(notes) == 1 and notes[0].startswith(said)), notes
    runs = mlflow_runs(tmp_path / "mlflow.db", "autosam2")  # beside the output folders
    assert sorted(r.info.run_name for r in runs) == ["score-method"] * 4 + ["score-w-method"]
    for run in runs:
        assert "trained_by" not in run.data.tags and PARENT_TAG not in run.data.tags
        assert run.data.params.get("weights", str(weights)) == str(weights)


def test_score_on_our_own_soft_maps_reproduces_evaluate(tmp_path, tiny_root):
    import torch

    from autosam2.config import load_config
    from autosam2.model.sam2_builder import build_autosam2
    from autosam2.model.weights import RunWeights

    cfg = load_config(None, ["model.image_size=64"])
    torch.manual_seed(0)
    RunWeights(tmp_path, build_autosam2(cfg.model, torch.device("cpu")), cfg.model, True).save("w.pt", 0)
    out = tmp_path / "evaluated"
    evaluate = [sys.executable, "-m", "autosam2.cli", "evaluate", "--weights", str(tmp_path / "w.pt")]
    evaluate += [
        "--data",
        str(tiny_root),
        "--metric-mode",
        "sunseg",
        "--output-dir",
        str(out),
        "--no-overlays",
    ]
    done = subprocess.run(evaluate, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    # progress in a log (stderr not a terminal): plain lines, no carriage returns, the last one always
    assert "\r" not in done.stderr and re.search(r"^evaluate: (\d+)/\1 sequences \(", done.stderr, re.M)
    evaluated = json.loads((out / "metrics.json").read_text())
    masks = sorted((out / "soft").rglob("*.png"))
    assert masks and {p.name for p in masks} == {p.name for p in (out / "masks").rglob("*.png")}
    assert np.asarray(Image.open(masks[0])).dtype == np.uint8
    scored = score(
        "--pred",
        str(out / "soft"),
        "--gt",
        str(tiny_root / "valid" / "masks"),
        "--output-dir",
        str(tmp_path / "s"),
    )
    assert scored.returncode == 0, scored.stderr
    again = json.loads((tmp_path / "s" / "metrics.json").read_text())
    assert again["summary"] == evaluated["summary"]  # exactly: the same 8-bit maps, masks and reduction
    assert again["frames"] == evaluated["frames"]


def strict_json(text: str) -> dict:
    """JSON as a strict parser reads it: NaN and Infinity are not JSON."""

    def refuse(token: str):
        raise ValueError(f"not JSON: {token}")

    return json.loads(text, parse_constant=refuse)


def test_an_undefined_figure_is_null_in_strict_json_with_its_reason_and_a_dash_in_the_table(tmp_path):
    pred, gt = method(tmp_path)
    write(gt / "case1" / "2.png", np.full((24, 32), 255, np.uint8))  # all polyp: no specificity (0/0)
    out = tmp_path / "out"
    done = score("--pred", str(pred), "--gt", str(gt), "--output-dir", str(out))
    assert done.returncode == 0, done.stderr
    result = strict_json((out / "metrics.json").read_text())
    assert result["summary"]["meanSpe"] is None and result["summary"]["maxSpe"] is None
    assert result["per_sequence"]["case1"]["meanSpe"] is None
    assert isinstance(result["per_sequence"]["case2"]["meanSpe"], float)
    assert set(result["undefined"]) == {"meanSpe", "maxSpe"}
    assert set(result["undefined"]["meanSpe"]) == {"case1", "mean"}
    assert "no background" in result["undefined"]["meanSpe"]["case1"]
    rows = {line.split(",")[0]: line.split(",") for line in (out / "metrics.csv").read_text().splitlines()}
    spe = rows["sequence"].index("meanSpe")
    assert rows["case1"][spe] == rows["mean"][spe] == "nan" and rows["case2"][spe] != "nan"
    table = done.stdout.splitlines()
    assert any(line.startswith("case1") and " - " in line for line in table)
    assert any(line.startswith("-: meanSpe undefined (case1, mean): ") for line in table)


def test_a_sequence_too_short_for_the_drop_is_named_counted_and_recorded(tmp_path):
    pred, gt = method(tmp_path)
    for i in (1, 2):  # two frames: nothing left once the first and the last are dropped
        write(gt / "case3" / f"{i}.png", np.full((24, 32), 255, np.uint8))
        write(pred / "case3" / f"{i}.png", np.full((24, 32), 255, np.uint8))
    out = tmp_path / "out"
    done = score("--pred", str(pred), "--gt", str(gt), "--output-dir", str(out))
    assert done.returncode == 0, done.stderr
    why = "2 frames, none left after dropping the first and last (sunseg)"
    assert f"warning: case3: {why}; not scored" in done.stderr.splitlines()
    assert f"(2 sequences scored, 6 frames; 1 left out: case3: {why})" in done.stdout
    assert json.loads((out / "metrics.json").read_text())["left_out"] == {"case3": why}

    alone = tmp_path / "alone"
    for folder in ("GT", "Pred"):
        (alone / folder).mkdir(parents=True)
        (gt if folder == "GT" else pred).joinpath("case3").rename(alone / folder / "case3")
    failed = score("--pred", str(alone / "Pred"), "--gt", str(alone / "GT"), "--output-dir", str(out / "x"))
    assert failed.returncode == 1 and not (out / "x").exists()
    assert "every sequence is too short" in failed.stderr and "--keep-first-last" in failed.stderr
    assert "no frame pairs" not in failed.stderr
    kept = score(
        "--pred",
        str(alone / "Pred"),
        "--gt",
        str(alone / "GT"),
        "--output-dir",
        str(out / "y"),
        "--keep-first-last",
    )
    assert kept.returncode == 0 and "(1 sequence scored, 2 frames)" in kept.stdout


def test_every_label_map_is_named_one_a_line_up_to_the_cap(tmp_path):
    from autosam2.eval.report import MAX_LISTED

    pred, gt = method(tmp_path, frames=14)  # 12 frames a sequence are read (first and last dropped)
    for mask in (gt / "case2").iterdir():
        write(mask, (np.asarray(Image.open(mask)) > 128).astype(np.uint8))  # 0/1, not 0/255
    bad = sorted(
        str(m)
        for m in (gt / "case2").iterdir()
        if m.stem not in ("1", "14") and np.asarray(Image.open(m)).max()
    )
    assert len(bad) == 11  # frame 3 is polyp-free: all 0 is an empty mask, not a label map
    done = score("--pred", str(pred), "--gt", str(gt), "--output-dir", str(tmp_path / "out"))
    assert done.returncode == 1 and "Traceback" not in done.stderr
    named = [line for line in done.stderr.splitlines() if "0/1 label map" in line]
    assert sorted(line.removeprefix("autosam2 score: ").split(": ")[0] for line in named) == bad
    for mask in (gt / "case1").iterdir():
        write(mask, (np.asarray(Image.open(mask)) > 128).astype(np.uint8))
    done = score("--pred", str(pred), "--gt", str(gt), "--output-dir", str(tmp_path / "out"))
    lines = done.stderr.strip().splitlines()
    assert sum("0/1 label map" in line for line in lines) == MAX_LISTED
    assert "... and 2 more" in lines and lines[-1] == "22 file(s) cannot be scored"
    assert str(MAX_LISTED) in score("--help").stdout  # the cap is stated


def test_missing_files_past_the_cap_are_counted(tmp_path):
    pred, gt = method(tmp_path, frames=14)
    for seq in ("case1", "case2"):
        for i in range(2, 14):
            (pred / seq / f"{i}.png").unlink()
    failed = score("--pred", str(pred), "--gt", str(gt), "--output-dir", str(tmp_path / "out"))
    lines = failed.stderr.strip().splitlines()
    assert failed.returncode == 1 and sum(": missing (ground truth" in line for line in lines) == 20
    assert "... and 4 more" in lines and lines[-1].startswith("24 missing or extra file(s)")
    skipped = score(
        "--pred", str(pred), "--gt", str(gt), "--output-dir", str(tmp_path / "out"), "--on-missing", "skip"
    )
    assert skipped.returncode == 1  # nothing pairs: said with each sequence's reason
    assert "case1: no prediction for any of its 12 frames" in skipped.stderr


def test_resized_predictions_are_counted_per_size(tmp_path):
    pred, gt = method(tmp_path)
    for i, size in ((2, (101, 150)), (3, (101, 150)), (4, (48, 64))):
        small = np.asarray(Image.open(pred / "case1" / f"{i}.png").resize(size[::-1]))
        write(pred / "case1" / f"{i}.png", small)
    done = score("--pred", str(pred), "--gt", str(gt), "--output-dir", str(tmp_path / "out"))
    assert done.returncode == 0, done.stderr
    (said,) = [line for line in done.stderr.splitlines() if "resized" in line]
    assert f"{pred / 'case1'}: 2 predictions are 150x101, 1 is 64x48, the ground truth 32x24: resized" in said


def test_the_tables_write_to_the_stdout_and_stderr_of_the_moment(monkeypatch):
    import io

    from autosam2.eval.report import print_table, say_left_out

    out, err = io.StringIO(), io.StringIO()
    monkeypatch.setattr(sys, "stdout", out)
    monkeypatch.setattr(sys, "stderr", err)
    print_table({"seq1": {"dice": 0.5, "iou": 0.25}}, {"dice": 0.5, "iou": 0.25})
    say_left_out({"seq2": "too short"})
    assert "seq1" in out.getvalue() and "seq2: too short; not scored" in err.getvalue()
