"""The optional parts of the install (setup.cfg's extras) and the one line a command gives when the part
it needs is missing."""

from __future__ import annotations

import importlib.metadata

from autosam2.config import ConfigError

# extra -> the distribution whose presence says the extra is installed
EXTRAS = {"deepspeed": "deepspeed", "server": "mlflow"}


class MissingExtra(ConfigError):
    """A command needs an extra of the install that is not installed; the message names it."""


def installed(extra: str) -> bool:
    """Whether `extra` of the install is there (its distribution is)."""
    try:
        importlib.metadata.distribution(EXTRAS[extra])
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def install_line(extra: str) -> str:
    """The command that installs `extra`."""
    return f"pip install 'autosam2[{extra}]'"


def require(extra: str, needed_by: str) -> None:
    """Nothing when `extra` is installed; else MissingExtra ``{needed_by} needs: pip install 'autosam2[extra]'``."""
    if not installed(extra):
        raise MissingExtra(f"{needed_by} needs: {install_line(extra)}")
