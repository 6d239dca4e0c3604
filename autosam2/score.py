"""`autosam2 score`: any method's saved masks against ground truth, with the SUN-SEG/VPS toolbox's figures.

Composes the scoring library (`autosam2.eval.score`): frames paired by name, read and resized as the
toolbox does, scored by the one accumulator; ``metrics.json`` (``"summary"`` under the toolbox's names),
``metrics.csv`` and a table; optionally an MLflow run, beside our own evaluations.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from autosam2.arguments import add_layout, add_output_dir, add_split, add_workers
from autosam2.metrics import DICE_RULES, MODES, REPORTED

if TYPE_CHECKING:
    from autosam2.eval.score import Pairing

EPILOG = (
    """\
Layout: <root>/<sequence>/<frame>.png|jpg for --pred and --gt (a polyp_gen masks folder, the toolbox's
Pred/<method>/<dataset>, or a dataset folder holding GT/). Frames pair by file stem in natural order.
A --gt that is a dataset folder in a known layout (told by its folders, or named by --layout; see
docs/data.md) is read as that layout reads it: the masks of --split (default: its valid split) in the
layout's frame order (SUN-SEG: GT/<case>/<stem>.png in the official evaluator's order).
Masks are foreground above 128 (0..255); predictions are 8-bit soft maps or binary masks.

--metric-mode sunseg (default) is the SUN-SEG/VPS toolbox (eval/vps_evaluator.py): it drops the first and
the last frame of every sequence (--keep-first-last scores them too), stretches each map to [0, 1],
resizes predictions to the ground truth's size, and reports Smeasure wFmeasure MAE adpEm meanEm maxEm
adpFm meanFm maxFm meanSen maxSen meanSpe maxSpe meanDice maxDice meanIoU maxIoU: frames averaged per
sequence, sequences averaged, then threshold curves reduced by mean or max (not rounded).
--metric-mode ours: our headline rules (see autosam2.metrics), every frame, our metric names.

A sequence with no frame left after the drop is named in a warning and left out (metrics.json
"left_out"); a figure the toolbox leaves undefined (meanSpe, maxSpe of a frame with no background) is
null in metrics.json, "nan" in metrics.csv and "-" in the table, with the reason ("undefined").
Missing, extra, unreadable or 0/1 label-map files are named one a line, up to 20, then "and N more".

"""
    + DICE_RULES
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="autosam2 score",
        description="score saved masks of any method against ground-truth masks",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--pred", required=True, help="predictions: <pred>/<sequence>/<frame>.png|jpg")
    p.add_argument(
        "--gt",
        required=True,
        help="ground truth: <gt>/<sequence>/<frame>.png|jpg (or <gt>/GT/...), or a dataset folder",
    )
    add_layout(p, help="--gt as a dataset folder in this layout (default auto: when its folders tell one)")
    add_split(p, what="score against", default_text="its valid split")
    p.add_argument("--metric-mode", default="sunseg", choices=list(MODES))
    add_output_dir(p, default="scores", help="metrics.json, metrics.csv (default: scores)")
    p.add_argument(
        "--on-missing",
        default="error",
        choices=["error", "skip"],
        help="a missing or extra prediction: stop with every one listed, or say each and score the rest",
    )
    p.add_argument(
        "--keep-first-last", action="store_true", help="sunseg: score the first and last frames too"
    )
    add_workers(p, "reading and scoring")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--mlflow", action="store_true", help="log the scores as an MLflow run")
    p.add_argument(
        "--tracking-uri", default=None, help="with --mlflow (default: SQLite in the output directory)"
    )
    p.add_argument("--experiment", default="autosam2")
    p.add_argument("--run-name", default=None, help="with --mlflow (default: score-<pred folder>)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    from autosam2.errors import DatasetError
    from autosam2.eval.report import listed, log_scores, print_table, say_left_out, scored_line, write_metrics
    from autosam2.eval.score import pair_frames, score_all
    from autosam2.outputs import SCORES, claim, output_directory
    from autosam2.progress import track

    out = claim(args.output_dir, SCORES, args.overwrite, [args.pred, args.gt])
    sunseg = args.metric_mode == "sunseg"
    drop = sunseg and not args.keep_first_last
    pairing = pair_frames(args.pred, args.gt, drop, _truth(args))
    if pairing.missing and args.on_missing == "error":
        raise DatasetError(
            "\n".join(listed(pairing.missing))
            + f"\n{len(pairing.missing)} missing or extra file(s); --on-missing skip scores the frames that pair"
        )
    for line in listed(pairing.missing):
        print(f"warning: skipped: {line}", file=sys.stderr, flush=True)
    say_left_out(pairing.too_short)  # a missing file is said above
    if not pairing.sequences:
        raise DatasetError(_nothing_to_score(args, pairing))

    def progress(items, total):
        return track(items, total, "score", "sequence")

    with output_directory(out, SCORES, args.overwrite, [args.pred, args.gt]) as tmp:
        metrics = score_all(pairing.sequences, args.metric_mode, args.workers, progress)
        counts = metrics.frame_counts()
        per_sequence, summary = metrics.per_sequence(), metrics.summary()
        columns = list(REPORTED[args.metric_mode])
        described = {**_described(args, drop, counts), "left_out": pairing.left_out}
        write_metrics(tmp, per_sequence, summary, described, columns)
    print_table(per_sequence, summary, columns)
    if args.mlflow:
        name = args.run_name or f"score-{Path(args.pred).resolve().name}"
        params = {"pred": str(args.pred), "gt": str(args.gt), "metric_mode": args.metric_mode}
        log_scores(out, args.tracking_uri, args.experiment, name, params, summary)
    print(f"wrote {out}: metrics.json, metrics.csv ({scored_line(counts, pairing.left_out)})")
    return 0


def _truth(args: argparse.Namespace):
    """The ground truth of --gt as a dataset folder (its layout named, or told by its folders, or a
    --split named), or None for a ``<gt>/<sequence>/`` tree."""
    from autosam2.data.layouts import detect, reader, split_name
    from autosam2.errors import DatasetError
    from autosam2.eval.score import layout_truth

    if args.layout == "auto" and not args.split:
        try:
            args.layout = detect(args.gt)
        except DatasetError:
            return None
    args.layout = reader(args.gt, args.layout).layout
    args.split = split_name(args.gt, args.layout, args.split, "valid")
    return layout_truth(args.gt, args.layout, args.split)


def _nothing_to_score(args: argparse.Namespace, pairing: Pairing) -> str:
    """The error when no sequence has a frame to score, saying why."""
    from autosam2.eval.report import listed

    if pairing.too_short and not pairing.unpaired:
        return (
            f"{args.gt}: every sequence is too short for the sunseg mode's drop of its first and last "
            f"frame ({len(pairing.too_short)} of {len(pairing.too_short)}); --keep-first-last scores them"
        )
    reasons = "; ".join(listed([f"{n}: {why}" for n, why in pairing.left_out.items()]))
    return f"{args.pred}: no frame pairs with the ground truth in {args.gt} ({reasons})"


def _described(args: argparse.Namespace, dropped: bool, counts: dict[str, int]) -> dict:
    described = {
        "pred": str(args.pred),
        "gt": str(args.gt),
        "metric_mode": args.metric_mode,
        "first_last_dropped": dropped,
        "frames": counts,
    }
    if args.split:  # --gt read as a dataset folder (`_truth`)
        described.update(layout=str(args.layout), split=args.split)
    return described
