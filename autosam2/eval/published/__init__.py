"""Published methods' figures on a benchmark, as the benchmark's own repository publishes them: one JSON
file per benchmark (package data: ``<name>.json``), holding where they were read (repository, commit,
paths) and one row per method and split. Figures only; nothing here computes them."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent


@dataclass(frozen=True)
class PublishedRow:
    """One method's figures on one split, as published (toolbox names; a figure not published is absent),
    and the file of the benchmark's repository they were read from."""

    method: str
    split: str
    figures: dict[str, float]
    path: str


@dataclass(frozen=True)
class Published:
    """A benchmark's published figures: the repository and commit they were read at, what each source
    file is (`sources`: paths, release, note) and the rows, in the files' order."""

    benchmark: str
    repository: str
    commit: str
    sources: list[dict[str, str]]
    rows: list[PublishedRow]

    def splits(self) -> list[str]:
        """The splits the rows are on, each once, in order of first appearance."""
        return list(dict.fromkeys(row.split for row in self.rows))

    def figures(self) -> set[str]:
        """Every figure some row holds."""
        return {name for row in self.rows for name in row.figures}

    def where(self, row: PublishedRow) -> str:
        """Where a row was read: the file's address at the commit read (``<repository>/blob/<commit>/<path>``)."""
        return f"{self.repository}/blob/{self.commit}/{row.path}"


def load(name: str) -> Published:
    """The published figures of benchmark `name` (``sunseg``)."""
    data = json.loads((HERE / f"{name}.json").read_text())
    rows = [
        PublishedRow(r["method"], r["split"], {k: float(v) for k, v in r["figures"].items()}, r["path"])
        for source in data["sources"]
        for r in source["results"]
    ]
    sources = [{k: v for k, v in s.items() if k != "results"} for s in data["sources"]]
    return Published(data["benchmark"], data["repository"], data["commit"], sources, rows)
