"""`python -m shards COMMAND`: offline sharding of dataset folders (any layout, any split)."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from pathlib import Path


def build_parser() -> argparse.ArgumentParser:
    from autosam2.arguments import (
        add_folder_or_output_dir,
        add_layout,
        add_output_dir,
        add_split,
        add_workers,
        non_negative_int,
        positive_float,
        positive_int,
    )
    from autosam2.commands import SHARDS, commands_of

    parser = argparse.ArgumentParser(prog=SHARDS, description=__doc__, allow_abbrev=False)
    sub = parser.add_subparsers(dest="command", required=True)
    helps = {name: command.help for name, command in commands_of(SHARDS).items()}

    b = sub.add_parser("build", help=helps["build"], allow_abbrev=False)
    b.add_argument("root", type=Path)
    add_layout(b)
    add_split(b, what="shard")
    add_output_dir(b, "--out", type=Path, required=True, help="the shard set's folder")
    b.add_argument(
        "--frames-per-sample",
        type=positive_int,
        default=16,
        help="consecutive frames per sample (default 16)",
    )
    b.add_argument(
        "--max-shard-mb", type=positive_float, default=1024.0, help="close a shard before it passes this size"
    )
    add_workers(b, "writing shards")
    b.add_argument(
        "--shard-index", type=non_negative_int, default=None, help="job-array mode: write only this part ..."
    )
    b.add_argument("--num-shards", type=positive_int, default=None, help="... of this many; then run `merge`")
    b.add_argument("--overwrite", action="store_true")

    m = sub.add_parser("merge", help=helps["merge"], allow_abbrev=False)
    add_folder_or_output_dir(m, "the shard set's folder")
    m.add_argument("--overwrite", action="store_true", help="replace a manifest.json already there")

    v = sub.add_parser("verify", help=helps["verify"], allow_abbrev=False)
    v.add_argument("out", type=Path)
    return parser


def run(args: argparse.Namespace) -> int:
    """Do what the parsed arguments say (the registry's function of the command); errors propagate (the
    launcher's jobs report them)."""
    from autosam2.commands import SHARDS, commands_of

    module, function = commands_of(SHARDS)[args.command].target.split(":")
    return getattr(importlib.import_module(module), function)(args)


def build(args: argparse.Namespace) -> int:
    from shards import writer

    common = dict(
        frames_per_sample=args.frames_per_sample,
        max_shard_mb=args.max_shard_mb,
        workers=args.workers,
        overwrite=args.overwrite,
        progress=sys.stderr.isatty(),
        layout=args.layout,
    )
    out = args.output_dir
    if args.num_shards is None:
        manifest = writer.build(args.root, args.split, out, **common)
        t = manifest["totals"]
        print(
            f"wrote {out}: {t['shards']} shards, {t['samples']} samples, {t['frames']} frames, {t['bytes'] / 1e6:.1f} MB"
            + _noise_note(manifest["shards"])
        )
        return 0
    part = writer.build_part(args.root, args.split, out, args.shard_index, args.num_shards, **common)
    frames = sum(s["frames"] for s in part["shards"])
    print(
        f"wrote part {args.shard_index} of {args.num_shards} into {out}: {len(part['shards'])} shards, {frames} frames"
        + _noise_note(part["shards"])
    )
    return 0


def merge(args: argparse.Namespace) -> int:
    from shards import writer

    out = args.output_dir
    manifest = writer.merge(out, overwrite=args.overwrite)
    t = manifest["totals"]
    print(
        f"merged {out}: {t['shards']} shards, {t['samples']} samples, {t['frames']} frames"
        + _noise_note(manifest["shards"])
    )
    return 0


def verify(args: argparse.Namespace) -> int:
    from shards.verify import verify as check

    problems = check(args.out, progress=sys.stderr.isatty())
    for problem in problems:
        print(problem)
    if problems:
        print(f"{args.out}: {len(problems)} problem(s)", file=sys.stderr)
        return 1
    print(f"{args.out}: ok")
    return 0


def _noise_note(shards: list[dict]) -> str:
    """`validate`'s count of the empty masks with compression noise, for these shards' sources."""
    from shards.writer import mask_noise

    noise = mask_noise(shards)
    return f"; {noise}" if noise.masks else ""


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "build" and (args.shard_index is None) != (args.num_shards is None):
        parser.error("--shard-index and --num-shards go together")
    if args.command == "build" and args.num_shards is not None and args.shard_index >= args.num_shards:
        parser.error(f"--shard-index {args.shard_index} is not a part of --num-shards {args.num_shards}")
    if args.command == "merge":
        from autosam2.arguments import given_folder

        args.output_dir = given_folder(parser, args)
    from autosam2.errors import run_command

    return run_command(f"shards {args.command}", lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())
