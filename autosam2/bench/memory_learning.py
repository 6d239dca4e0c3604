"""Whether SAM2's memory helps: the same weights in video mode (memory) and in per-frame mode over a
held-out hard test split, scored per kind of frame (`autosam2.eval.episodes`), each figure with a 95%
bootstrap interval over sequences, and the paired difference video - frame with its own.

The split is `autosam2 synth`'s hard test split, made for the run from ``--seed`` (or read from
``--data``); it must hold ``--min-sequences`` sequences, ``--min-hidden`` frames where a present polyp is
hidden, and ``--min-frames-per-kind`` frames of every kind of ``FRAME_KINDS``. Both modes run through
`autosam2 evaluate`'s inference (`infer_sequences`, masks written as it writes them) and are scored
from those masks as ``evaluate --episodes`` scores them.

The bootstrap (`bootstrap_intervals`): B resamples of the sequences with replacement, drawn by a numpy
Generator seeded by ``--seed``; in each, a group's figure (Dice, presence accuracy) is the
frame-weighted mean over the resampled sequences' frames of that group (a sequence drawn twice counts
twice), the same pooling as the point figure over all sequences. Both modes and every group use the
same resamples, so the difference is paired. The interval is the 2.5th and 97.5th percentile of the
resampled figures; a resample without a frame of a group is left out of that group's interval.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import torch

from autosam2.arguments import add_device, add_encode_batch, add_workers, non_negative_int, positive_int
from autosam2.bench.common import default_device
from autosam2.config import ConfigError

MODES = ("video", "frame")
FIGURES = ("dice", "presence_accuracy")
LEVEL = 0.95
DIGITS = 4  # figures as printed: a Dice of 0.0001 is far below any interval's width


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--weights", required=True, help="weights file written by `autosam2 train` (final.pt / best.pt)"
    )
    p.add_argument(
        "--checkpoint",
        default=None,
        help="the SAM2 checkpoint the weights were trained from (omit for random-init runs)",
    )
    p.add_argument(
        "--data",
        default=None,
        metavar="ROOT",
        help="a synthetic polyp_gen root (`autosam2 synth --hard --test-sequences N`) to score --split "
        "of; default: a hard test split made for the run from --sequences, --frames, --size, --seed",
    )
    p.add_argument("--split", default="test", help="the split of --data to score (default test)")
    p.add_argument("--sequences", type=positive_int, default=48, help="test sequences made (default 48)")
    p.add_argument("--frames", type=positive_int, default=24, help="frames per sequence made (default 24)")
    p.add_argument("--size", type=positive_int, default=256, help="frame side made, px (default 256)")
    p.add_argument("--seed", type=int, default=0, help="seed of the split made and of the bootstrap")
    p.add_argument("--bootstrap", type=positive_int, default=2000, metavar="B", help="resamples (2000)")
    p.add_argument("--min-sequences", type=positive_int, default=16, help="sequences asked (16)")
    p.add_argument("--min-hidden", type=non_negative_int, default=300, help="hidden frames asked (300)")
    p.add_argument(
        "--min-frames-per-kind", type=non_negative_int, default=1, help="frames of every kind asked (1)"
    )
    add_workers(p, "making the split")
    add_encode_batch(p)
    add_device(p, default_device(), device_alias=True)


def bootstrap_intervals(
    frames_S: np.ndarray, video_S: np.ndarray, frame_S: np.ndarray, resamples: int, seed: int
) -> dict[str, dict[str, Any]] | None:
    """One group's figure per mode and the paired difference video - frame, each as ``{"value",
    "ci": [lo, hi]}``, from per-sequence frame counts `frames_S` and sums of the figure over those
    frames (`video_S`, `frame_S`); None when no sequence has a frame of the group. See the module's
    docstring for the resampling; `resamples` resamples of the ``S`` sequences, drawn from `seed`."""
    frames_S = np.asarray(frames_S, dtype=np.float64)
    sums_MS = np.stack([np.asarray(video_S, np.float64), np.asarray(frame_S, np.float64)])
    if frames_S.sum() == 0:
        return None
    picks_BS = np.random.default_rng(seed).integers(0, len(frames_S), size=(resamples, len(frames_S)))
    frames_B = frames_S[picks_BS].sum(axis=1)
    kept = frames_B > 0
    figures_MB = sums_MS[:, picks_BS[kept]].sum(axis=-1) / frames_B[kept]
    values_M = sums_MS.sum(axis=1) / frames_S.sum()
    tails = [(1 - LEVEL) / 2, (1 + LEVEL) / 2]

    def figure(value: float, resampled_B: np.ndarray) -> dict[str, Any]:
        ci = np.quantile(resampled_B, tails)
        return {"value": round(float(value), DIGITS), "ci": [round(float(q), DIGITS) for q in ci]}

    return {
        "video": figure(values_M[0], figures_MB[0]),
        "frame": figure(values_M[1], figures_MB[1]),
        "video_minus_frame": figure(values_M[0] - values_M[1], figures_MB[0] - figures_MB[1]),
        "resamples_with_frames": int(kept.sum()),
    }


def group_intervals(
    scores: dict[str, dict[str, dict[str, dict]]], groups: tuple[str, ...], resamples: int, seed: int
) -> dict[str, dict[str, Any]]:
    """Per group: its frames, and per figure `bootstrap_intervals` of the per-sequence scores of each
    mode (``scores[mode][sequence][group]``, `sequence_episode_scores`); None where it has no frame."""
    names = sorted(scores["video"])
    out = {}
    for group in groups:
        frames_S = np.array([scores["video"][s][group]["frames"] for s in names], dtype=np.float64)
        out[group] = {"frames": int(frames_S.sum()), "sequences": int((frames_S > 0).sum())}
        for figure in FIGURES:
            sums = [
                [(scores[mode][s][group][figure] or 0.0) * scores[mode][s][group]["frames"] for s in names]
                for mode in MODES
            ]
            out[group][figure] = bootstrap_intervals(frames_S, *sums, resamples, seed)
    return out


def _split_made(args: argparse.Namespace, tmp: Path) -> Path:
    """The hard test split of `args`, written under `tmp` (one train and valid sequence beside it, as
    every synthetic root holds them)."""
    from autosam2.data.synthetic import write_dataset

    root = tmp / "polyp_gen"
    write_dataset(root, _spec(args), workers=args.workers)
    return root


def _spec(args: argparse.Namespace):
    """The SynthSpec of the split made for the run; one ConfigError line for sizes it cannot take."""
    from autosam2.data.synthetic import SynthSpec

    try:
        return SynthSpec(
            train_sequences=1,
            valid_sequences=1,
            test_sequences=args.sequences,
            frames=args.frames,
            size=args.size,
            seed=args.seed,
            hard=True,
        )
    except ValueError as err:
        raise ConfigError(f"--sequences/--frames/--size: {err}") from None


def checked_split(args: argparse.Namespace, root: Path) -> tuple[dict, list[str], Counter]:
    """The events, sequence names and frames per group of the split to score; one DatasetError naming
    it where it holds fewer sequences, hidden frames or frames of a kind than asked."""
    from autosam2.data.sources import read_sequences
    from autosam2.data.synthetic import FRAME_KINDS
    from autosam2.errors import DatasetError
    from autosam2.eval.episodes import groups_of, read_events

    events = read_events(root)
    names = list(read_sequences(root, args.split, 0, 1, layout="polyp_gen").names)
    counts = Counter(g for name in names for event in events.get(name, []) for g in groups_of(event))
    made = f"--seed {args.seed}'s hard split" if args.data is None else str(root)
    where = f"{made} ({args.split}: {len(names)} sequences, {counts['all']} frames)"
    lower = "more --sequences or --frames, or lower the minimum with its flag"
    if len(names) < args.min_sequences:
        raise DatasetError(f"{where}: fewer sequences than --min-sequences {args.min_sequences}")
    if counts["hidden"] < args.min_hidden:
        raise DatasetError(
            f"{where}: {counts['hidden']} hidden frames, fewer than --min-hidden {args.min_hidden} ({lower})"
        )
    few = [f"{k} {counts[k]}" for k in FRAME_KINDS if counts[k] < args.min_frames_per_kind]
    if few:
        raise DatasetError(
            f"{where}: fewer frames than --min-frames-per-kind {args.min_frames_per_kind} of "
            f"{', '.join(few)} ({lower})"
        )
    return events, names, counts


def _scores_of_mode(args, model, device, root: Path, events, names, out: Path) -> dict:
    """Each sequence's `sequence_episode_scores` in one mode, its masks written under `out`."""
    from autosam2.data.sources import read_sequences
    from autosam2.eval.episodes import sequence_episode_scores
    from autosam2.eval.inference import infer_sequences
    from autosam2.eval.report import PredictionWriter
    from autosam2.progress import Progress

    sequences = read_sequences(root, args.split, 0, 1, layout="polyp_gen")
    with Progress(len(names), f"bench memory-learning ({args.mode})", "sequence") as bar:
        infer_sequences(
            model,
            sequences,
            device,
            args.mode,
            args.encode_batch,
            sink=PredictionWriter(out, overlays=False),
            on_sequence=lambda video: bar.update(note=video.video_id),
        )
    return sequence_episode_scores(events, root / args.split / "masks", out / "masks", names)


def _check_args(args: argparse.Namespace) -> None:
    if args.data is None and args.sequences < args.min_sequences:
        raise ConfigError(
            f"--sequences {args.sequences}: fewer than --min-sequences {args.min_sequences} "
            "(more sequences, or lower --min-sequences)"
        )
    if args.data is None:
        _spec(args)
    if not Path(args.weights).exists():
        raise ConfigError(f"--weights {args.weights}: no such file")
    if not Path(args.weights).is_file():
        raise ConfigError(f"--weights {args.weights}: not a file")


def run(args: argparse.Namespace) -> dict[str, Any]:
    from autosam2.config import TrainConfig
    from autosam2.engine.dist import configure_backends, configure_threads
    from autosam2.eval.episodes import GROUPS
    from autosam2.model.weights import load_trained_model

    _check_args(args)
    device = torch.device(args.device)
    configure_backends(TrainConfig().cudnn_benchmark, TrainConfig().tf32)
    configure_threads()  # as `autosam2 evaluate`: SLURM's --cpus-per-task, OMP_NUM_THREADS, or the cores
    tmp = Path(tempfile.mkdtemp(prefix="autosam2-bench-memory-learning-"))
    seconds: dict[str, float] = {}
    try:
        start = time.perf_counter()
        root = Path(args.data) if args.data else _split_made(args, tmp)
        events, names, counts = checked_split(args, root)
        seconds["data"] = time.perf_counter() - start
        model, _ = load_trained_model(args.weights, args.checkpoint, device)
        scores = {}
        for mode in MODES:
            start = time.perf_counter()
            mode_args = argparse.Namespace(**{**vars(args), "mode": mode})
            scores[mode] = _scores_of_mode(mode_args, model, device, root, events, names, tmp / mode)
            seconds[mode] = time.perf_counter() - start
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    groups = group_intervals(scores, GROUPS, args.bootstrap, args.seed)
    print_table(groups, file=sys.stderr)
    return _figures(args, root, names, counts, groups, seconds)


def _figures(args, root: Path, names, counts, groups, seconds) -> dict[str, Any]:
    return {
        "bench": "memory-learning",
        "groups": groups,
        "data": {
            "root": str(args.data) if args.data else None,  # None: made for the run, removed after
            "split": args.split,
            "sequences": len(names),
            "frames": counts["all"],
            "hidden_frames": counts["hidden"],
            "made": None
            if args.data
            else {
                "sequences": args.sequences,
                "frames": args.frames,
                "size": args.size,
                "seed": args.seed,
                "hard": True,
            },
        },
        "bootstrap": {
            "resamples": args.bootstrap,
            "seed": args.seed,
            "level": LEVEL,
            "unit": "sequence",
            "figure": "frame-weighted mean over the resampled sequences' frames of the group",
            "interval": "percentile",
        },
        "weights": str(args.weights),
        "seconds": {k: round(v, 1) for k, v in seconds.items()},
        "device": args.device,
        "encode_batch": args.encode_batch,
        "torch_threads": torch.get_num_threads(),
    }


def _cell(figure: dict | None, sign: str = "") -> str:
    if figure is None:
        return "-"
    lo, hi = figure["ci"]
    return f"{figure['value']:{sign}.3f} [{lo:{sign}.3f}, {hi:{sign}.3f}]"


def print_table(groups: dict[str, dict[str, Any]], file=None) -> None:
    """The figures as a table: per group its frames, Dice per mode and the difference, each with its
    interval, and presence accuracy per mode."""
    print(
        f"{'group':<14} {'frames':>6}  {'video dice [95% CI]':<22} {'frame dice [95% CI]':<22} "
        f"{'video - frame [95% CI]':<22} presence acc. video / frame",
        file=file,
    )
    for group, g in groups.items():
        dice, presence = g["dice"] or {}, g["presence_accuracy"]
        cells = [
            _cell(dice.get("video")),
            _cell(dice.get("frame")),
            _cell(dice.get("video_minus_frame"), "+"),
        ]
        acc = (
            "-"
            if presence is None
            else f"{presence['video']['value']:.3f} / {presence['frame']['value']:.3f}"
        )
        print(f"{group:<14} {g['frames']:6d}  {cells[0]:<22} {cells[1]:<22} {cells[2]:<22} {acc}", file=file)
