"""`autosam2 bench KIND`: one module per benchmark, each printing one JSON object of figures whose ratios
are measured in the same run. A benchmark module has `add_arguments(parser)` and `run(args) -> dict`;
adding one is adding a module and its line to the command registry (`autosam2.commands`)."""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import sys

from autosam2.commands import BENCH, commands_of

KINDS = commands_of(BENCH)


def build_parser() -> argparse.ArgumentParser:
    """Every kind's parser under one, each kind's module imported to add its arguments."""
    parser = argparse.ArgumentParser(prog=BENCH, description=__doc__.split("\n")[0], allow_abbrev=False)
    kinds = parser.add_subparsers(dest="kind", required=True)
    for name, kind in KINDS.items():
        module = importlib.import_module(kind.module)
        module.add_arguments(
            kinds.add_parser(name, help=kind.help, description=kind.help, allow_abbrev=False)
        )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "device", None) not in (None, "cpu"):  # a GPU asked for: one line where there is none
        from autosam2.engine.dist import pick_device

        pick_device(args.device, 0)
    module, function = KINDS[args.kind].target.split(":")
    # stdout carries the figures alone (`autosam2 bench train > figures.json`): what the measured code
    # prints (the trainer's step lines, MLflow's run links) goes to stderr
    with contextlib.redirect_stdout(sys.stderr):
        figures = getattr(importlib.import_module(module), function)(args)
    print(json.dumps(figures, indent=1))
    return 0
