"""`autosam2 bench data|train|infer|memory|longvideo|checkpoint|tracking`: one module per benchmark, each printing one JSON object of
figures whose ratios are measured in the same run. A benchmark module has `add_arguments(parser)` and
`run(args) -> dict`; adding one is adding a module and a line to `KINDS`."""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import sys

KINDS = {
    "data": "shard stream vs folder reader vs bare JPEG decoding, frames/s",
    "train": "full trainer step time vs the bare train step of the same model and clip",
    "infer": "streaming inference FPS vs bare image-encoder FPS, and the evaluate pipeline vs streaming",
    "memory": "tensor memory of a run config's training step, by kind, and a per-GPU estimate",
    "longvideo": "peak host RSS of evaluate and predict over sequences of 100 / 1,000 / 5,000 frames",
    "checkpoint": "loop stall per checkpoint, synchronous vs asynchronous, at two trainable-set sizes",
    "tracking": "longest logging stall while the MLflow server is up, hung and dead; flush time after",
    "decode": "JPEG decoding frames/s: PIL, the project's decoder on the CPU and on the device",
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="autosam2 bench", description=__doc__.split("\n")[0])
    kinds = parser.add_subparsers(dest="kind", required=True)
    modules = {}
    for name, help_text in KINDS.items():
        modules[name] = importlib.import_module(f"autosam2.bench.{name}")
        modules[name].add_arguments(kinds.add_parser(name, help=help_text, description=help_text))
    args = parser.parse_args(argv)
    # stdout carries the figures alone (`autosam2 bench train > figures.json`): what the measured code
    # prints (the trainer's step lines, MLflow's run links) goes to stderr
    with contextlib.redirect_stdout(sys.stderr):
        figures = modules[args.kind].run(args)
    print(json.dumps(figures, indent=1))
    return 0
