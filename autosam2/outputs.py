"""Which paths a command may write its output to: a missing path, an empty folder, or a folder holding
the command's own kind of output (told by its marker file), never a path that is, holds or lies inside
the command's input. Every command that writes a folder claims it here before any work.

`--overwrite` replaces the command's own kind of output only: a folder holding anything else (a
dataset, someone's notes) is refused in one line naming it and what it holds, with or without it.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from autosam2.atomic import atomic_directory
from autosam2.errors import OutputRefused

# a temp or displaced folder our atomic writes leave beside an output when a process is killed
_LEFT_BY_A_KILL = re.compile(r"^\.[\w.-]+\.(tmp|old)-\w+$")


@dataclass(frozen=True)
class OutputKind:
    """One kind of output folder: `noun` names it in messages, `marker(folder)` tells whether a folder
    holds this kind (its marker file, read), `names` are the entries the command writes at the top of
    its folder (a regular expression): a folder of this kind that holds anything else is not replaced."""

    noun: str
    marker: Callable[[Path], bool]
    names: str

    def owns(self, folder: Path) -> bool:
        return self.marker(folder)

    def foreign(self, folder: Path) -> list[Path]:
        """What the folder holds that the command does not write."""
        ours = re.compile(f"^({self.names})$")
        return [p for p in folder.iterdir() if not (ours.match(p.name) or _LEFT_BY_A_KILL.match(p.name))]


def json_object(path: Path) -> dict:
    """The JSON object a file holds; {} for a missing, unreadable or non-object file."""
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def _marker(name: str, *keys: str) -> Callable[[Path], bool]:
    """A folder whose JSON file `name` is an object holding every one of `keys`."""
    return lambda folder: bool(keys) and all(k in json_object(folder / name) for k in keys)


def _first_line(path: Path) -> str:
    try:
        with path.open(errors="replace") as f:
            return f.readline().strip()
    except OSError:
        return ""


# what an evaluation or a prediction filled sequence by sequence names its inputs in (autosam2.eval.resume)
PROGRESS = "progress.json"


def _progress_of(command: str) -> Callable[[Path], bool]:
    """A folder a run of `command` fills (or filled) sequence by sequence: its progress file says so."""
    return lambda folder: json_object(folder / PROGRESS).get("command") == command


# what the default tracking store of an evaluation or a score puts in its folder
_TRACKING_NAMES = r"mlflow\.db|mlartifacts|mlruns|tracking"


SYNTH_DATASET = OutputKind(
    "a synthetic dataset", _marker("synth.json", "spec"), r"synth\.json|train|valid|test"
)
EVALUATION = OutputKind(
    "an evaluation",
    lambda folder: _marker("metrics.json", "summary", "weights")(folder) or _progress_of("evaluate")(folder),
    rf"metrics\.json|metrics\.csv|masks|soft|overlays|progress\.json|sequences|{_TRACKING_NAMES}",
)
SCORES = OutputKind(
    "scores",
    _marker("metrics.json", "summary", "pred", "gt"),
    rf"metrics\.json|metrics\.csv|{_TRACKING_NAMES}",
)
BENCHMARK = OutputKind(
    "a benchmark",
    _marker("benchmark.json", "benchmark", "rows"),
    rf"benchmark\.json|benchmark\.csv|Test\w+|{_TRACKING_NAMES}",  # a split's folder: TestEasyDataset_Seen
)
PREDICTIONS = OutputKind(
    "predictions",
    lambda folder: (
        _first_line(folder / "frames.csv").startswith("sequence,frame,presence")
        or _progress_of("predict")(folder)
    ),
    r"frames\.csv|masks|soft|overlays|progress\.json|sequences",
)
DEMO_MARKER = "demo.json"
# what `autosam2 demo` writes: a folder of these alone is an earlier demo's, marker or not
DEMO_NAMES = r"demo\.json|polyp_gen|polyp_gen_hard|shards|shards_hard|run|run_video|results|results_hard"
DEMO = OutputKind(
    "a demo's output",
    lambda folder: _marker(DEMO_MARKER, "written_by")(folder) or not DEMO.foreign(folder),
    DEMO_NAMES,
)


def apart_from_inputs(out: Path, inputs: Iterable[str | Path | None], holding: bool = True) -> None:
    """Refuse an output path that is an input, lies inside one, or (`holding`) holds one."""
    here = _real(out)
    for given in inputs:
        if given is None or str(given) == "":
            continue
        source = _real(given)
        if here == source:
            where = "is"
        elif here.is_relative_to(source):
            where = "lies inside"
        elif holding and source.is_relative_to(here):
            where = "holds"
        else:
            continue
        raise OutputRefused(
            f"{out}: {where} the input {given}; choose an output path outside the input (nothing was written)"
        )


def _real(path: str | Path) -> Path:
    """`path` with its links followed; a symlink loop stays where it loops (the command that reads it
    then says it is missing), where `Path.resolve` raises."""
    return Path(os.path.realpath(path))


def _parent_is_a_folder(out: Path) -> None:
    """A path whose nearest existing parent is a file can never be made: say so, not the temp name."""
    for parent in out.parents:
        if parent.exists():
            if not parent.is_dir():
                raise OutputRefused(f"{out}: cannot be made, {parent} is a file")
            return


def _holdings(folder: Path, entries: list[Path]) -> str:
    names = sorted(p.name + ("/" if p.is_dir() else "") for p in entries)
    shown = ", ".join(names[:3])
    return shown + (f" and {len(names) - 3} more" if len(names) > 3 else "")


def claim(
    out: str | Path, kind: OutputKind, overwrite: bool, inputs: Iterable[str | Path | None] = ()
) -> Path:
    """Refuse, before any work and without writing anything, an output path this command may not take;
    return it. `overwrite` allows replacing a folder of the same kind."""
    out = Path(out)
    apart_from_inputs(out, inputs)
    _parent_is_a_folder(out)
    if (out.exists() and not out.is_dir()) or (out.is_symlink() and not out.exists()):
        raise OutputRefused(f"{out}: is a file, not a folder; refusing to replace it with {kind.noun}")
    if not out.exists():
        return out
    entries = list(out.iterdir())
    if not entries:
        return out
    _owned(out, kind, entries, "replace it")
    if not overwrite:
        raise OutputRefused(f"{out}: already holds {kind.noun}; pass --overwrite to replace it")
    return out


def claim_shared(out: str | Path, kind: OutputKind, inputs: Iterable[str | Path | None] = ()) -> Path:
    """`claim` for a folder several tasks fill side by side (a job array's parts): a missing path, an
    empty folder, or one that holds only this kind; what is already there stays."""
    out = Path(out)
    apart_from_inputs(out, inputs)
    _parent_is_a_folder(out)
    if out.exists() and not out.is_dir():
        raise OutputRefused(f"{out}: is a file, not a folder; refusing to write {kind.noun} there")
    entries = list(out.iterdir()) if out.is_dir() else []
    if entries:
        _owned(out, kind, entries, "write there")
    return out


def _owned(out: Path, kind: OutputKind, entries: list[Path], doing: str) -> None:
    """Refuse a non-empty folder that is not of `kind`, or holds more than its command writes."""
    if not kind.owns(out):
        raise OutputRefused(
            f"{out}: holds {_holdings(out, entries)}, which is not {kind.noun}; refusing to {doing} "
            "(choose another output path, or remove it yourself)"
        )
    foreign = kind.foreign(out)
    if foreign:
        raise OutputRefused(
            f"{out}: holds {_holdings(out, foreign)} beside {kind.noun}, which this command does not "
            f"write; refusing to {doing} (move it out first)"
        )


@contextmanager
def output_directory(
    out: str | Path, kind: OutputKind, overwrite: bool, inputs: Iterable[str | Path | None] = ()
) -> Iterator[Path]:
    """`claim` the path, then yield a temp folder that replaces it whole on success (atomic_directory)."""
    out = claim(out, kind, overwrite, inputs)
    if out.is_symlink():
        out = out.resolve()  # a link to a folder of ours: the folder is replaced, the link stays
    with atomic_directory(out, overwrite=True) as tmp:
        yield tmp
