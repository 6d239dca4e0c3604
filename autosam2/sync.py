"""`autosam2 sync`: send what a run's tracking outbox still holds (its MLflow server was down) to its run."""

from __future__ import annotations

import argparse
import errno
import sys
from pathlib import Path
from typing import Any

from autosam2.arguments import add_folder_or_output_dir, given_folder, positive_float
from autosam2.config import ConfigError
from autosam2.tracking.choice import RECORD, read_run
from autosam2.tracking.credentials import redact_uri, take_uri_credentials
from autosam2.tracking.mlflow_store import bound_http_env, open_client
from autosam2.tracking.outbox import FOLDER, OUTBOX, Outbox
from autosam2.tracking.sender import Sender


def sync(
    output_dir: str | Path, tracking_uri: str | None = None, timeout_s: float = 600.0
) -> tuple[int, int]:
    """Send what a run's outbox (``OUTPUT_DIR/tracking``) still holds to its tracking store (`tracking_uri`,
    default the one the run recorded); returns (records sent, records left)."""
    folder = Path(output_dir) / FOLDER
    if not (folder / OUTBOX).is_file():
        raise FileNotFoundError(
            errno.ENOENT,
            f"no tracking outbox here (is {output_dir} a run's output dir?)",
            str(folder / OUTBOX),
        )
    uri = tracking_uri or _uri_of_run(Path(output_dir))
    uri = take_uri_credentials(uri)
    bound_http_env()
    outbox = Outbox(folder)
    errors: list[str] = []

    def failed(what: str, err: BaseException) -> None:
        if not errors:
            print(
                f"sync: could not {what} at {redact_uri(uri)}: {redact_uri(str(err))[:500]}", file=sys.stderr
            )
        errors.append(what)

    before = outbox.unsent()
    sender = Sender(outbox, _client(uri), redact_uri(uri), failed)
    sender.start()
    sender.finish(timeout_s)
    left = outbox.unsent()
    outbox.close()
    return before - left, left


def _uri_of_run(output_dir: Path) -> str:
    """The store the run's record names (`autosam2.tracking.choice.read_run`)."""
    run = read_run(output_dir)
    if run is None or run.uri is None:
        record = output_dir / FOLDER / RECORD  # older runs kept their choice in config.yaml only
        named = record if record.exists() else output_dir / "config.yaml"
        raise FileNotFoundError(
            errno.ENOENT, "records no tracking store that is there; pass --tracking-uri", str(named)
        )
    return run.uri


def _client(uri: str) -> Any:
    """The MLflow client of `uri`; a URI MLflow refuses (a file store) is the user's error, in one line."""
    from mlflow.exceptions import MlflowException

    try:
        return open_client(uri)
    except MlflowException as err:
        raise ConfigError(f"--tracking-uri {redact_uri(uri)}: {str(err).splitlines()[0]}") from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="autosam2 sync",
        description="send the tracking records a run could not deliver (its MLflow server was down) to its run",
        allow_abbrev=False,
    )
    add_folder_or_output_dir(parser, "the run's output directory (train.output_dir)")
    parser.add_argument("--tracking-uri", default=None, help="default: the store the run logged to")
    parser.add_argument(
        "--timeout", type=positive_float, default=600.0, help="seconds to keep trying (default 600)"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    output_dir = given_folder(parser, args)
    sent, left = sync(output_dir, args.tracking_uri, args.timeout)
    if left:
        print(f"sync: {sent} record(s) sent, {left} still waiting in {output_dir / FOLDER}", file=sys.stderr)
        return 1
    print(f"sync: {sent} record(s) sent; the outbox of {output_dir} is empty", flush=True)
    return 0
