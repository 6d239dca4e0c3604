"""What every command's parser shares: argument types (a count or size that must be positive and finite is
refused by argparse in its one usage line, before any work) and the flags of the command-line vocabulary."""

from __future__ import annotations

import argparse
import math
import os
from pathlib import Path
from typing import Any


def _whole(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None


def positive_int(text: str) -> int:
    """An int >= 1 (a count: workers, frames, shards, a batch)."""
    value = _whole(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} must be at least 1")
    return value


def non_negative_int(text: str) -> int:
    """An int >= 0 (an index)."""
    value = _whole(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text} must be at least 0")
    return value


def positive_float(text: str) -> float:
    """A finite float > 0 (a size in MB, a frame rate)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"{text} must be a finite number above 0")
    return value


# the vocabulary every command's parser shares: one spelling, one meaning and one default per flag; the
# spellings listed after the first are the older ones, still accepted ---------------------------------------

ENCODE_BATCH = 8  # frames per image-encoder call


def default_workers() -> int:
    """Worker processes of a command that spreads its data work over processes: the cores this process
    may run on, at most 8."""
    return max(1, min(8, len(os.sched_getaffinity(0))))


def gpu_device(text: str) -> str:
    """`--gpu N` as a device request: ``cuda:N``."""
    return f"cuda:{non_negative_int(text)}"


def device_name(text: str) -> str:
    """`--device` as a device request: ``cpu``, ``cuda`` or ``cuda:N``."""
    kind, _, index = text.partition(":")
    if text == "cpu" or (kind == "cuda" and (not index or index.isdigit())):
        return text
    raise argparse.ArgumentTypeError(f"{text!r} is not cpu, cuda or cuda:N")


def add_output_dir(parser: argparse.ArgumentParser, *aliases: str, **kwargs: Any) -> argparse.Action:
    """``--output-dir``: the folder a command writes (`args.output_dir`)."""
    return parser.add_argument("--output-dir", *aliases, dest="output_dir", **kwargs)


def add_folder_or_output_dir(parser: argparse.ArgumentParser, what: str) -> None:
    """The folder a command works on, given once: as the positional OUTPUT_DIR (`args.folder`) or as
    ``--output-dir``; `given_folder` reads it back."""
    parser.add_argument("folder", type=Path, nargs="?", metavar="OUTPUT_DIR", help=what)
    add_output_dir(parser, type=Path, default=None, help=f"{what} (instead of OUTPUT_DIR)")


def given_folder(parser: argparse.ArgumentParser, args: argparse.Namespace) -> Path:
    """The folder of `add_folder_or_output_dir`; a usage error when it was given neither way or both."""
    given = [f for f in (args.folder, args.output_dir) if f is not None]
    if len(given) != 1:
        parser.error("give the folder once: as OUTPUT_DIR or as --output-dir OUTPUT_DIR")
    return given[0]


def add_device(
    parser: argparse.ArgumentParser,
    default: str | None,
    gpu_help: str = "run on GPU N (cuda:N)",
    cpu_help: str = "run on the CPU",
    device_alias: bool = False,
) -> None:
    """``--gpu N`` / ``--cpu``: one device request in `args.device` (``cuda:N``, ``cpu``, or `default`);
    with `device_alias`, ``--device cpu|cuda|cuda:N`` sets the same."""
    group = parser.add_mutually_exclusive_group()
    # the default comes from --cpu: argparse would pass a string default through --gpu's type
    group.add_argument(
        "--gpu", type=gpu_device, dest="device", default=argparse.SUPPRESS, metavar="N", help=gpu_help
    )
    group.add_argument(
        "--cpu", action="store_const", const="cpu", dest="device", default=default, help=cpu_help
    )
    if device_alias:
        group.add_argument(
            "--device",
            dest="device",
            type=device_name,
            default=default,
            help=f"cpu | cuda | cuda:N (default {default})",
        )


def add_workers(parser: argparse.ArgumentParser, what: str) -> None:
    """``--workers N``: processes sharing the command's data work (`what` they do)."""
    parser.add_argument(
        "--workers",
        type=positive_int,
        default=default_workers(),
        help=f"worker processes {what} (default: the cores, at most 8)",
    )


def add_encode_batch(parser: argparse.ArgumentParser, *aliases: str) -> None:
    """``--encode-batch N``: frames per image-encoder call (`args.encode_batch`)."""
    parser.add_argument(
        "--encode-batch",
        *aliases,
        dest="encode_batch",
        type=positive_int,
        default=ENCODE_BATCH,
        help=f"frames per image-encoder call (default {ENCODE_BATCH})",
    )


def add_no_overlays(parser: argparse.ArgumentParser) -> None:
    """``--no-overlays``: write no overlay files (GIFs, PNG sheets, MP4s)."""
    parser.add_argument(
        "--no-overlays", action="store_true", help="write no overlays (GIFs, PNG sheets, overlay videos)"
    )


def add_layout(
    parser: argparse.ArgumentParser, default: str | None = "auto", help: str | None = None
) -> None:
    """``--layout`` (alias ``--dataset``): a dataset folder's layout (docs/data.md)."""
    from autosam2.config import Layout

    parser.add_argument(
        "--layout",
        "--dataset",
        dest="layout",
        default=default,
        choices=[layout.value for layout in Layout],
        help=help or "the dataset folder's layout (default: auto, told by its folders; see docs/data.md)",
    )


def add_split(
    parser: argparse.ArgumentParser,
    default: str | None = None,
    what: str = "read",
    default_text: str = "the layout's own",
) -> None:
    """``--split``: a dataset folder's split by name (any name its layout has: train, valid, test,
    TestEasyDataset/Unseen, ...)."""
    parser.add_argument(
        "--split",
        default=default,
        help=f"the split of a dataset folder to {what} (default: {default or default_text}; any split "
        "its layout has, e.g. valid, test, TestEasyDataset/Unseen)",
    )


def add_tracking(parser: argparse.ArgumentParser, when: str = "") -> None:
    """``--tracking-uri`` and ``--experiment`` of a command that logs its results as MLflow runs (unset:
    chosen by `autosam2.tracking.choice`)."""
    parser.add_argument(
        "--tracking-uri",
        default=None,
        help=f"{when}MLflow URI (default: $MLFLOW_TRACKING_URI, else the store of the run that trained "
        "the weights, else SQLite mlflow.db beside the output directory)",
    )
    parser.add_argument(
        "--experiment",
        default=None,
        help=f"{when}MLflow experiment (default: $MLFLOW_EXPERIMENT_NAME, else the training run's, else autosam2)",
    )
