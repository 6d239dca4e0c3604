"""What an evaluation or a prediction leaves for people, written as frames arrive: predicted masks in the
polyp_gen layout, 8-bit soft maps, overlays (a GIF + PNG sheet per sequence, an MP4 of every frame;
prediction red, truth outlined green), ``metrics.json`` / ``metrics.csv``, a table."""

from __future__ import annotations

import csv
import io
import json
import math
import os
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

import numpy as np
from PIL import Image

from autosam2.atomic import atomic_file, atomic_write_text
from autosam2.data.layouts.files import natural_key
from autosam2.data.video import Frame, LazyVideo
from autosam2.metrics import UNDEFINED

if TYPE_CHECKING:
    from autosam2.tracking.choice import Store
from autosam2.overlays import GIF_SIDE, VideoWriter, contact_sheet, overlay, write_gif

OVERLAY_FRAMES = 64  # frames of a sequence its GIF and sheet show, spread over it
MAX_LISTED = 20  # files or sequences named one a line in an error or warning, then "and N more"


def soft_map(prob_HW: np.ndarray) -> np.ndarray:
    """The 8-bit soft map of a probability map: probability x 255, truncated, as the SUN-SEG toolbox's
    own prediction scripts save theirs (so the sunseg metrics of the file are those of the map)."""
    return (np.clip(prob_HW, 0.0, 1.0) * 255).astype(np.uint8)


def frame_file(frame: Frame) -> str:
    """The file name of a frame's outputs: its own name (stem) or its zero-padded index."""
    return f"{frame.name or f'{frame.frame_index:05d}'}.png"


class FramePicker:
    """Which frames of a sequence a GIF or sheet shows: every frame of a short one, else at most `limit`
    spread evenly (over the known length; of an unknown one, every k-th, k doubling as it grows)."""

    def __init__(self, num_frames: int | None, limit: int = OVERLAY_FRAMES):
        self.limit = limit
        self.known = (
            None if num_frames is None else {int(i) for i in np.linspace(0, num_frames - 1, limit).round()}
        )
        self.stride = 1
        self.kept: list[tuple[int, Image.Image]] = []

    def wants(self, i: int) -> bool:
        return i in self.known if self.known is not None else i % self.stride == 0

    def keep(self, i: int, picture: Image.Image) -> None:
        self.kept.append((i, picture))
        if self.known is None and len(self.kept) > self.limit:
            self.stride *= 2
            self.kept = [(j, p) for j, p in self.kept if j % self.stride == 0]

    def pictures(self) -> list[Image.Image]:
        return [p for _, p in self.kept]


class PredictionWriter:
    """What predictions leave for people, written frame by frame (a `SequenceSink`): binary masks
    ``out/masks/<sequence>/<frame>.png`` (0/255) and 8-bit soft maps ``out/soft/<sequence>/<frame>.png``
    (re-scorable by `autosam2 score` or the official toolbox) when `masks`; with `overlays` a GIF and a
    PNG sheet per sequence in `overlay_dir` (default ``out/overlays``; prediction red, truth outlined
    green) of at most ``OVERLAY_FRAMES`` frames (`sheets`: the PNG too); with `video` an MP4 of every
    frame overlaid there; with `rows` (a folder) each sequence's frames are rows of ``<rows>/<sequence>.csv``
    (``FRAME_COLUMNS``, no header: `write_frames_csv` joins them). A sequence's folders, MP4 and table
    are written under temp names (``.<sequence>.tmp-<pid>``) and renamed when it ends, its GIF and sheet
    written whole: what bears a sequence's name is complete."""

    def __init__(
        self,
        out: Path,
        masks: bool = True,
        overlays: bool = True,
        video: bool = False,
        overlay_dir: Path | None = None,
        fps: float = 25.0,
        sheets: bool = True,
        rows: Path | None = None,
    ):
        self.out, self.masks, self.overlays, self.video = Path(out), masks, overlays, video
        self.sheets, self.rows = sheets, Path(rows) if rows is not None else None
        self._table: TextIO | None = None
        self.frames: dict[str, int] = {}  # frames written, by sequence
        self.overlay_dir = Path(overlay_dir) if overlay_dir else self.out / "overlays"
        self.fps = fps
        self._picker: FramePicker | None = None
        self._movie: VideoWriter | None = None
        self._count = 0

    def _dirs(self, video: LazyVideo, temp: bool = True) -> tuple[Path, Path]:
        name = _temp_name(video.video_id) if temp else video.video_id
        return self.out / "masks" / name, self.out / "soft" / name

    def _movie_path(self, video: LazyVideo, temp: bool = True) -> Path:
        return self.overlay_dir / f"{_temp_name(video.video_id) if temp else video.video_id}.mp4"

    def _table_path(self, video: LazyVideo, temp: bool = True) -> Path:
        return self.rows / f"{_temp_name(video.video_id) if temp else video.video_id}.csv"

    def _written(self, video: LazyVideo) -> list[tuple[Path, Path]]:
        """(temp, final) of what this writer writes of a sequence under a temp name."""
        pairs = list(zip(self._dirs(video), self._dirs(video, False), strict=True)) if self.masks else []
        if self.video:
            pairs.append((self._movie_path(video), self._movie_path(video, False)))
        if self.rows is not None:
            pairs.append((self._table_path(video), self._table_path(video, False)))
        return pairs

    def begin(self, video: LazyVideo) -> None:
        if self.masks:
            for folder in self._dirs(video):
                folder.mkdir(parents=True, exist_ok=True)
        if self.overlays or self.video:
            self.overlay_dir.mkdir(parents=True, exist_ok=True)
        self._picker = FramePicker(video.num_frames) if self.overlays else None
        fps = float(video.metadata.get("fps") or self.fps)
        self._movie = VideoWriter(self._movie_path(video), video.size, fps) if self.video else None
        self._count = 0
        if self.rows is not None:
            self._table = open(self._table_path(video), "w", newline="")

    def frame(self, video: LazyVideo, frame: Frame, prob_HW: np.ndarray, presence: float) -> None:
        i, self._count = self._count, self._count + 1
        self.frames[video.video_id] = self._count
        mask = prob_HW >= 0.5
        if self.masks:
            mask_dir, soft_dir = self._dirs(video)
            name = frame_file(frame)
            # zlib's fastest level: a quarter of the time of the default on noisy maps, lossless all the same
            Image.fromarray(mask.astype(np.uint8) * 255).save(mask_dir / name, compress_level=1)
            Image.fromarray(soft_map(prob_HW)).save(soft_dir / name, compress_level=1)
        if self._table is not None:
            csv.writer(self._table).writerow(
                [video.video_id, Path(frame_file(frame)).stem, f"{presence:.4f}", int(mask.sum())]
            )
        if (self._picker and self._picker.wants(i)) or self._movie:
            gt = frame.object_mask().numpy() if frame.objects else None
            picture = overlay(frame.image_CHW.permute(1, 2, 0).cpu().numpy(), mask, gt, frame.name)
            if self._movie:
                self._movie.write(picture)
            if self._picker and self._picker.wants(i):
                picture.thumbnail((GIF_SIDE, GIF_SIDE))
                self._picker.keep(i, picture)

    def end(self, video: LazyVideo) -> None:
        if self._table is not None:
            self._table.close()
            self._table = None
        if self._movie:
            self._movie.close()
            self._movie = None
        for temp, final in self._written(video):
            if final.is_dir():  # an earlier run's, stopped part way
                shutil.rmtree(final)
            os.replace(temp, final)
        if self._picker and self._picker.kept:
            pictures = self._picker.pictures()
            write_gif(pictures, self.overlay_dir / f"{video.video_id}.gif")
            if self.sheets:
                with atomic_file(self.overlay_dir / f"{video.video_id}.png") as sheet:
                    # fast zlib: 1/6 of the time, +16 % size
                    contact_sheet(pictures).save(sheet, format="PNG", compress_level=1)
        self._picker = None

    def discard(self, video: LazyVideo) -> None:
        if self._movie:
            self._movie.abort()
            self._movie = None
        self._picker = None
        if self._table is not None:
            self._table.close()
            self._table = None
        self.frames.pop(video.video_id, None)
        for temp, _ in self._written(video):
            shutil.rmtree(temp, ignore_errors=True) if temp.is_dir() else temp.unlink(missing_ok=True)


def _temp_name(name: str) -> str:
    """The name a sequence's output has while it is written (hidden; removed by a resume if left)."""
    return f".{name}.tmp-{os.getpid()}"


FRAME_COLUMNS = ("sequence", "frame", "presence", "polyp_pixels")  # frames.csv: a row per frame


def write_frames_csv(out: Path, rows: Path, sequences: Sequence[str]) -> None:
    """``out/frames.csv``: the header, then the rows of each of `sequences` in this order (their
    PredictionWriter tables under `rows`), copied through, never held in memory whole."""
    with atomic_file(out / "frames.csv") as f:
        f.write((",".join(FRAME_COLUMNS) + "\r\n").encode())  # csv's own line ending, as the rows have
        for name in sequences:
            with open(rows / f"{name}.csv", "rb") as table:
                shutil.copyfileobj(table, f)


def remove_unfinished(out: Path, finished: set[str]) -> None:
    """Remove what a PredictionWriter left in `out` of sequences not in `finished` (a run stopped part
    way through one): their masks, soft maps and overlays."""
    for kind in ("masks", "soft"):
        for folder in (out / kind).iterdir() if (out / kind).is_dir() else []:
            if folder.name not in finished:
                shutil.rmtree(folder) if folder.is_dir() else folder.unlink()
    overlays = out / "overlays"
    for path in overlays.iterdir() if overlays.is_dir() else []:
        if path.stem not in finished or path.suffix not in (".gif", ".png", ".mp4"):
            path.unlink()


def listed(lines: list[str], cap: int = MAX_LISTED) -> list[str]:
    """`lines`, the first `cap` of them, then one saying how many more there are."""
    if len(lines) <= cap:
        return list(lines)
    return [*lines[:cap], f"... and {len(lines) - cap} more"]


def say_left_out(left_out: dict[str, str], file: TextIO | None = None) -> None:
    """A warning naming each sequence left out of the metrics, and why (on `file`, default the stderr of
    the moment)."""
    for line in listed([f"{name}: {why}; not scored" for name, why in left_out.items()]):
        print(f"warning: {line}", file=file or sys.stderr, flush=True)


def scored_line(frames: dict[str, int], left_out: dict[str, str], how: str = "scored") -> str:
    """``N sequences <how>, F frames[; M left out: name: why; ...]`` for a command's last line."""
    n = sum(1 for count in frames.values() if count)
    line = f"{n} sequence{'s' if n != 1 else ''} {how}, {sum(frames.values())} frames"
    if left_out:
        named = "; ".join(listed([f"{name}: {why}" for name, why in left_out.items()]))
        line += f"; {len(left_out)} left out: {named}"
    return line


def undefined_figures(
    per_sequence: dict[str, dict[str, float]], summary: dict[str, float]
) -> dict[str, dict[str, str]]:
    """Why each undefined (NaN or infinite) figure is so, by metric, then row (a sequence, or ``mean``)."""
    rows = {**per_sequence, "mean": summary}
    found: dict[str, dict[str, str]] = {}
    for row, figures in rows.items():
        for name, value in figures.items():
            if not math.isfinite(value):
                found.setdefault(name, {})[row] = UNDEFINED.get(name, "not a finite number")
    return found


def _finite_or_none(figures: dict[str, float]) -> dict[str, float | None]:
    return {k: v if math.isfinite(v) else None for k, v in figures.items()}


def write_metrics(
    out: Path,
    per_sequence: dict[str, dict[str, float]],
    summary: dict[str, float],
    extra: dict[str, Any],
    columns: Sequence[str] | None = None,
) -> None:
    """``metrics.json`` (summary, per sequence, `extra`) and ``metrics.csv`` (a row per sequence, then the
    mean; `columns` in this order, default all in name order). The JSON is strict: an undefined figure is
    null, and ``"undefined"`` says why, by metric and row (``mean``: the summary); the CSV writes it
    ``nan``."""
    payload = {
        "summary": _finite_or_none(summary),
        "per_sequence": {name: _finite_or_none(m) for name, m in per_sequence.items()},
        **extra,
    }
    undefined = undefined_figures(per_sequence, summary)
    if undefined:
        payload["undefined"] = undefined
    atomic_write_text(
        out / "metrics.json", json.dumps(payload, indent=1, sort_keys=True, allow_nan=False) + "\n"
    )
    keys = list(columns) if columns else sorted(summary)
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["sequence", *keys])
    for name in sorted(per_sequence):
        writer.writerow([name, *(f"{per_sequence[name].get(k, float('nan')):.6f}" for k in keys)])
    writer.writerow(["mean", *(f"{summary[k]:.6f}" for k in keys)])
    atomic_write_text(out / "metrics.csv", buf.getvalue())


def _cell(value: float, width: int) -> str:
    return f"{value:{width}.3f}" if math.isfinite(value) else f"{'-':>{width}}"


def print_table(
    per_sequence: dict[str, dict[str, float]],
    summary: dict[str, float],
    columns: Sequence[str] = ("dice", "iou"),
    file: TextIO | None = None,
) -> None:
    """A row per sequence (natural order of names), then the summary; one column per metric. An
    undefined figure shows as ``-``, with a line under the table saying why. `file`: default the stdout
    of the moment (print's own default, never the one of import time)."""
    width = max(8, *(len(n) for n in per_sequence))
    widths = [max(6, len(c)) for c in columns]
    print(
        f"{'sequence':<{width}}  " + "  ".join(f"{c:>{w}}" for c, w in zip(columns, widths, strict=True)),
        file=file,
    )
    rows = [(name, per_sequence[name]) for name in sorted(per_sequence, key=natural_key)]
    for name, m in [*rows, ("mean", summary)]:
        print(
            f"{name:<{width}}  " + "  ".join(_cell(m[c], w) for c, w in zip(columns, widths, strict=True)),
            file=file,
        )
    undefined = undefined_figures(per_sequence, summary)
    for name in (c for c in columns if c in undefined):
        where = sorted(undefined[name], key=natural_key)
        print(f"-: {name} undefined ({', '.join(where)}): {undefined[name][where[0]]}", file=file)


def log_scores(
    out: Path,
    store: Store,
    run_name: str,
    params: dict[str, Any],
    summary: dict[str, float],
    tags: dict[str, str] | None = None,
) -> None:
    """Scores written into `out` as their own MLflow run in `store` (`autosam2.tracking.choice`): the
    params, `tags` and `out` (``output_dir``), the summary as ``eval/...``, metrics.json, metrics.csv and
    overlays/ when `out` holds it. Records the store did not take are kept in ``out/tracking`` with the
    store's record, for `autosam2 sync out`; when all went, that folder goes."""
    from autosam2.tracking import OUTPUT_TAG, make_logger
    from autosam2.tracking.outbox import FOLDER

    spool = out / FOLDER
    logger = make_logger(
        0,
        True,
        store.uri,
        store.experiment,
        run_name=run_name,
        system_metrics=False,
        spool_dir=spool,
        work="scoring",
    )
    try:
        logger.log_params(params)
        logger.set_tags({OUTPUT_TAG: str(out.resolve()), **(tags or {})})
        logger.log_metrics({f"eval/{k}": v for k, v in summary.items()}, step=0)
        for name in ("metrics.json", "metrics.csv"):
            logger.log_artifact(out / name)
        if (out / "overlays").is_dir():
            logger.log_artifact(out / "overlays")
    finally:
        logger.close()
        _keep_unsent(spool, out, store)


def _keep_unsent(spool: Path, out: Path, store: Store) -> None:
    """The outbox of a scoring run removed once the store took every record; else kept, with the store it
    is for recorded beside it (`autosam2 sync` reads it there)."""
    from autosam2.tracking.choice import record_store
    from autosam2.tracking.outbox import OUTBOX, Outbox

    if not (spool / OUTBOX).is_file():
        shutil.rmtree(spool, ignore_errors=True)
        return
    outbox = Outbox(spool)
    left = outbox.unsent()
    outbox.close()
    if left:
        record_store(out, store)
    else:
        shutil.rmtree(spool, ignore_errors=True)
