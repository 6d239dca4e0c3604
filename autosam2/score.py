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

from autosam2.arguments import add_layout, add_output_dir, add_split, add_tracking, add_workers
from autosam2.eval.benchmark import add_splits
from autosam2.metrics import DICE_RULES, MODES, REPORTED

# the commands whose progress.json records the weights that made their predictions (autosam2.eval.resume)
RECORDED_BY = ("predict", "evaluate")

if TYPE_CHECKING:
    from autosam2.eval.benchmark import SplitResult
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

SUN-SEG benchmark: --gt a SUN-SEG root (<split>/GT/<case>/<frame>.png), no --split, and --pred a
method's folder in the toolbox's prediction layout (Pred/<method>/<split>/<case>/<frame>.png): every
test split (--splits: some of them) is scored, each case's frames in the toolbox's order, into
OUTPUT_DIR/<split with / as _>/, and OUTPUT_DIR/benchmark.json, benchmark.csv and the printed table set
the method (named by its folder) beside the published methods, as `autosam2 benchmark sunseg` does.
"""
    + DICE_RULES
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="autosam2 score",
        description="score saved masks of any method against ground-truth masks",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
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
    add_splits(p)
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
    add_tracking(p, "with --mlflow: ")
    p.add_argument(
        "--run-name",
        default=None,
        help="with --mlflow (default: score-<pred folder>; for our own predictions "
        "score-<split>-<weights stem>-<pred folder>, docs/tracking.md)",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    benchmark = _benchmark_mode(parser, args)

    from autosam2.eval.report import log_scores, print_table, scored_line
    from autosam2.outputs import BENCHMARK, SCORES, claim, output_directory

    if benchmark:
        claim(args.output_dir, BENCHMARK, args.overwrite, [args.pred, args.gt])
        return _score_benchmark(args)
    out = claim(args.output_dir, SCORES, args.overwrite, [args.pred, args.gt])
    pairing = _pair(args, args.pred, args.gt, _truth(args))
    with output_directory(out, SCORES, args.overwrite, [args.pred, args.gt]) as tmp:
        result = _score(args, pairing, args.pred, args.gt, tmp, args.split)
    print_table(result.per_sequence, result.summary, REPORTED[args.metric_mode])
    if args.mlflow:
        store, link, weights = _tracking(args, out)
        params = {"pred": str(args.pred), "gt": str(args.gt), "metric_mode": args.metric_mode}
        log_scores(
            out, store, _run_name(args, weights), {**params, **_weights(weights)}, result.summary, link
        )
    print(f"wrote {out}: metrics.json, metrics.csv ({scored_line(result.extra['frames'], pairing.left_out)})")
    return 0


def _tracking(args: argparse.Namespace, out: Path):
    """The MLflow store of --mlflow, the tags linking its runs, and the weights that made --pred
    (`made_with`): predictions of our weights go where the run that trained them logged, tagged with it
    and nested under it (`autosam2.tracking.scoring_store`); others by the flags, MLflow's variables,
    else mlflow.db beside the output folder, unlinked."""
    from autosam2.tracking import choose_store, scoring_store

    weights = made_with(args.pred)
    if weights is None:
        return choose_store(args.tracking_uri, args.experiment, out), {}, None
    store, link = scoring_store(args.tracking_uri, args.experiment, out, weights)
    return store, link, weights


def _run_name(args: argparse.Namespace, weights: Path | None) -> str:
    """--run-name, else ``score-<pred folder>``, with the split and the weights' name before the folder
    for predictions of our weights (``score-valid-final-soft``)."""
    from autosam2.tracking import scoring_run_name

    pred = Path(args.pred).resolve().name
    if args.run_name:
        return args.run_name
    if weights is None:
        return f"score-{pred}"
    return f"{scoring_run_name('score', args.split, None, weights)}-{pred}"


def _weights(weights: Path | None) -> dict[str, str]:
    """The MLflow param naming the weights that made the predictions, where they are known."""
    return {} if weights is None else {"weights": str(weights)}


def made_with(pred: str | Path) -> Path | None:
    """The weights file that made the predictions in `pred`, as the output folder of our `predict`,
    `evaluate` or `benchmark` records it: ``progress.json``'s inputs, or an evaluation's ``metrics.json``
    (all a benchmark's split folder keeps), in `pred` itself or in its parent (the folder of ``masks/``
    and ``soft/``). None for predictions with no such record; a ``progress.json`` that names no weights
    (damaged, edited) is said in one note."""
    from autosam2.outputs import PROGRESS, json_object

    here = Path(pred).resolve()
    for folder in dict.fromkeys((here, here.parent)):
        progress, metrics = json_object(folder / PROGRESS), json_object(folder / "metrics.json")
        if progress.get("command") in RECORDED_BY:
            weights = _text(progress, "inputs", "weights", "path")
        else:
            weights = _text(metrics, "weights") if "summary" in metrics else None
        if weights is not None:
            return Path(weights)
        if (folder / PROGRESS).is_file() and (not progress or progress.get("command") in RECORDED_BY):
            print(
                f"note: {folder / PROGRESS}: names no weights file (inputs.weights.path); the MLflow "
                "run is linked to no training run",
                file=sys.stderr,
                flush=True,
            )
    return None


def _text(record: dict, *keys: str) -> str | None:
    """The non-empty string at `keys` in nested JSON objects; None where there is none."""
    value: object = record
    for key in keys:
        value = value.get(key) if isinstance(value, dict) else None
    return value if isinstance(value, str) and value else None


def _benchmark_mode(parser: argparse.ArgumentParser, args: argparse.Namespace) -> bool:
    """Whether to score SUN-SEG's test splits and write the benchmark table: --gt is a SUN-SEG root (named
    by --layout sunseg, or told by its folders), no single --split is named, and --pred is in the
    toolbox's prediction layout (``<method>/<split>/<case>/``) or --splits names the splits."""
    from autosam2.data.layouts import detect
    from autosam2.data.layouts.sunseg import TESTS
    from autosam2.errors import DatasetError

    if args.splits and args.split:
        parser.error("--splits (several SUN-SEG test splits) and --split (one split): name one of them")
    sunseg = args.layout == "sunseg"
    if args.layout == "auto" and not args.split:
        try:
            sunseg = detect(args.gt) == "sunseg"
        except DatasetError:
            sunseg = False
    by_split = any((Path(args.pred) / split).is_dir() for split in TESTS)
    if args.splits and not sunseg:
        parser.error("--splits is for --layout sunseg (a SUN-SEG root's test splits)")
    benchmark = sunseg and not args.split and (by_split or bool(args.splits))
    if benchmark and args.metric_mode != "sunseg":
        parser.error("--layout sunseg scores by the toolbox's protocol: --metric-mode sunseg only")
    return benchmark


def _pair(args: argparse.Namespace, pred: Path | str, gt: Path | str, truth=None) -> Pairing:
    """The frames of `pred` and `gt` paired; missing and extra files an error (every one listed) or, with
    --on-missing skip, a warning each; an error when no sequence is left to score."""
    from autosam2.errors import DatasetError
    from autosam2.eval.report import listed, say_left_out
    from autosam2.eval.score import pair_frames

    pairing = pair_frames(pred, gt, args.metric_mode == "sunseg" and not args.keep_first_last, truth)
    if pairing.missing and args.on_missing == "error":
        raise DatasetError(
            "\n".join(listed(pairing.missing))
            + f"\n{len(pairing.missing)} missing or extra file(s); --on-missing skip scores the frames that pair"
        )
    for line in listed(pairing.missing):
        print(f"warning: skipped: {line}", file=sys.stderr, flush=True)
    say_left_out(pairing.too_short)  # a missing file is said above
    if not pairing.sequences:
        raise DatasetError(_nothing_to_score(pred, gt, pairing))
    return pairing


def _score(
    args: argparse.Namespace, pairing: Pairing, pred, gt, tmp: Path, split: str | None = None
) -> SplitResult:
    """The paired frames scored; metrics.json and metrics.csv written into `tmp` (`split`: the split
    they are, recorded in metrics.json)."""
    from autosam2.eval.benchmark import SplitResult
    from autosam2.eval.report import write_metrics
    from autosam2.eval.score import score_all
    from autosam2.progress import track

    def progress(items, total):
        return track(items, total, "score", "sequence")

    metrics = score_all(pairing.sequences, args.metric_mode, args.workers, progress)
    per_sequence, summary = metrics.per_sequence(), metrics.summary()
    drop = args.metric_mode == "sunseg" and not args.keep_first_last
    described = {**_described(args, pred, gt, drop, metrics.frame_counts()), "left_out": pairing.left_out}
    if split is not None:
        described["split"] = split
    write_metrics(tmp, per_sequence, summary, described, list(REPORTED[args.metric_mode]))
    return SplitResult(split or str(gt), per_sequence, summary, described)


def _score_benchmark(args: argparse.Namespace) -> int:
    """--layout sunseg: every test split of a prediction folder in the toolbox's layout scored (all
    paired first, so a missing split or file stops before anything is written), a folder per split,
    and the benchmark table beside the published methods."""
    from autosam2.eval.benchmark import log_splits, print_benchmark, split_folder, write_benchmark
    from autosam2.eval.report import scored_line
    from autosam2.eval.score import layout_truth
    from autosam2.outputs import BENCHMARK, output_directory

    pred, gt, method = Path(args.pred), Path(args.gt), Path(args.pred).resolve().name
    splits = _benchmark_splits(args)
    pairings = {s: _pair(args, pred / s, gt, layout_truth(gt, "sunseg", s)) for s in splits}
    results = []
    with output_directory(args.output_dir, BENCHMARK, args.overwrite, [args.pred, args.gt]) as tmp:
        for split, pairing in pairings.items():
            folder = tmp / split_folder(split)
            folder.mkdir()
            results.append(_score(args, pairing, pred / split, gt / split, folder, split))
        described = {"pred": str(args.pred), "gt": str(args.gt), "metric_mode": args.metric_mode}
        described["first_last_dropped"] = not args.keep_first_last
        rows = write_benchmark(tmp, "sunseg", method, results, described)
    out = Path(args.output_dir)
    print_benchmark(rows, "sunseg")
    if args.mlflow:
        store, link, weights = _tracking(args, out)
        name = _run_name(args, weights)
        params = {**described, **_weights(weights)}
        log_splits(out, store, lambda split: f"{name}-{split}", results, params, link)
    for result in results:
        line = scored_line(result.extra["frames"], result.extra["left_out"])
        print(f"wrote {out / split_folder(result.split)}: metrics.json, metrics.csv ({line})")
    print(f"wrote {out}: benchmark.json, benchmark.csv ({len(rows)} rows)")
    return 0


def _benchmark_splits(args: argparse.Namespace) -> list[str]:
    """The splits to score (--splits, default every test split); one DatasetError naming every split
    folder missing from --pred or --gt."""
    from autosam2.data.layouts.sunseg import TESTS
    from autosam2.errors import DatasetError

    splits = args.splits or list(TESTS)
    missing = [
        f"{args.gt}: no {split}/GT folder (a SUN-SEG root holds {split}/GT/<case>/<frame>.png)"
        for split in splits
        if not (Path(args.gt) / split / "GT").is_dir()
    ]
    missing += [
        f"{args.pred}: no {split} folder (the toolbox's prediction layout: <method>/{split}/<case>/<frame>.png)"
        for split in splits
        if not (Path(args.pred) / split).is_dir()
    ]
    if missing:
        raise DatasetError("\n".join(missing))
    return splits


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


def _nothing_to_score(pred: Path | str, gt: Path | str, pairing: Pairing) -> str:
    """The error when no sequence has a frame to score, saying why."""
    from autosam2.eval.report import listed

    if pairing.too_short and not pairing.unpaired:
        return (
            f"{gt}: every sequence is too short for the sunseg mode's drop of its first and last "
            f"frame ({len(pairing.too_short)} of {len(pairing.too_short)}); --keep-first-last scores them"
        )
    reasons = "; ".join(listed([f"{n}: {why}" for n, why in pairing.left_out.items()]))
    return f"{pred}: no frame pairs with the ground truth in {gt} ({reasons})"


def _described(args: argparse.Namespace, pred, gt, dropped: bool, counts: dict[str, int]) -> dict:
    described = {
        "pred": str(pred),
        "gt": str(gt),
        "metric_mode": args.metric_mode,
        "first_last_dropped": dropped,
        "frames": counts,
    }
    if args.split:  # --gt read as a dataset folder (`_truth`)
        described.update(layout=str(args.layout), split=args.split)
    return described
