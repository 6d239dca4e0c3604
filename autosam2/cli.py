"""The `autosam2` command: one dispatcher. Each subcommand is a `main(argv)` of its own module, imported
only when it runs, so `autosam2 --help` lists them all without loading torch or SAM2."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

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
        "autosam2.tracking:sync_main",
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
        epilog="`autosam2 COMMAND --help` shows the options of a command.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (_, help_text) in COMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    return parser


def _user_errors() -> tuple[type[BaseException], ...]:
    """Bad input, a full disk, a run that cannot go on: reported in one line naming the file and the
    problem, no traceback (ShardError is a DatasetError; OSError's message names its file)."""
    from autosam2.config import ConfigError
    from autosam2.errors import CheckpointError, DatasetError, OutputDirInUse, RankLost, TrainingAborted

    return (
        ConfigError,
        DatasetError,
        CheckpointError,
        OutputDirInUse,
        TrainingAborted,
        RankLost,
        OSError,
        ValueError,
    )


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = build_parser().parse_args(argv[:1]).command  # --help, a missing or unknown command: argparse
    module, function = COMMANDS[command][0].split(":")
    try:
        return getattr(importlib.import_module(module), function)(argv[1:])
    except _user_errors() as err:
        print(f"autosam2 {command}: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
