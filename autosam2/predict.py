"""`autosam2 predict`: polyp masks for unlabeled video, streamed through a trained model.

Input: a video file (``.mp4``, ``.avi``, ``.mov``, ``.mkv``, ... through PyAV), a folder of frames, or a folder
of those; or one split of a dataset folder in a known layout (told by its folders, or named by
``--layout``; ``--split``, default its valid split), its sequences' frames in the layout's order.
Output (``--output-dir``, appearing only when complete): binary masks ``masks/<sequence>/<frame>.png`` (0/255), 8-bit soft maps ``soft/<sequence>/<frame>.png``, per sequence an
overlay MP4 of every frame (not with ``--no-overlay-video``) plus a GIF and PNG sheet in ``overlays/`` (none
with ``--no-overlays``), and ``frames.csv`` (per frame: the presence probability and the predicted polyp's
pixels). Frames are read, predicted and written one by
one, so memory does not grow with the video's length.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

from autosam2.arguments import add_layout, add_no_overlays, add_split, positive_float
from autosam2.config import TrainConfig


def build_parser() -> argparse.ArgumentParser:
    from autosam2.evaluate import add_model_arguments

    parser = argparse.ArgumentParser(
        prog="autosam2 predict", description=__doc__.split("\n")[0], allow_abbrev=False
    )
    parser.add_argument(
        "input", help="a video file, a folder of frames, a folder of those, or a dataset folder"
    )
    add_model_arguments(parser, "predictions")
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
    args = build_parser().parse_args(argv)

    from autosam2.engine.dist import configure_backends, pick_device
    from autosam2.eval.inference import infer_sequences
    from autosam2.eval.report import PredictionWriter
    from autosam2.model.weights import load_trained_model
    from autosam2.outputs import PREDICTIONS, claim, output_directory
    from autosam2.progress import Progress

    inputs = [args.input, args.weights, args.checkpoint]
    out = claim(args.output_dir, PREDICTIONS, args.overwrite, inputs)
    videos = read_videos(args.input, args.layout, args.split)
    device = pick_device(args.device, 0)
    defaults = TrainConfig()
    configure_backends(defaults.cudnn_benchmark, defaults.tf32)
    model, _ = load_trained_model(args.weights, args.checkpoint, device, compile=args.compile)
    with (
        output_directory(out, PREDICTIONS, args.overwrite, inputs) as tmp,
        open(tmp / "frames.csv", "w", newline="") as f,
    ):
        overlays = not args.no_overlays
        writer = PredictionWriter(
            tmp,
            overlays=overlays,
            video=overlays and not args.no_overlay_video,
            fps=args.fps,
            rows=csv.writer(f),
        )
        with Progress(len(videos), "predict", "sequence", every_s=0.0) as bar:
            infer_sequences(
                model,
                videos,
                device,
                args.mode,
                args.encode_batch,
                sink=writer,
                on_sequence=lambda video: bar.update(
                    note=f"{video.video_id}: {writer.frames[video.video_id]} frames"
                ),
            )
        frames = sum(writer.frames.values())
    written = "masks/, soft/, overlays/, frames.csv" if overlays else "masks/, soft/, frames.csv"
    print(f"wrote {out}: {written} ({len(videos)} sequence(s), {frames} frames)")
    return 0


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
