"""The SUN-SEG benchmark table: one method's toolbox figures per test split set beside the published
methods' (`autosam2.eval.published`), written as ``benchmark.json`` / ``benchmark.csv`` and printed; and
the training run a weights file came from.

The table is long: a row per (split, method), the headline figures as columns (those the published
result files report, in the toolbox's order), so any number of splits and methods fit one width. A
published split that is none of ours (the March 2022 release's whole TestEasyDataset) keeps its own
rows, under its own name: its cases are not those of any Seen/Unseen split.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from autosam2.atomic import atomic_write_text
from autosam2.eval.published import Published, load
from autosam2.metrics import TOOLBOX_METRICS

if TYPE_CHECKING:
    from autosam2.tracking.choice import Store

BENCHMARKS = ("sunseg",)  # the benchmarks with published figures (autosam2/eval/published/<name>.json)
OURS = "scored here"  # the source of a row computed by this run


def split_folder(split: str) -> str:
    """The folder a split's outputs go to: its name with '/' as '_' (``TestEasyDataset_Seen``)."""
    return split.replace("/", "_")


@dataclass
class SplitResult:
    """One split scored: the figures per sequence and their summary (toolbox names), and what its
    metrics.json records beside them (frames, left_out, ...)."""

    split: str
    per_sequence: dict[str, dict[str, float]]
    summary: dict[str, float]
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Row:
    """A row of the table: a method's figures on a split, and where they come from."""

    split: str
    method: str
    source: str
    figures: Mapping[str, float]


def headline(published: Published) -> list[str]:
    """The columns of the table: every figure the published rows report, in the toolbox's order."""
    reported = published.figures()
    return [name for name in TOOLBOX_METRICS if name in reported]


def table(
    method: str, results: Sequence[SplitResult], published: Published, runnable: Sequence[str] = ()
) -> list[Row]:
    """Our rows and the published ones, split by split: our splits in their order (each: our row, then
    the published methods on it), then the published splits that are none the benchmark can run (another
    release's); a `runnable` split we did not run is left out."""
    ours = {r.split: r for r in results}
    rows: list[Row] = []
    others = [s for s in published.splits() if s not in ours and s not in runnable]
    for split in [*ours, *others]:
        if split in ours:
            rows.append(Row(split, method, OURS, ours[split].summary))
        rows += [
            Row(split, p.method, published.where(p), p.figures) for p in published.rows if p.split == split
        ]
    return rows


def _finite(figures: Mapping[str, float]) -> dict[str, float | None]:
    return {k: v if math.isfinite(v) else None for k, v in figures.items()}


def write_benchmark(
    out: Path, name: str, method: str, results: Sequence[SplitResult], extra: Mapping[str, Any]
) -> list[Row]:
    """``benchmark.json`` (every row with all its figures, the split folders, the published figures'
    provenance and `extra`) and ``benchmark.csv`` (the headline columns; empty where a row has no such
    figure) in `out`; returns the rows."""
    from autosam2.data.layouts.sunseg import TESTS

    published = load(name)
    rows = table(method, results, published, TESTS)
    columns = headline(published)
    payload = {
        "benchmark": name,
        "method": method,
        "splits": {r.split: split_folder(r.split) for r in results},
        "columns": columns,
        "rows": [{**vars(row), "figures": _finite(row.figures)} for row in rows],
        "published": {
            "repository": published.repository,
            "commit": published.commit,
            "sources": published.sources,
        },
        **extra,
    }
    atomic_write_text(
        out / "benchmark.json", json.dumps(payload, indent=1, sort_keys=True, allow_nan=False) + "\n"
    )
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["split", "method", "source", *columns])
    for row in rows:
        cells = [f"{row.figures[c]:.6f}" if c in row.figures else "" for c in columns]
        writer.writerow([row.split, row.method, row.source, *cells])
    atomic_write_text(out / "benchmark.csv", buf.getvalue())
    return rows


def print_benchmark(rows: Sequence[Row], name: str, file: TextIO | None = None) -> None:
    """The table: a row per (split, method), the headline figures to 3 places (``-``: not reported or
    undefined), then where the published rows come from, one line per source."""
    file = file or sys.stdout
    published = load(name)
    columns = headline(published)
    split_w = max(5, *(len(r.split) for r in rows))
    method_w = max(6, *(len(r.method) for r in rows))
    widths = [max(6, len(c)) for c in columns]
    print(
        f"{'split':<{split_w}}  {'method':<{method_w}}  "
        + "  ".join(f"{c:>{w}}" for c, w in zip(columns, widths, strict=True)),
        file=file,
    )
    for row in rows:
        cells = [
            f"{row.figures[c]:{w}.3f}" if math.isfinite(row.figures.get(c, math.nan)) else f"{'-':>{w}}"
            for c, w in zip(columns, widths, strict=True)
        ]
        print(f"{row.split:<{split_w}}  {row.method:<{method_w}}  " + "  ".join(cells), file=file)
    for source in published.sources:
        print(
            f"published: {published.repository}/blob/{published.commit[:7]}/{source['paths']}: "
            f"{source['release']}",
            file=file,
        )


def add_splits(parser: argparse.ArgumentParser) -> None:
    """``--splits``: which of SUN-SEG's test splits to run (default all four)."""
    from autosam2.data.layouts.sunseg import TESTS

    parser.add_argument(
        "--splits",
        nargs="+",
        default=None,
        choices=list(TESTS),
        metavar="SPLIT",
        help=f"the test splits (default all: {' '.join(TESTS)})",
    )


def log_splits(
    out: Path,
    store: Store,
    run_name: Callable[[str], str],
    results: Sequence[SplitResult],
    params: Mapping[str, Any],
    link: Mapping[str, str] | None = None,
) -> None:
    """One MLflow run per split in `store`, named ``run_name(<split folder>)``: `params`, the split's summary
    and its ``<split folder>/metrics.json`` / ``.csv``, tagged ``split`` and `link` (the tags naming the
    training run, `autosam2.tracking.choice.link_tags`)."""
    from autosam2.eval.report import log_scores

    for result in results:
        log_scores(
            out / split_folder(result.split),
            store,
            run_name(split_folder(result.split)),
            {**params, "split": result.split},
            result.summary,
            tags={"split": result.split, **(link or {})},
        )
