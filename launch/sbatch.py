"""What the launcher takes from sbatch's conventions: its time formats, and the site's set-up lines that
run in the job script before srun (`module load ...`, `source .../activate`).

Set-up lines have one home per site: the YAML file named by `AUTOSAM2_SITE` (key `setup`, a list of
lines), read for every launched command; `--setup LINE` adds lines after them for one submission.
"""

from __future__ import annotations

import argparse
import math
import os
import re
from pathlib import Path

SITE_VARIABLE = "AUTOSAM2_SITE"
SITE_KEYS = ("setup",)

# sbatch --time: minutes, minutes:seconds, hours:minutes:seconds, days-hours, days-hours:minutes,
# days-hours:minutes:seconds; no field has a range (90:00 is 90 minutes, 0:90 is 90 seconds)
_N = "([0-9]+)"
_FORMATS = {
    re.compile(_N): (60,),
    re.compile(f"{_N}:{_N}"): (60, 1),
    re.compile(f"{_N}:{_N}:{_N}"): (3600, 60, 1),
    re.compile(f"{_N}-{_N}"): (86400, 3600),
    re.compile(f"{_N}-{_N}:{_N}"): (86400, 3600, 60),
    re.compile(f"{_N}-{_N}:{_N}:{_N}"): (86400, 3600, 60, 1),
}
_NO_LIMIT = ("-1", "INFINITE", "UNLIMITED")  # sbatch's spellings of no limit, beside 0
_MAX_SECONDS = 2**31 - 1  # sbatch sums the fields in seconds in a signed 32-bit int (about 68 years)
TIME_FORMATS = "MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM or D-HH:MM:SS"


def sbatch_minutes(text: str) -> int:
    """A time limit in any of sbatch's formats, in whole minutes; seconds round up to the next minute, as
    sbatch rounds them. 0 and UNLIMITED (sbatch's "no limit") are refused: submitit tells a time-out
    from a preemption by the limit."""
    for pattern, scales in _FORMATS.items():
        match = pattern.fullmatch(text)
        if match:
            seconds = sum(int(field) * scale for field, scale in zip(match.groups(), scales, strict=True))
            break
    else:
        if text.upper() not in _NO_LIMIT:
            raise argparse.ArgumentTypeError(f"{text!r} is not a time limit: {TIME_FORMATS}")
        seconds = 0
    if seconds == 0:
        raise argparse.ArgumentTypeError(
            f"{text!r} is no time limit; give one (the partition's maximum for the longest job)"
        )
    if math.ceil(seconds / 60) * 60 > _MAX_SECONDS:
        raise argparse.ArgumentTypeError(f"{text!r} is longer than sbatch can take (at most 24855-03:14)")
    return math.ceil(seconds / 60)


def sbatch_parameter(text: str) -> str:
    """An extra #SBATCH parameter, KEY=VALUE or KEY alone (a flag); a missing KEY is refused."""
    if not text.partition("=")[0].strip().lstrip("-"):
        raise argparse.ArgumentTypeError(f"{text!r} names no parameter: KEY=VALUE, or KEY alone for a flag")
    return text


def site_setup(env: dict[str, str] | None = None) -> list[str]:
    """The set-up lines of the site file `AUTOSAM2_SITE` names; [] when it names none. A missing or
    unreadable file, or one holding anything but a list of lines under `setup`, is one ConfigError."""
    import yaml

    from autosam2.config import ConfigError

    name = (os.environ if env is None else env).get(SITE_VARIABLE, "")
    if not name:
        return []
    path = Path(name).expanduser()
    try:
        site = yaml.safe_load(path.read_text())
    except OSError as err:
        raise ConfigError(f"{path} ({SITE_VARIABLE}): {err.strerror or err}") from err
    except yaml.YAMLError as err:
        raise ConfigError(f"{path} ({SITE_VARIABLE}): not YAML: {str(err).splitlines()[0]}") from err
    site = {} if site is None else site
    if not isinstance(site, dict):
        raise ConfigError(
            f"{path} ({SITE_VARIABLE}): a mapping of {', '.join(SITE_KEYS)}, not {type(site).__name__}"
        )
    unknown = sorted(str(key) for key in site if key not in SITE_KEYS)
    if unknown:
        raise ConfigError(
            f"{path} ({SITE_VARIABLE}): unknown key(s) {', '.join(unknown)}; known: {', '.join(SITE_KEYS)}"
        )
    lines = site.get("setup") or []
    if not isinstance(lines, list) or not all(isinstance(line, str) for line in lines):
        raise ConfigError(f"{path} ({SITE_VARIABLE}): setup must be a list of shell lines")
    return lines
