"""`autosam2 evaluate`: streaming inference over a split, metrics, masks and overlays, logged to MLflow.

Composes the evaluation library (`autosam2.eval`): the trained model rebuilt from its weights file, every
sequence of `--data` (shards, or a split of a dataset folder in any layout) run through it, predicted
masks as ``masks/<sequence>/<frame>.png``,
8-bit soft maps beside them (``soft/``, re-scorable by `autosam2 score` or the official toolbox), overlays, ``metrics.json`` / ``metrics.csv`` and a table. Each sequence is kept as it
ends, and a stopped run goes on with ``--resume`` (`autosam2.eval.resume`); ``metrics.json`` is written
only when every sequence is done. Under torchrun or srun the ranks split the sequences and rank 0
gathers the metrics once.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from autosam2.arguments import (
    add_device,
    add_encode_batch,
    add_layout,
    add_no_overlays,
    add_output_dir,
    add_split,
    add_tracking,
)
from autosam2.config import ClipMode, ConfigError, TrainConfig
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
    add_output_dir(parser, default=output_dir, help=f"the folder to write (default {output_dir})")
    parser.add_argument(
        "--mode",
        default="video",
        choices=[m.value for m in ClipMode],
        help="video: SAM2 memory; frame: every frame alone",
    )
    add_encode_batch(parser, "--batch-size")
    add_device(
        parser, "auto", gpu_help="run on GPU N (default: this rank's GPU if there is one, else the CPU)"
    )
    parser.add_argument(
        "--compile", action="store_true", help="torch.compile the image encoder (falls back to eager)"
    )
    parser.add_argument("--overwrite", action="store_true")


def model_inputs(args: argparse.Namespace) -> dict:
    """What a resumed `evaluate` or `predict` must find unchanged of `add_model_arguments`: the weights
    and checkpoint files, and the mode."""
    from autosam2.eval.resume import identity

    return {"weights": identity(args.weights), "checkpoint": identity(args.checkpoint), "mode": args.mode}


def add_resume(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--resume",
        action="store_true",
        help="go on with the unfinished run in --output-dir (same inputs), skipping its finished sequences",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="autosam2 evaluate",
        description="streaming inference + metrics over a valid split",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    add_model_arguments(parser, "results")
    add_resume(parser)
    add_layout(parser)
    parser.add_argument(
        "--data", default="demo/shards/valid", help="a shard set or a dataset folder (docs/data.md)"
    )
    add_split(parser, what="evaluate, when --data is a dataset folder", default_text="its valid split")
    parser.add_argument("--metric-mode", default="ours", choices=list(MODES))
    parser.add_argument(
        "--decode-device",
        default="auto",
        choices=["auto", "cpu", "cuda"],
        help="where a dataset folder's JPEG frames are decoded (auto: on the GPU when evaluating on one)",
    )
    parser.add_argument(
        "--episodes",
        default=None,
        metavar="ROOT",
        help="a synthetic polyp_gen root (`autosam2 synth`, the set --data was sharded from): Dice and "
        "presence accuracy per kind of frame (hidden by haze, blur, glare, low contrast; occluded; "
        "polyp-free; clear) from its synth.json, in metrics.json and MLflow",
    )
    add_no_overlays(parser)
    add_tracking(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    """0 when done; `EXIT_STOPPED` when a signal stopped it early (it goes on with --resume)."""
    from autosam2.engine.stop import settle

    try:
        return on_ranks(build_parser().parse_args(argv), _evaluate)
    finally:
        settle()  # how the run ended decides the status, not a signal while the process shuts down


def on_ranks(args: argparse.Namespace, work) -> int:
    """`work(args, info)` on this process's rank (alone, or one of torchrun's / srun's), the process
    group set up around it and taken down after."""
    from autosam2.engine.dist import distributed

    with distributed(args.device, TrainConfig().dist_timeout_s) as info:
        return work(args, info)


def _evaluate(args: argparse.Namespace, info) -> int:
    """Every rank runs its share of the sequences and writes their masks and overlays into the one
    output folder (on a shared file system across hosts), each sequence kept as it ends; rank 0
    gathers the metrics, writes the summary and logs the run."""
    from autosam2.engine.dist import announce_ranks
    from autosam2.engine.stop import EXIT_STOPPED

    resolve_folder(args)
    folder = claim_output(args)  # every rank says it, not rank 0 alone
    if folder.finished:
        if info.is_main:
            print(f"{folder.out}: the evaluation is complete; nothing to resume (--overwrite runs it again)")
        return 0
    announce_ranks(info)
    decode, events, model = set_up(args, info.device)
    with folder.writing(info.is_main):
        found = evaluate_into(args, info, model, decode, events, folder.out, folder)
        if found is None:
            return EXIT_STOPPED
        if info.is_main:
            _report(args, folder.out, *found)
            folder.finish(("metrics.json", "metrics.csv"))
    return 0


def claim_output(args: argparse.Namespace):
    """The output folder of `args` (resolved by `resolve_folder`), refused before any work in one line
    where this evaluation may not write or resume there (`claim_sequences`)."""
    from autosam2.data.sample_format import MANIFEST
    from autosam2.data.sources import is_shard_set
    from autosam2.eval.resume import claim_sequences, identity
    from autosam2.outputs import EVALUATION

    data = Path(args.data) / MANIFEST if is_shard_set(args.data) else args.data
    inputs = {
        **model_inputs(args),
        "data": identity(data),
        **{k: str(getattr(args, k)) for k in ("split", "layout", "metric_mode", "decode_device")},
        "overlays": not args.no_overlays,
    }
    paths = [args.data, args.weights, args.checkpoint, args.episodes]
    return claim_sequences(
        args.output_dir, EVALUATION, "evaluate", inputs, paths, args.overwrite, args.resume
    )


def evaluate_into(
    args: argparse.Namespace, info, model, decode, events, out: Path, folder=None
) -> tuple[dict, dict, dict] | None:
    """The split `args` name through the model, on every rank: masks, soft maps and overlays written
    into `out` (each rank its share), the metrics gathered and written there by rank 0 (metrics.json,
    metrics.csv); returns the figures per sequence, their summary and what metrics.json holds beside.
    With a `folder` (`SequenceFolder`), its finished sequences are skipped and read back, each new one
    is kept as it ends, and a stop signal ends the run early: None then."""
    from autosam2.eval.report import write_metrics
    from autosam2.metrics import REPORTED

    metrics = _run_sequences(args, info, model, decode, out, folder)
    if metrics is None:
        return None
    per_sequence, summary, extra = _summarise(args, info, metrics, events, out)
    if info.is_main:
        write_metrics(out, per_sequence, summary, extra, REPORTED[args.metric_mode])
    return per_sequence, summary, extra


def set_up(args: argparse.Namespace, device):
    """Before the work: where frames are decoded, the synthetic set's events (a bad root fails here),
    the backends and threads, and the trained model."""
    from autosam2.engine.dist import configure_backends, configure_threads
    from autosam2.eval.episodes import read_events
    from autosam2.model.weights import load_trained_model

    if args.decode_device == "cuda" and device.type != "cuda":
        raise ConfigError(
            "--decode-device cuda needs a GPU to evaluate on (drop --cpu, or decode on the cpu)"
        )
    decode = {"auto": device if device.type == "cuda" else None, "cpu": None, "cuda": device}
    defaults = TrainConfig()
    configure_backends(defaults.cudnn_benchmark, defaults.tf32)
    configure_threads()  # the training rule: SLURM's --cpus-per-task, OMP_NUM_THREADS, or the cores
    events = read_events(args.episodes) if args.episodes else None
    model, payload = load_trained_model(args.weights, args.checkpoint, device, compile=args.compile)
    args.step = payload["extra"].get("step")  # the training step of the weights: the MLflow run's name
    return decode[args.decode_device], events, model


def _run_sequences(args: argparse.Namespace, info, model, decode, out: Path, folder):
    """This rank's share of the sequences through the model, masks and overlays written into `out`
    (with a `folder`: the finished ones skipped, each new one kept as it ends); every rank's metrics
    gathered (also the point where every rank's files are written), None when a signal stopped it."""
    from autosam2.data.sources import read_sequences
    from autosam2.engine.dist import gather_objects
    from autosam2.eval.inference import infer_sequences
    from autosam2.eval.report import PredictionWriter
    from autosam2.metrics import MetricAccumulator
    from autosam2.progress import Progress

    sequences = read_sequences(
        args.data, args.split, info.rank, info.world_size, decode_device=decode, layout=args.layout
    )
    done = folder.done if folder else set()
    metrics, mine = MetricAccumulator(mode=args.metric_mode), {}

    def ended(video) -> None:  # on the writer thread, once the sequence's outputs are all written
        mine[video.video_id] = _record(metrics, video.video_id)
        if folder:
            folder.keep(video.video_id, mine[video.video_id])
        bar.update(note=video.video_id)

    todo = [name for name in sequences.names if name not in done]
    with Progress(len(todo), "evaluate", "sequence", enabled=info.is_main) as bar:
        infer_sequences(
            model,
            folder.todo(sequences) if folder else sequences,
            info.device,
            args.mode,
            args.encode_batch,
            sink=PredictionWriter(out, overlays=not args.no_overlays),
            accumulator=metrics,
            on_sequence=ended,
        )
    if folder is None:
        return _accumulated(args.metric_mode, gather_objects(mine))
    parts = folder.gather(mine, len(todo), info.is_main)
    return None if parts is None else _accumulated(args.metric_mode, parts)


def _record(metrics, name: str) -> dict:
    """What a finished sequence's record holds: its running sums (None for a sequence of no frame), and
    its figures for people to read."""
    if name not in metrics.frame_counts():
        return {"state": None}
    record = {"state": metrics.state(name)}
    alone = _accumulated(metrics.mode, [{name: record}])
    if name in alone.per_sequence():
        record["figures"] = alone.per_sequence()[name]
    return record


def _accumulated(mode: str, parts: list[dict]):
    """One accumulator of the sequences' records (`parts`: dicts of them by name, a rank's or an earlier
    run's): the same figures whichever run or rank finished a sequence."""
    from autosam2.metrics import MetricAccumulator

    metrics = MetricAccumulator(mode=mode)
    for records in parts:
        for name, record in records.items():
            if record["state"] is not None:
                metrics.add_state(name, record["state"])
    return metrics


def _summarise(args: argparse.Namespace, info, metrics, events, tmp: Path) -> tuple[dict, dict, dict]:
    """The figures per sequence, their summary and what metrics.json records beside them; an error when
    nothing was scored."""
    from autosam2.errors import DatasetError
    from autosam2.eval.episodes import episode_scores

    per_sequence, left_out = metrics.per_sequence(), metrics.left_out()
    if not per_sequence:
        raise DatasetError(_nothing_evaluated(args, left_out))
    summary = metrics.summary()
    extra = {**_described(args), "ranks": info.world_size, "frames": metrics.frame_counts()}
    extra["left_out"] = left_out
    if info.is_main and events is not None:
        gt = Path(args.episodes) / (args.split or "valid") / "masks"
        extra["episodes"] = episode_scores(events, gt, tmp / "masks", sorted(per_sequence))
    return per_sequence, summary, extra


def _report(args: argparse.Namespace, out: Path, per_sequence: dict, summary: dict, extra: dict) -> None:
    """Rank 0's account: the tables, the MLflow run, and the line naming what was written."""
    from autosam2.eval.episodes import print_episodes
    from autosam2.eval.report import log_scores, print_table, say_left_out, scored_line
    from autosam2.metrics import TOOLBOX_METRICS
    from autosam2.tracking import scoring_run_name, scoring_store

    left_out, ranks = extra["left_out"], extra["ranks"]
    say_left_out(left_out)
    columns = ("dice", "iou") if args.metric_mode == "ours" else TOOLBOX_METRICS
    print_table(per_sequence, summary, columns)
    kinds = {}
    if "episodes" in extra:
        print_episodes(extra["episodes"])
        kinds = {
            f"{figure}_{group}": score[figure]
            for group, score in extra["episodes"].items()
            for figure in ("dice", "presence_accuracy")
            if score["frames"]
        }
    store, link = scoring_store(args.tracking_uri, args.experiment, out, args.weights)
    log_scores(
        out,
        store,
        scoring_run_name("eval", args.split, args.step, args.weights),
        {**_described(args), "checkpoint": str(args.checkpoint), "ranks": ranks},
        {**summary, **kinds},
        link,
    )
    print(
        f"wrote {out}: masks/, soft/, {'overlays/, ' if not args.no_overlays else ''}metrics.json, metrics.csv "
        f"({scored_line(extra['frames'], left_out, f'over {ranks} rank(s)')})"
    )


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
    described = {
        "weights": str(args.weights),
        "data": str(args.data),
        "mode": args.mode,
        "metric_mode": args.metric_mode,
    }
    if args.split:  # resolved by `resolve_folder`
        described.update(layout=str(args.layout), split=args.split)
    return described


def resolve_folder(args: argparse.Namespace) -> None:
    """The layout and split of --data into `args`: a shard set's from its manifest (a --split that is
    not the set's is a ConfigError); a dataset folder's told by its folders (or --layout) and --split (the
    layout's valid split when none is named), one DatasetError when it is in no layout or has no such
    split, listing the splits there are. A path that is neither is left to the read to name."""
    from autosam2.data.layouts import reader, split_name
    from autosam2.data.sample_format import read_manifest
    from autosam2.data.sources import is_shard_set

    if is_shard_set(args.data):
        manifest = read_manifest(args.data)
        if args.split and args.split != manifest["split"]:
            raise ConfigError(
                f"--split {args.split}: {args.data} is a shard set of split {manifest['split']}"
            )
        args.layout, args.split = manifest.get("layout", "polyp_gen"), manifest["split"]
    elif Path(args.data).is_dir():
        args.layout = reader(args.data, args.layout).layout
        args.split = split_name(args.data, args.layout, args.split, "valid")
