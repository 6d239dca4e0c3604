"""`autosam2 evaluate`: streaming inference over a split, metrics, masks and overlays, logged to MLflow.

Composes the evaluation library (`autosam2.eval`): the trained model rebuilt from its weights file, every
sequence of `--data` (shards or a polyp_gen root) run through it, predicted masks in the polyp_gen layout,
8-bit soft maps beside them (``soft/``, re-scorable by `autosam2 score` or the official toolbox), overlays, ``metrics.json`` / ``metrics.csv`` and a table. The output folder appears only when complete.
Under torchrun or srun the ranks split the sequences and rank 0 gathers the metrics once.
"""

from __future__ import annotations

import argparse
from contextlib import nullcontext
from pathlib import Path

from autosam2.arguments import positive_int
from autosam2.config import ClipMode, ConfigError, Dataset, TrainConfig
from autosam2.metrics import DICE_RULES, MODES

EPILOG = (
    """\
--metric-mode ours (default) scores every frame by our rules, as training's validation does (its
valid/dice is this eval/dice); --metric-mode sunseg reports the SUN-SEG toolbox's 17 figures under its
names (as `autosam2 score` does), dropping each sequence's first and last frame: a sequence left with
none is named in a warning and in metrics.json ("left_out"). A figure left undefined is null in
metrics.json, with the reason ("undefined").

"""
    + DICE_RULES
)


def add_model_arguments(parser: argparse.ArgumentParser, output_dir: str) -> None:
    """What `evaluate` and `predict` share: the trained model, how it runs, and the output folder."""
    parser.add_argument(
        "--checkpoint",
        default=None,
        help="the SAM2 checkpoint the weights were trained from (omit for random-init runs)",
    )
    parser.add_argument(
        "--weights", required=True, help="weights file written by `autosam2 train` (final.pt / best.pt)"
    )
    parser.add_argument("--output-dir", default=output_dir)
    parser.add_argument(
        "--mode",
        default="video",
        choices=[m.value for m in ClipMode],
        help="video: SAM2 memory; frame: every frame alone",
    )
    parser.add_argument(
        "--batch-size", type=positive_int, default=8, help="frames encoded together by the image encoder"
    )
    parser.add_argument("--gpu", type=int, default=None)
    parser.add_argument("--cpu", action="store_true")
    parser.add_argument(
        "--compile", action="store_true", help="torch.compile the image encoder (falls back to eager)"
    )
    parser.add_argument("--overwrite", action="store_true")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="autosam2 evaluate",
        description="streaming inference + metrics over a valid split",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_model_arguments(parser, "results")
    parser.add_argument("--dataset", default="polyp_gen", choices=[d.value for d in Dataset])
    parser.add_argument("--data", default="demo/shards/valid", help="a shard set or a polyp_gen root")
    parser.add_argument(
        "--split", default="valid", choices=["train", "valid"], help="split, when --data is a polyp_gen root"
    )
    parser.add_argument("--metric-mode", default="ours", choices=list(MODES))
    parser.add_argument(
        "--decode-device",
        default="auto",
        choices=["auto", "cpu", "cuda"],
        help="where a polyp_gen root's JPEG frames are decoded (auto: on the GPU when evaluating on one)",
    )
    parser.add_argument(
        "--episodes",
        default=None,
        metavar="ROOT",
        help="a synthetic polyp_gen root (`autosam2 synth`, the set --data was sharded from): Dice and "
        "presence accuracy per kind of frame (hidden by haze, blur, glare, low contrast; occluded; "
        "polyp-free; clear) from its synth.json, in metrics.json and MLflow",
    )
    parser.add_argument("--no-overlays", action="store_true")
    parser.add_argument(
        "--tracking-uri", default=None, help="MLflow URI (default: SQLite in the output directory)"
    )
    parser.add_argument("--experiment", default="autosam2")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    from autosam2.engine.dist import distributed

    request = "cpu" if args.cpu else ("auto" if args.gpu is None else f"cuda:{args.gpu}")
    with distributed(request, TrainConfig.dist_timeout_s) as info:
        return _evaluate(args, info)


def _evaluate(args: argparse.Namespace, info) -> int:
    """Every rank runs its share of the sequences and writes their masks and overlays into the one
    output folder (on a shared file system across hosts); rank 0 gathers the metrics, writes the
    summary, renames the folder into place and logs the run."""
    from autosam2.data.sources import read_sequences
    from autosam2.engine.dist import (
        announce_ranks,
        broadcast_object,
        configure_backends,
        configure_threads,
        gather_objects,
    )
    from autosam2.errors import DatasetError
    from autosam2.eval.episodes import episode_scores, print_episodes, read_events
    from autosam2.eval.inference import evaluate_sequences
    from autosam2.eval.report import PredictionWriter, print_table, say_left_out, scored_line, write_metrics
    from autosam2.metrics import REPORTED, TOOLBOX_METRICS, MetricAccumulator
    from autosam2.model.weights import load_trained_model
    from autosam2.outputs import EVALUATION, claim, output_directory
    from autosam2.progress import Progress

    device = info.device
    inputs = [args.data, args.weights, args.checkpoint, args.episodes]
    out = claim(args.output_dir, EVALUATION, args.overwrite, inputs)  # every rank says it, not rank 0 alone
    announce_ranks(info)
    if args.decode_device == "cuda" and device.type != "cuda":
        raise ConfigError(
            "--decode-device cuda needs a GPU to evaluate on (drop --cpu, or decode on the cpu)"
        )
    decode = {"auto": device if device.type == "cuda" else None, "cpu": None, "cuda": device}
    configure_backends(TrainConfig.cudnn_benchmark, TrainConfig.tf32)
    configure_threads()  # the training rule: SLURM's --cpus-per-task, OMP_NUM_THREADS, or the cores
    events = read_events(args.episodes) if args.episodes else None  # a bad root fails before the work
    model, _ = load_trained_model(args.weights, args.checkpoint, device, compile=args.compile)
    writing = output_directory(out, EVALUATION, args.overwrite, inputs)
    with writing if info.is_main else nullcontext() as tmp:
        tmp = Path(broadcast_object(str(tmp) if info.is_main else None))
        sequences = read_sequences(
            args.data, args.split, info.rank, info.world_size, decode_device=decode[args.decode_device]
        )
        with Progress(len(sequences), "evaluate", "sequence", enabled=info.is_main) as bar:
            mine = evaluate_sequences(
                model,
                sequences,
                device,
                args.mode,
                args.metric_mode,
                args.batch_size,
                sink=PredictionWriter(tmp, overlays=not args.no_overlays),
                on_sequence=lambda video: bar.update(note=video.video_id),
            )
        metrics = MetricAccumulator(mode=args.metric_mode)
        for part in gather_objects(mine):  # also the point where every rank's files are written
            metrics.merge(part)
        per_sequence, left_out = metrics.per_sequence(), metrics.left_out()
        if not per_sequence:
            raise DatasetError(_nothing_evaluated(args, left_out))
        summary = metrics.summary()
        extra = {**_described(args), "ranks": info.world_size, "frames": metrics.frame_counts()}
        extra["left_out"] = left_out
        if info.is_main and events is not None:
            gt = Path(args.episodes) / args.split / "masks"
            extra["episodes"] = episode_scores(events, gt, tmp / "masks", sorted(per_sequence))
        if info.is_main:
            write_metrics(tmp, per_sequence, summary, extra, REPORTED[args.metric_mode])
    if not info.is_main:
        return 0
    say_left_out(left_out)
    print_table(per_sequence, summary, ("dice", "iou") if args.metric_mode == "ours" else TOOLBOX_METRICS)
    kinds = {}
    if "episodes" in extra:
        print_episodes(extra["episodes"])
        kinds = {
            f"{figure}_{group}": score[figure]
            for group, score in extra["episodes"].items()
            for figure in ("dice", "presence_accuracy")
            if score["frames"]
        }
    _log(args, out, {**summary, **kinds}, info.world_size)
    print(
        f"wrote {out}: masks/, soft/, {'overlays/, ' if not args.no_overlays else ''}metrics.json, metrics.csv "
        f"({scored_line(metrics.frame_counts(), left_out, f'over {info.world_size} rank(s)')})"
    )
    return 0


def _nothing_evaluated(args: argparse.Namespace, left_out: dict[str, str]) -> str:
    """The error when no sequence has a frame to score, saying why."""
    if left_out:
        return (
            f"{args.data}: every sequence is too short for the sunseg mode's drop of its first and last "
            f"frame ({len(left_out)} of {len(left_out)}); --metric-mode ours scores every frame"
        )
    return f"{args.data}: no sequences to evaluate"


def _described(args: argparse.Namespace) -> dict[str, str]:
    """What was evaluated, as metrics.json and the MLflow run record it."""
    return {
        "weights": str(args.weights),
        "data": str(args.data),
        "mode": args.mode,
        "metric_mode": args.metric_mode,
    }


def _log(args: argparse.Namespace, out: Path, summary: dict[str, float], ranks: int) -> None:
    """The evaluation as its own MLflow run: what was evaluated, the summary as ``eval/...``, the files."""
    from autosam2.tracking import default_tracking_uri, make_logger, take_uri_credentials

    uri = take_uri_credentials(args.tracking_uri) or default_tracking_uri(out.resolve())
    logger = make_logger(
        0,
        True,
        uri,
        args.experiment,
        run_name=f"evaluate-{Path(args.weights).stem}-{args.mode}",
        system_metrics=False,
    )
    try:
        logger.log_params({**_described(args), "checkpoint": str(args.checkpoint), "ranks": ranks})
        logger.log_metrics({f"eval/{k}": v for k, v in summary.items()}, step=0)
        for name in ("metrics.json", "metrics.csv"):
            logger.log_artifact(out / name)
        if (out / "overlays").is_dir():
            logger.log_artifact(out / "overlays")
    finally:
        logger.close()
