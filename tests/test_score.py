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

from autosam2.metrics import TOOLBOX_METRICS, MetricAccumulator

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
    return acc.toolbox_summary()


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
    assert "drops the first and" in score("--help").stdout


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
    assert summary == pytest.approx(acc.toolbox_summary(), abs=1e-12)


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
    client = mlflow.MlflowClient(f"sqlite:///{out.resolve()}/mlflow.db")
    (run,) = client.search_runs([client.get_experiment_by_name("autosam2").experiment_id])
    assert run.info.run_name == "PNSNet" and run.data.params["metric_mode"] == "sunseg"
    summary = json.loads((out / "metrics.json").read_text())["summary"]
    assert run.data.metrics["eval/maxDice"] == pytest.approx(summary["maxDice"])


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
    assert again["summary"] == evaluated["toolbox"]  # exactly: the same 8-bit maps, masks and reduction
    assert again["frames"] == evaluated["frames"]
