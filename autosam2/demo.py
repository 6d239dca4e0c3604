"""`autosam2 demo`: the whole mission on the embedded defaults, on the CPU, in minutes.

Synthetic polyp videos (the default set and the hard split, each with train, valid and a held-out test
split) -> validation -> WebDataset shards -> a two-stage curriculum in 2-process DDP (hiera-t, 256 px,
random-init SAM2, the frozen encoder's features cached): stage 1 frame by frame on the default set,
stage 2 through SAM2's memory on the hard split from stage 1's weights -> evaluation of stage 1 per frame
on the default set, and of stage 2 in video (memory) and per-frame mode on the hard split, each on the
valid and the test split, with Dice and presence per kind of frame -> the tables (valid and test side by
side, also in demo.json), and the `mlflow ui` command. Everything is in MLflow (SQLite).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

from autosam2.arguments import add_output_dir

EXPERIMENT = "autosam2-demo"
STAGE2_CONFIG = "cpu_demo_video"
SPLITS = ("train", "valid", "test")
# the held-out split: few sequences, so it adds little to the demo's minutes
TEST_SEQUENCES = 2
# valid steers the runs (their validation curves, the configs chosen by them); test is held out
HELD_OUT = (
    "test: held out, no stage trained, validated or was tuned on it; valid: the runs' own validation split"
)


def _step(title: str) -> float:
    print(f"\n== {title}", flush=True)
    return time.perf_counter()


def _run(cmd: list[str]) -> None:
    """One stage, as a user would run it; a stage that fails has said why: the demo stops naming it."""
    from autosam2.errors import JobFailed

    print("$ " + " ".join(cmd), flush=True)
    code = subprocess.run(cmd).returncode
    if code != 0:
        stage = " ".join(part for part in cmd[1:6] if not part.startswith("/"))
        raise JobFailed(f"the stage `{stage} ...` exited with status {code}; its output above says why")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="autosam2 demo", description=__doc__, allow_abbrev=False)
    add_output_dir(parser, "--out", type=Path, default=Path("demo"), help="the demo's folder (default demo)")
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an earlier demo's output in --output-dir (nothing else)",
    )
    shipped = "a run config file or a shipped one's name"
    parser.add_argument("--config", default="cpu_demo", help=f"stage 1 (frame mode): {shipped}")
    parser.add_argument("--video-config", default=STAGE2_CONFIG, help=f"stage 2 (through memory): {shipped}")
    parser.add_argument("--nproc", type=int, default=2, help="training processes (DDP on the CPU)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides for both stages' configs")
    args = parser.parse_args(argv)

    start = time.perf_counter()
    _check(args)
    out = _claim(args.output_dir, args.overwrite)
    root, shards, run = out / "polyp_gen", out / "shards", out / "run"
    hard_root, hard_shards, video_run = out / "polyp_gen_hard", out / "shards_hard", out / "run_video"
    _data(root, shards)
    _data(hard_root, hard_shards, hard=True)
    _train(args, args.config, shards, run, "train")
    uri = f"sqlite:///{run}/mlflow.db"
    start_from = f"train.init_from={run / 'final.pt'}"
    _train(args, args.video_config, hard_shards, video_run, "train_video", start_from, f"tracking.uri={uri}")
    default = _evaluate(
        root,
        shards,
        out / "results",
        uri,
        [("stage 1, per frame", run / "final.pt", "frame")],
    )
    hard = _evaluate(
        hard_root,
        hard_shards,
        out / "results_hard",
        uri,
        [
            ("stage 2, video (memory)", video_run / "final.pt", "video"),
            ("stage 2, per frame", video_run / "final.pt", "frame"),
        ],
    )
    tables = {
        "the default set (stage 1: frame mode)": default,
        "the hard split (stage 2: through memory, from stage 1)": hard,
    }
    for title, summaries in tables.items():
        _summary(title, summaries)
    print(f"({HELD_OUT})")
    _record(out, tables, time.perf_counter() - start)
    _print_ui_line(uri)
    print(f"overlays (GIF per valid sequence): {out / 'results_hard' / 'final-video' / 'overlays'}")
    print(f"demo finished in {(time.perf_counter() - start) / 60:.1f} minutes")
    return 0


def _check(args: argparse.Namespace) -> None:
    """Both stages' configs with the overrides, before any work (the stages add only paths)."""
    from autosam2.config import ConfigError, load_config

    if args.nproc < 1:
        raise ConfigError(f"--nproc {args.nproc}: needs at least one training process")
    for config in (args.config, args.video_config):
        load_config(config, list(args.overrides))


def _claim(out: Path, overwrite: bool) -> Path:
    """The demo's folder: new, empty, or (with --overwrite) an earlier demo's, marked as the demo's own
    before anything is written into it, so a later --overwrite knows it."""
    from autosam2.atomic import atomic_write_json
    from autosam2.outputs import DEMO, DEMO_MARKER, claim

    out = claim(out, DEMO, overwrite).resolve()
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / DEMO_MARKER, {"written_by": "autosam2 demo", "started": time.ctime()})
    return out


def _data(root: Path, shards: Path, hard: bool = False) -> None:
    """Synthetic videos, checked, then sharded and verified as a user would."""
    python = sys.executable
    t = _step(f"synthetic polyp videos{', the hard split' if hard else ''}")
    synth = [python, "-m", "autosam2.cli", "synth", "--output-dir", str(root)]
    synth += ["--overwrite", "--workers", "2", "--test-sequences", str(TEST_SEQUENCES)]
    _run([*synth, *(["--hard"] if hard else [])])
    _run([python, "-m", "autosam2.cli", "validate", str(root)])
    for split in SPLITS:
        build = [python, "-m", "shards", "build", str(root), "--split", split]
        build += ["--output-dir", str(shards / split)]
        _run([*build, "--frames-per-sample", "8", "--max-shard-mb", "0.3", "--overwrite"])
        _run([python, "-m", "shards", "verify", str(shards / split)])
    print(f"({time.perf_counter() - t:.0f} s)")


def _train(args: argparse.Namespace, config: str, shards: Path, run: Path, name: str, *extra: str) -> None:
    """One stage into `run`; `extra` overrides before the user's (stage 2: where to start from, and
    the first stage's MLflow store, so the demo's runs sit side by side)."""
    t = _step(f"training ({name}, {config}): {args.nproc} processes, DDP on the CPU")
    shutil.rmtree(run, ignore_errors=True)  # a fresh run: the demo measures learning from step 0
    overrides = [
        f"data.train={shards / 'train'}",
        f"data.valid={shards / 'valid'}",
        f"train.output_dir={run}",
        f"tracking.experiment={EXPERIMENT}",
        f"tracking.run_name={name}",
        *extra,
        *args.overrides,
    ]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node"]
    _run([*torchrun, str(args.nproc), "-m", "autosam2.cli", "train", "--config", config, *overrides])
    print(f"({time.perf_counter() - t:.0f} s)")


def _evaluate(
    root: Path, shards: Path, results: Path, uri: str, models: list[tuple[str, Path, str]]
) -> dict[str, dict[str, dict]]:
    """Each (label, weights, mode) on the valid and the test sequences: per label and split, the
    figures of one table row (`_figures`); overlays for valid only."""
    t = _step(f"evaluation on the valid and test sequences of {root.name}")
    summaries: dict[str, dict[str, dict]] = {}
    for label, weights, mode in models:
        for split in SPLITS[1:]:
            target = results / f"{weights.stem}-{mode}{'' if split == 'valid' else f'-{split}'}"
            evaluate = [sys.executable, "-m", "autosam2.cli", "evaluate", "--weights", str(weights)]
            evaluate += ["--data", str(shards / split), "--split", split, "--output-dir", str(target)]
            evaluate += ["--mode", mode, "--cpu", "--episodes", str(root), "--tracking-uri", uri]
            evaluate += ["--experiment", EXPERIMENT, "--overwrite"]
            _run([*evaluate, *(["--no-overlays"] if split != "valid" else [])])
            metrics = json.loads((target / "metrics.json").read_text())
            summaries.setdefault(label, {})[split] = _figures(metrics)
    print(f"({time.perf_counter() - t:.0f} s)")
    return summaries


def _figures(metrics: dict) -> dict:
    """One table row from an evaluation's metrics.json: the headline figures, Dice per kind of frame,
    presence accuracy (all frames and hidden ones), and the frames per kind."""
    m, kinds = metrics["summary"], metrics["episodes"]
    return {
        **{name: m[name] for name in ("dice", "iou", "s_measure", "e_measure")},
        **{f"dice_{kind}": kinds[kind]["dice"] for kind in ("hidden", "occluded", "clear")},
        "presence_accuracy": kinds["all"]["presence_accuracy"],
        "presence_accuracy_hidden": kinds["hidden"]["presence_accuracy"],
        "sequences": len(metrics["per_sequence"]),
        "frames": {kind: score["frames"] for kind, score in kinds.items()},
    }


def _record(out: Path, tables: dict[str, dict[str, dict[str, dict]]], seconds: float) -> None:
    """The tables' figures into demo.json, beside its marker."""
    from autosam2.atomic import atomic_write_json
    from autosam2.outputs import DEMO_MARKER, json_object

    record = json_object(out / DEMO_MARKER)
    record.update(minutes=round(seconds / 60, 2), held_out=HELD_OUT, results=tables)
    atomic_write_json(out / DEMO_MARKER, record)


def _figure(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _summary(title: str, summaries: dict[str, dict[str, dict]]) -> None:
    print(f"\n== summary: {title}")
    print(
        f"{'model':<24} {'split':<5} {'dice':>6} {'iou':>6} {'S-measure':>9} {'mean E':>7}   dice on: "
        f"{'hidden':>6} {'occluded':>8} {'clear':>6}   presence acc. (hidden)"
    )
    for label, splits in summaries.items():
        for split, f in splits.items():
            print(
                f"{label if split == 'valid' else '':<24} {split:<5} {f['dice']:6.3f} {f['iou']:6.3f} "
                f"{f['s_measure']:9.3f} {f['e_measure']:7.3f}   {'':8} {_figure(f['dice_hidden']):>6} "
                f"{_figure(f['dice_occluded']):>8} {_figure(f['dice_clear']):>6}   "
                f"{_figure(f['presence_accuracy']):>13} ({_figure(f['presence_accuracy_hidden'])})"
            )
    from autosam2.data.synthetic import BLIND, HIDING

    for split, f in next(iter(summaries.values())).items():
        n = f["frames"]
        hidden = ", ".join(f"{n[k]} {k}" for k in (*HIDING, *BLIND))
        print(
            f"({split}: {f['sequences']} sequences, {n['all']} frames: {n['hidden']} with the polyp there but "
            f"hidden ({hidden}), {n['occluded']} partly occluded, {n['clear']} clear, {n['absent']} polyp-free)"
        )


def _print_ui_line(uri: str) -> None:
    """The command that shows the demo's runs in MLflow's UI (the UI is the install's server extra)."""
    from autosam2.extras import install_line, installed

    print(f"\nmlflow ui --backend-store-uri {uri} --port 5000    # then open http://127.0.0.1:5000")
    if not installed("server"):
        print(f"(MLflow's UI is not installed here: {install_line('server')})")
