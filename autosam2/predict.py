"""`autosam2 predict`: polyp masks for unlabeled video, streamed through a trained model.

Input: a video file (``.mp4``, ``.avi``, ``.mov``, ``.mkv``, ... through PyAV), a folder of frames, or a folder
of those; or one split of a dataset folder in a known layout (told by its folders, or named by
``--layout``; ``--split``, default its valid split), its sequences' frames in the layout's order.
Output (``--output-dir``): binary masks ``masks/<sequence>/<frame>.png`` (0/255), 8-bit soft maps ``soft/<sequence>/<frame>.png``, per sequence an
overlay MP4 of every frame (not with ``--no-overlay-video``) plus a GIF and PNG sheet in ``overlays/`` (none
with ``--no-overlays``), and ``frames.csv`` (per frame: the presence probability and the predicted polyp's
pixels), written once every sequence is done. Frames are read, predicted and written one by
one, so memory does not grow with the video's length. Each sequence is kept as it ends, and a stopped
run goes on with ``--resume`` (`autosam2.eval.resume`). Under torchrun or srun the ranks split the
sequences, and rank 0 writes ``frames.csv``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from autosam2.arguments import add_layout, add_no_overlays, add_split, positive_float
from autosam2.config import TrainConfig


def build_parser() -> argparse.ArgumentParser:
    from autosam2.evaluate import add_model_arguments, add_resume

    parser = argparse.ArgumentParser(
        prog="autosam2 predict", description=__doc__.split("\n")[0], allow_abbrev=False
    )
    parser.add_argument(
        "input", help="a video file, a folder of frames, a folder of those, or a dataset folder"
    )
    add_model_arguments(parser, "predictions")
    add_resume(parser)
    add_layout(
        parser, help="INPUT as a dataset folder in this layout (default auto: when its folders tell one)"
    )
    add_split(parser, what="predict, when INPUT is a dataset folder", default_text="its valid split")
    parser.add_argument(
        "--fps",
        type=positive_float,
        default=25.0,
        help="frame rate of the overlay video of a folder of frames",
    )
    add_no_overlays(parser)
    parser.add_argument(
        "--no-overlay-video",
        "--no-video",
        dest="no_overlay_video",
        action="store_true",
        help="no overlay MP4 (the GIF and PNG sheet still)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    """0 when done; `EXIT_STOPPED` when a signal stopped it early (it goes on with --resume)."""
    from autosam2.engine.stop import settle
    from autosam2.evaluate import on_ranks

    try:
        return on_ranks(build_parser().parse_args(argv), _predict)
    finally:
        settle()  # how the run ended decides the status, not a signal while the process shuts down


def _predict(args: argparse.Namespace, info) -> int:
    """Every rank predicts its share of the sequences into the one output folder, each sequence kept as
    it ends; rank 0 writes frames.csv once every sequence is done."""
    from autosam2.engine.dist import announce_ranks, configure_backends, configure_threads
    from autosam2.engine.stop import EXIT_STOPPED
    from autosam2.eval.report import write_frames_csv
    from autosam2.model.weights import load_trained_model

    folder = claim_output(args)  # every rank says it, not rank 0 alone
    if folder.finished:
        if info.is_main:
            print(
                f"{folder.out}: the predictions are complete; nothing to resume (--overwrite runs them again)"
            )
        return 0
    videos = read_videos(args.input, args.layout, args.split)
    announce_ranks(info)
    defaults = TrainConfig()
    configure_backends(defaults.cudnn_benchmark, defaults.tf32)
    configure_threads()  # the training rule: SLURM's --cpus-per-task, OMP_NUM_THREADS, or the cores
    model, _ = load_trained_model(args.weights, args.checkpoint, info.device, compile=args.compile)
    with folder.writing(info.is_main):
        frames = _predict_into(args, info, model, videos, folder)
        if frames is None:
            return EXIT_STOPPED
        if info.is_main:
            write_frames_csv(folder.out, folder.records, [video.video_id for video in videos])
            folder.finish(("frames.csv",))
            written = (
                "masks/, soft/, overlays/, frames.csv"
                if not args.no_overlays
                else "masks/, soft/, frames.csv"
            )
            print(f"wrote {folder.out}: {written} ({len(videos)} sequence(s), {frames} frames)")
    return 0


def claim_output(args: argparse.Namespace):
    """The output folder of `args`, refused before any work in one line where this prediction may not
    write or resume there (`claim_sequences`)."""
    from autosam2.eval.resume import claim_sequences, identity
    from autosam2.evaluate import model_inputs
    from autosam2.outputs import PREDICTIONS

    inputs = {
        **model_inputs(args),
        "input": identity(args.input),
        **{k: str(getattr(args, k)) for k in ("split", "layout", "fps")},
        "overlays": not args.no_overlays,
        "overlay_video": not args.no_overlay_video,
    }
    paths = [args.input, args.weights, args.checkpoint]
    return claim_sequences(
        args.output_dir, PREDICTIONS, "predict", inputs, paths, args.overwrite, args.resume
    )


def _predict_into(args: argparse.Namespace, info, model, videos: list, folder) -> int | None:
    """This rank's share of `videos` (less the finished ones) through the model into the folder; the
    frames predicted over every rank and run, None when a signal stopped it."""
    from autosam2.data.sources import share
    from autosam2.eval.inference import infer_sequences
    from autosam2.eval.report import PredictionWriter
    from autosam2.progress import Progress

    of_this_rank = share(videos, info.rank, info.world_size)
    todo = [video for video in of_this_rank if video.video_id not in folder.done]
    overlays = not args.no_overlays
    writer = PredictionWriter(
        folder.out,
        overlays=overlays,
        video=overlays and not args.no_overlay_video,
        fps=args.fps,
        rows=folder.records,
    )
    mine = {}

    def ended(video) -> None:  # on the writer thread, once the sequence's outputs are all written
        mine[video.video_id] = {"frames": writer.frames.get(video.video_id, 0)}
        folder.keep(video.video_id, mine[video.video_id])
        bar.update(note=f"{video.video_id}: {mine[video.video_id]['frames']} frames")

    with Progress(len(todo), "predict", "sequence", enabled=info.is_main, every_s=0.0) as bar:
        infer_sequences(
            model,
            folder.todo(of_this_rank),
            info.device,
            args.mode,
            args.encode_batch,
            sink=writer,
            on_sequence=ended,
        )
    parts = folder.gather(mine, len(todo), info.is_main)
    return None if parts is None else sum(r["frames"] for records in parts for r in records.values())


def read_videos(path: str, layout: str = "auto", split: str | None = None) -> list:
    """The sequences to predict: one split of a dataset folder (its layout named, told by its folders,
    or a --split named), its frames in the layout's order; otherwise video files and folders of frames."""
    from autosam2.data.layouts import detect, scan, split_name
    from autosam2.data.media import frame_files, read_inputs
    from autosam2.errors import DatasetError

    if layout == "auto" and not split:
        try:
            layout = detect(path) if Path(path).is_dir() else layout
        except DatasetError:
            pass
        if layout == "auto":
            return read_inputs(path)
    split = split_name(path, layout, split, "valid")
    sequences, problems = scan(path, split, layout)
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise DatasetError(f"{problems[0]}{more}; `autosam2 validate {path} --split {split}` lists them all")
    source = Path(path) / split
    return [frame_files(s.name, [(f.name, f.image) for f in s.frames], source) for s in sequences]
