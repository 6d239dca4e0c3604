"""The `autosam2` command: one dispatcher. Each subcommand is a `main(argv)` of its own module, imported
only when it runs, so `autosam2 --help` lists them all without loading torch or SAM2."""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence

from autosam2 import __version__
from autosam2.commands import AUTOSAM2, commands_of, program
from autosam2.errors import DEBUG_VARIABLE, run_command

COMMANDS = commands_of(AUTOSAM2)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=AUTOSAM2,
        description=program(AUTOSAM2).help + ".",
        epilog="`autosam2 COMMAND --help` shows the options of a command. Errors in your input, data or disk "
        f"are one line and exit status 1; --debug (or {DEBUG_VARIABLE}=1) shows the traceback of every error.",
        allow_abbrev=False,
    )
    parser.add_argument("--debug", action="store_true", help="show the traceback of every error")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, command in COMMANDS.items():
        sub.add_parser(name, help=command.help, add_help=False, allow_abbrev=False)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--debug"]:  # every error with its traceback, in this process and those it starts
        os.environ[DEBUG_VARIABLE] = "1"
        argv = argv[1:]
    command = build_parser().parse_args(argv[:1]).command  # --help, a missing or unknown command: argparse
    module, function = COMMANDS[command].target.split(":")
    return run_command(
        f"autosam2 {command}", lambda: getattr(importlib.import_module(module), function)(argv[1:])
    )


if __name__ == "__main__":
    sys.exit(main())
