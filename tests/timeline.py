"""Draw a test run as a timeline: one lane per pytest-xdist worker, one bar per test, coloured by kind.

    AUTOSAM2_TEST_TIMELINE=timeline.json make test
    .venv/bin/python tests/timeline.py timeline.json timeline.png

The JSON is what tests/conftest.py writes when AUTOSAM2_TEST_TIMELINE names a file: for each test, its
worker, kind, outcome and the start and end (epoch seconds) of its setup-to-teardown.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

COLOURS = {"cluster": "#d62728", "integration": "#1f77b4", "unit": "#2ca02c"}
FAILED = "#000000"  # hatched over the bar of a failed test


def lanes(spans: list[dict]) -> dict[str, list[dict]]:
    """The spans of each worker, in start order, workers sorted by name (gw0, gw1, ... or main)."""
    by_worker: dict[str, list[dict]] = defaultdict(list)
    for span in sorted(spans, key=lambda s: s["start"]):
        by_worker[span["worker"]].append(span)
    return dict(sorted(by_worker.items()))


def summary(spans: list[dict]) -> dict[str, float]:
    """Wall time of the run and the seconds spent in each kind (summed over workers)."""
    t0, t1 = min(s["start"] for s in spans), max(s["stop"] for s in spans)
    busy: dict[str, float] = defaultdict(float)
    for span in spans:
        busy[span["kind"]] += span["stop"] - span["start"]
    return {"wall_s": t1 - t0, **{f"{kind}_s": busy[kind] for kind in COLOURS}}


def draw(spans: list[dict], out: Path, slowest: int = 8) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    t0 = min(s["start"] for s in spans)
    by_worker = lanes(spans)
    fig, ax = plt.subplots(figsize=(14, 1.2 + 0.9 * len(by_worker)))
    for row, items in enumerate(by_worker.values()):
        bars = [((s["start"] - t0) / 60, (s["stop"] - s["start"]) / 60) for s in items]
        colours = [COLOURS.get(s["kind"], "grey") for s in items]
        ax.broken_barh(bars, (row - 0.4, 0.8), facecolors=colours, edgecolors="white", linewidth=0.3)
        failed = [bar for bar, s in zip(bars, items, strict=True) if s.get("outcome") == "failed"]
        ax.broken_barh(failed, (row - 0.4, 0.8), facecolors="none", edgecolors=FAILED, hatch="xx")
    for span in sorted(spans, key=lambda s: s["start"] - s["stop"])[:slowest]:  # name the longest
        row = list(by_worker).index(span["worker"])
        name = span["test"].split("::")[-1].split("@")[0][:40]
        ax.text((span["start"] - t0) / 60, row + 0.45, name, fontsize=6, va="bottom")
    ax.set_yticks(range(len(by_worker)), list(by_worker))
    ax.set_xlabel("minutes since the first test started")
    ax.set_ylim(-0.6, len(by_worker) - 0.2 + 0.4)
    figures = summary(spans)
    ax.set_title(
        f"{len(spans)} tests in {figures['wall_s'] / 60:.1f} min; "
        + ", ".join(f"{kind} {figures[f'{kind}_s'] / 60:.1f} min" for kind in COLOURS)
    )
    handles = [Patch(color=c, label=k) for k, c in COLOURS.items()]
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("timeline", type=Path, help="the JSON the run wrote (AUTOSAM2_TEST_TIMELINE)")
    parser.add_argument("png", type=Path, help="where to write the figure")
    args = parser.parse_args(argv)
    spans = json.loads(args.timeline.read_text())
    draw(spans, args.png)
    print(json.dumps({k: round(v, 1) for k, v in summary(spans).items()}))


if __name__ == "__main__":
    main()
