"""`autosam2 demo`: the whole mission on the embedded defaults, on the CPU, in minutes.

Synthetic polyp videos -> validation -> WebDataset shards -> 2-process DDP training (hiera-t, 256 px,
random-init SAM2) -> evaluation of the untrained and the trained model, in video (memory) and per-frame
mode -> a per-sequence table, the comparison, and the `mlflow ui` command. Everything is in MLflow (SQLite).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

from autosam2.data.codec import MASK_THRESHOLD
from autosam2.metrics import frame_metrics

EXPERIMENT = "autosam2-demo"


def _step(title: str) -> float:
    print(f"\n== {title}", flush=True)
    return time.perf_counter()


def _run(cmd: list[str]) -> None:
    print("$ " + " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def hard_frame_dice(root: Path, results: Path) -> dict[str, float]:
    """Mean Dice (both-empty = 1) over the valid frames of each kind: hard episodes (blur/haze, the polyp
    still there), partly occluded, and all others, from the masks `evaluate` wrote."""
    events = json.loads((root / "synth.json").read_text())["events"]
    groups: dict[str, list[float]] = {"blur_or_haze": [], "occluded": [], "other": []}
    for seq in (root / "valid" / "val_list.txt").read_text().split():
        for i, event in enumerate(events[seq]):
            name = f"frame{i + 1}"
            gt = (
                np.asarray(Image.open(root / "valid" / "masks" / seq / f"{name}.jpg").convert("L"))
                > MASK_THRESHOLD
            )
            pred = np.asarray(Image.open(results / "masks" / seq / f"{name}.png")) > 0
            dice = frame_metrics(pred.astype(np.float32), gt)["dice"]
            if event["episode"] and event["visible"]:
                groups["blur_or_haze"].append(dice)
            elif event["occluded"] > 0.05:
                groups["occluded"].append(dice)
            else:
                groups["other"].append(dice)
    return {k: float(np.mean(v)) if v else float("nan") for k, v in groups.items()} | {
        f"{k}_frames": len(v) for k, v in groups.items()
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="autosam2 demo", description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("demo"))
    parser.add_argument("--config", default="configs/cpu_demo.yaml")
    parser.add_argument("--nproc", type=int, default=2, help="training processes (DDP on the CPU)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides for the training config")
    args = parser.parse_args(argv)

    start = time.perf_counter()
    out = args.out.resolve()
    root, shards, run = out / "polyp_gen", out / "shards", out / "run"
    _data(root, shards)
    _train(args, shards, run)
    summaries = _evaluate(root, shards, run, out / "results")
    _summary(summaries, f"sqlite:///{run}/mlflow.db", out)
    print(f"demo finished in {(time.perf_counter() - start) / 60:.1f} minutes")
    return 0


def _data(root: Path, shards: Path) -> None:
    """Synthetic videos, checked, then sharded and verified as a user would."""
    python = sys.executable
    t = _step("synthetic polyp videos")
    _run([python, "-m", "autosam2.cli", "synth", "--out", str(root), "--overwrite"])
    _run([python, "-m", "autosam2.cli", "validate", str(root)])
    print(f"({time.perf_counter() - t:.0f} s)")

    t = _step("WebDataset shards")
    for split in ("train", "valid"):
        build = [python, "-m", "shards", "build", str(root), "--split", split, "--out", str(shards / split)]
        _run([*build, "--frames-per-sample", "8", "--max-shard-mb", "0.3", "--overwrite"])
        _run([python, "-m", "shards", "verify", str(shards / split)])
    print(f"({time.perf_counter() - t:.0f} s)")


def _train(args: argparse.Namespace, shards: Path, run: Path) -> None:
    t = _step(f"training: {args.nproc} processes, DDP on the CPU")
    shutil.rmtree(run, ignore_errors=True)  # a fresh run: the demo measures learning from step 0
    overrides = [
        f"data.train={shards / 'train'}",
        f"data.valid={shards / 'valid'}",
        f"train.output_dir={run}",
        f"tracking.experiment={EXPERIMENT}",
        "tracking.run_name=train",
        *args.overrides,
    ]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node"]
    _run([*torchrun, str(args.nproc), "-m", "autosam2.cli", "train", "--config", args.config, *overrides])
    print(f"({time.perf_counter() - t:.0f} s)")


def _evaluate(root: Path, shards: Path, run: Path, results: Path) -> dict[str, tuple[dict, dict]]:
    """The untrained and the trained model, in video and per-frame mode: metrics and hard-frame Dice."""
    t = _step("evaluation on the valid sequences")
    summaries = {}
    for label, weights, mode in (
        ("untrained", "initial.pt", "video"),
        ("trained, video (memory)", "final.pt", "video"),
        ("trained, per frame", "final.pt", "frame"),
    ):
        target = results / f"{weights.removesuffix('.pt')}-{mode}"
        evaluate = [sys.executable, "-m", "autosam2.cli", "evaluate", "--weights", str(run / weights)]
        evaluate += ["--data", str(shards / "valid"), "--output-dir", str(target), "--mode", mode, "--cpu"]
        evaluate += [
            "--tracking-uri",
            f"sqlite:///{run}/mlflow.db",
            "--experiment",
            EXPERIMENT,
            "--overwrite",
        ]
        _run(evaluate)
        summaries[label] = (json.loads((target / "metrics.json").read_text()), hard_frame_dice(root, target))
    print(f"({time.perf_counter() - t:.0f} s)")
    return summaries


def _summary(summaries: dict[str, tuple[dict, dict]], uri: str, out: Path) -> None:
    print("\n== summary")
    print(
        f"{'model':<26} {'dice':>6} {'iou':>6} {'S-measure':>9} {'mean E':>7}   dice on: {'blur/haze':>9} {'occluded':>8} {'other':>6}"
    )
    for label, (metrics, hard) in summaries.items():
        m = metrics["summary"]
        print(
            f"{label:<26} {m['dice']:6.3f} {m['iou']:6.3f} {m['s_measure']:9.3f} {m['e_measure']:7.3f}   {'':8} {hard['blur_or_haze']:9.3f} {hard['occluded']:8.3f} {hard['other']:6.3f}"
        )
    frames = summaries["trained, video (memory)"][1]
    print(
        f"(hard-episode frames: {frames['blur_or_haze_frames']}, occluded: {frames['occluded_frames']}, others: {frames['other_frames']})"
    )
    print(f"\nmlflow ui --backend-store-uri {uri} --port 5000    # then open http://127.0.0.1:5000")
    print(f"overlays (GIF per valid sequence): {out / 'results' / 'final-video' / 'overlays'}")
