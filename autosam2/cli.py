"""The `autosam2` command: one dispatcher. Each subcommand is a `main(argv)` of its own module, imported
only when it runs, so `autosam2 --help` lists them all without loading torch or SAM2."""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence

from autosam2.errors import DEBUG_VARIABLE, run_command

# name -> (module:function, help); every command parses its own arguments
COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("autosam2.train:main", "train AutoSAM2 (alone, under torchrun, or under srun)"),
    "evaluate": ("autosam2.evaluate:main", "streaming inference + metrics, masks and overlays of a split"),
    "predict": (
        "autosam2.predict:main",
        "masks and overlay videos for unlabeled video files or frame folders",
    ),
    "score": ("autosam2.score:main", "score saved masks of any method (the SUN-SEG toolbox's figures)"),
    "sync": (
        "autosam2.sync:main",
        "send what a run's tracking outbox still holds (its MLflow server was down) to its run",
    ),
    "demo": ("autosam2.demo:main", "the whole mission on the embedded defaults, on the CPU"),
    "synth": ("autosam2.data_commands:synth", "write a synthetic polyp_gen dataset (train + valid)"),
    "validate": (
        "autosam2.data_commands:validate",
        "check a polyp_gen root; list every problem, one per line",
    ),
    "inspect": ("autosam2.data_commands:inspect", "summarise the sequences of a polyp_gen root or shard set"),
    "bench": (
        "autosam2.bench:main",
        "benchmarks: data, train, infer, memory, longvideo (one JSON object each)",
    ),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="autosam2",
        description="SAM2 with a learned prompt encoder for colon-polyp video segmentation.",
        epilog="`autosam2 COMMAND --help` shows the options of a command. Errors in your input, data or disk "
        f"are one line and exit status 1; --debug (or {DEBUG_VARIABLE}=1) shows the traceback of every error.",
    )
    parser.add_argument("--debug", action="store_true", help="show the traceback of every error")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (_, help_text) in COMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--debug"]:  # every error with its traceback, in this process and those it starts
        os.environ[DEBUG_VARIABLE] = "1"
        argv = argv[1:]
    command = build_parser().parse_args(argv[:1]).command  # --help, a missing or unknown command: argparse
    module, function = COMMANDS[command][0].split(":")
    return run_command(
        f"autosam2 {command}", lambda: getattr(importlib.import_module(module), function)(argv[1:])
    )


if __name__ == "__main__":
    sys.exit(main())
