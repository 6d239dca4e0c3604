"""`autosam2 synth | validate | inspect`: write a synthetic dataset, check a dataset folder in any layout, read one back."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from autosam2.arguments import add_layout, add_output_dir, add_split, add_workers, positive_int


def _synth_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="autosam2 synth", description="write a synthetic polyp_gen dataset", allow_abbrev=False
    )
    add_output_dir(p, "--out", type=Path, required=True, help="dataset root to create")
    p.add_argument("--sequences", type=int, default=8, help="train sequences (default 8)")
    p.add_argument(
        "--valid-sequences", type=int, default=None, help="valid sequences (default: half of --sequences)"
    )
    p.add_argument(
        "--test-sequences",
        type=int,
        default=None,
        help="held-out test sequences (default: half of --sequences; 0: no test split)",
    )
    p.add_argument("--frames", type=int, default=24, help="frames per sequence (default 24)")
    p.add_argument("--size", type=int, default=256, help="frame side in pixels (default 256)")
    p.add_argument("--seed", type=int, default=0)
    add_workers(p, "generating sequences (the data is the same for any number)")
    p.add_argument(
        "--hard",
        action="store_true",
        help="the hard split: 3-5 frame episodes that hide a present polyp (heavy haze or blur, specular, "
        "low contrast) or leave no trace of it (covered by an instrument, dropped, flash), about one per "
        "10 frames, each after two clear frames; every frame labelled in synth.json",
    )
    p.add_argument(
        "--episode-windows",
        type=int,
        default=0,
        metavar="N",
        help="with --hard: also the split train_episodes, N-frame windows cut from the train sequences, "
        "each two frames with the polyp in view, then one of its episodes (stage 2's curriculum; "
        "default 0: none)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace --output-dir if it exists")
    return p


def synth(argv: list[str] | None = None) -> int:
    args = _synth_parser().parse_args(argv)
    from autosam2.config import ConfigError

    half = max(1, args.sequences // 2)
    valid = args.valid_sequences if args.valid_sequences is not None else half
    test = args.test_sequences if args.test_sequences is not None else half
    if min(args.size - 31, args.frames - 1, args.sequences, valid, test + 1) < 1:
        raise ConfigError(
            "synthetic dataset needs size >= 32, frames >= 2, train and valid sequences >= 1 and "
            "test sequences >= 0"
        )
    from autosam2.data.synthetic import SynthSpec, episode_windows_problem, write_dataset

    problem = episode_windows_problem(args.episode_windows, args.hard, args.frames)
    if problem:
        raise ConfigError(f"--episode-windows {args.episode_windows}: {problem}")

    spec = SynthSpec(
        train_sequences=args.sequences,
        valid_sequences=valid,
        test_sequences=test,
        frames=args.frames,
        size=args.size,
        seed=args.seed,
        hard=args.hard,
        episode_windows=args.episode_windows,
    )
    summary = write_dataset(
        args.output_dir, spec, overwrite=args.overwrite, progress=sys.stderr.isatty(), workers=args.workers
    )
    share = summary["empty_frames"] / summary["frames"]
    splits = " + ".join(f"{len(names)} {split}" for split, names in summary["splits"].items())
    print(
        f"wrote {args.output_dir}: {splits} sequences, {summary['frames']} frames of {spec.size}x{spec.size}, "
        f"{summary['empty_frames']} polyp-free ({share:.0%}), seed {spec.seed}"
    )
    return 0


def validate(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="autosam2 validate",
        description="check a dataset folder in any layout (docs/data.md); list every problem, one per line",
        allow_abbrev=False,
    )
    p.add_argument("root", type=Path)
    add_layout(p)
    add_split(p, what="check", default_text="every split there is")
    args = p.parse_args(argv)

    from autosam2.data.codec import MASK_THRESHOLD
    from autosam2.data.folder import MaskNoise, validate_root
    from autosam2.data.layouts import reader

    reports = validate_root(args.root, [args.split] if args.split else None, sys.stderr.isatty(), args.layout)
    problems = [p for r in reports for p in r.problems]
    for problem in problems:
        print(problem)
    if problems:
        print(f"{args.root}: {len(problems)} problem(s)", file=sys.stderr)
        return 1
    parts = [
        f"{r.split}: {r.sequences} sequences, {r.frames} frames, {r.empty_frames} empty-mask frames"
        for r in reports
    ]
    soft = sum(r.soft_masks for r in reports)
    note = f"; {soft} masks have grey values (JPEG), foreground above {MASK_THRESHOLD}" if soft else ""
    noise = MaskNoise()
    for r in reports:
        noise.merge(r.noise)
    note += f"; {noise}" if noise.masks else ""
    layout = reader(args.root, args.layout).layout
    print(f"{args.root}: ok ({layout} layout); " + "; ".join(parts) + note)
    return 0


def inspect(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="autosam2 inspect",
        description="name a dataset folder's layout and splits, read the sequences of one split (or of a "
        "shard set) and summarise each",
        allow_abbrev=False,
    )
    p.add_argument("root", type=Path, nargs="?", default=None)
    p.add_argument(
        "--shards", type=Path, default=None, help="read a shard set through the evaluation stream instead"
    )
    p.add_argument(
        "--image-size", type=positive_int, default=256, help="with --shards: the stream's image size"
    )
    add_layout(p)
    add_split(p, what="read", default_text="the layout's valid split")
    p.add_argument("--sequence", default=None, help="one sequence (default: all)")
    args = p.parse_args(argv)

    from autosam2.data.video import collate_clips

    if args.shards:
        from autosam2.config import DataConfig
        from autosam2.data.stream import ClipStream

        stream = ClipStream(args.shards, "eval", DataConfig(), args.image_size, seed=0)
        for batch in stream:
            if args.sequence in (None, batch.video_ids[0]):
                print(_summarise(stream.manifest["split"], batch.video_ids[0], batch))
        return 0
    if args.root is None:
        print("autosam2 inspect: give a dataset ROOT or --shards DIR", file=sys.stderr)
        return 2
    from autosam2.data.folder import FolderDataset
    from autosam2.data.layouts import reader, split_name

    found = reader(args.root, args.layout)
    args.split = split_name(args.root, found.layout, args.split, "valid")
    print(
        f"{args.root}: {found.layout} layout ({found.release}); splits: {', '.join(found.splits(args.root))}"
    )
    dataset = FolderDataset(args.root, args.split, layout=found.layout)
    names = [args.sequence] if args.sequence else dataset.sequence_names
    for name in names:
        if name not in dataset.sequences:
            from autosam2.errors import DatasetError

            raise DatasetError(f"{args.root}: no sequence {name!r} in split {args.split}")
        video = dataset.load_sequence(name)
        print(
            _summarise(
                args.split, name, collate_clips([video]), (video.frames[0].name, video.frames[-1].name)
            )
        )
    return 0


def _summarise(split: str, name: str, batch, frame_names: tuple[str, str] | None = None) -> str:
    present = batch.present_TB[:, 0]
    area = batch.masks_TBHW[:, 0].flatten(1).float().mean(dim=1)
    mean_area = float(area[present].mean()) if present.any() else 0.0
    t, _, _, h, w = batch.images_TBCHW.shape
    names = f" ({frame_names[0]} .. {frame_names[1]})" if frame_names else ""
    return (
        f"{split}/{name}: {t} frames {w}x{h}{names}, clip batch images {tuple(batch.images_TBCHW.shape)} "
        f"masks {tuple(batch.masks_TBHW.shape)}, polyp in {int(present.sum())}/{t} frames, mean area {mean_area:.1%}"
    )
