"""Scores per kind of frame on a synthetic set: Dice and presence accuracy where the polyp is hidden by
haze, blur, glare or fading, gone from the frame (an instrument over it, a dropped or a flash frame),
partly covered, out of view, or clear.

The kinds come from the per-frame `events` that `autosam2 synth` writes into ``synth.json``
(`autosam2.data.synthetic.frame_kind`). Per frame, Dice follows our headline rule (both masks empty = 1,
`autosam2.metrics`), and presence is right when the prediction is non-empty exactly where the ground
truth is; each figure is the mean over the frames of that kind (frames, not sequences: an episode is a
handful of frames of a sequence). ``hidden`` pools every kind that hides a present polyp (HIDING and
BLIND), ``blind`` the kinds that leave no trace of it in the frame (BLIND).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from autosam2.data.codec import MASK_THRESHOLD
from autosam2.data.synthetic import BLIND, FRAME_KINDS, HIDING, frame_kind
from autosam2.errors import DatasetError
from autosam2.metrics import frame_metrics

GROUPS = (*FRAME_KINDS, "hidden", "blind", "all")


def read_events(root: str | Path) -> dict[str, list[dict]]:
    """Per sequence, the per-frame events of a synthetic polyp_gen root (its ``synth.json``)."""
    path = Path(root) / "synth.json"
    try:
        return json.loads(path.read_text())["events"]
    except (OSError, ValueError, KeyError) as err:
        raise DatasetError(f"{path}: no per-frame events of `autosam2 synth` to read ({err})") from err


def _mask(path: Path, threshold: int) -> np.ndarray:
    try:
        return np.asarray(Image.open(path).convert("L")) > threshold
    except OSError as err:
        raise DatasetError(f"{path}: cannot read the mask ({err})") from err


def groups_of(event: dict) -> list[str]:
    """The groups of GROUPS a frame counts in, from its `events` record: its kind, "all", "hidden" for a
    kind of HIDING or BLIND, and "blind" for one of BLIND."""
    kind = frame_kind(event)
    return [
        kind,
        "all",
        *(["hidden"] if kind in (*HIDING, *BLIND) else []),
        *(["blind"] if kind in BLIND else []),
    ]


def _frame_scores(
    events: dict[str, list[dict]], gt_masks: str | Path, pred_masks: str | Path, seq: str
) -> tuple[dict[str, list[float]], dict[str, list[bool]]]:
    """One sequence's per-frame Dice and presence (right or not), per group of GROUPS."""
    if seq not in events:
        raise DatasetError(f"{seq}: no events for this sequence in the synthetic set's synth.json")
    dice: dict[str, list[float]] = {g: [] for g in GROUPS}
    right: dict[str, list[bool]] = {g: [] for g in GROUPS}
    for i, event in enumerate(events[seq]):
        gt = _mask(Path(gt_masks) / seq / f"frame{i + 1}.jpg", MASK_THRESHOLD)
        pred = _mask(Path(pred_masks) / seq / f"frame{i + 1}.png", 0)
        for group in groups_of(event):
            dice[group].append(frame_metrics(pred.astype(np.float32), gt)["dice"])
            right[group].append(bool(pred.any()) == bool(gt.any()))
    return dice, right


def _pooled(dice: dict[str, list[float]], right: dict[str, list[bool]]) -> dict[str, dict[str, float | None]]:
    """Per group: frames, mean Dice and presence accuracy over them (None for a group without frames)."""
    return {
        g: {
            "frames": len(dice[g]),
            "dice": float(np.mean(dice[g])) if dice[g] else None,
            "presence_accuracy": float(np.mean(right[g])) if right[g] else None,
        }
        for g in GROUPS
    }


def episode_scores(
    events: dict[str, list[dict]], gt_masks: str | Path, pred_masks: str | Path, sequences: list[str]
) -> dict[str, dict[str, float | None]]:
    """Per group of GROUPS: frames, mean Dice and presence accuracy (None for a group without frames),
    scoring ``pred_masks/<seq>/frameN.png`` (0 background) against ``gt_masks/<seq>/frameN.jpg``."""
    dice: dict[str, list[float]] = {g: [] for g in GROUPS}
    right: dict[str, list[bool]] = {g: [] for g in GROUPS}
    for seq in sequences:
        seq_dice, seq_right = _frame_scores(events, gt_masks, pred_masks, seq)
        for g in GROUPS:
            dice[g] += seq_dice[g]
            right[g] += seq_right[g]
    return _pooled(dice, right)


def sequence_episode_scores(
    events: dict[str, list[dict]], gt_masks: str | Path, pred_masks: str | Path, sequences: list[str]
) -> dict[str, dict[str, dict[str, float | None]]]:
    """`episode_scores` of each sequence alone, by sequence name: what an estimate over sequences
    (a bootstrap resampling them) pools, weighting each sequence's mean by its frames of the group."""
    return {seq: _pooled(*_frame_scores(events, gt_masks, pred_masks, seq)) for seq in sequences}


def print_episodes(scores: dict[str, dict[str, float | None]]) -> None:
    """The scores as a table, one line per kind that has frames."""
    print(f"{'frames':<14} {'count':>5} {'dice':>6} {'presence acc.':>13}")
    for group, score in scores.items():
        if score["frames"]:
            print(f"{group:<14} {score['frames']:5d} {score['dice']:6.3f} {score['presence_accuracy']:13.3f}")
