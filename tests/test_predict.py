"""`autosam2 predict` and the lazy, bounded-memory reading evaluation shares with it: video files and
frame folders give the same masks, bad input is one line naming the file, a long sequence keeps only a
bounded number of frames alive, and a sequence that breaks part way is forgotten whole."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
import weakref
from collections.abc import Sequence
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from PIL import Image

from autosam2.data.video import Frame, LazyVideo
from autosam2.errors import DatasetError
from tests.helpers import TORCHRUN_2

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model(weights):
    from autosam2.model.weights import load_trained_model

    return load_trained_model(weights, None, torch.device("cpu"))[0]


def predict(*args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "autosam2.cli", "predict", *args, "--cpu"]
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)


def write_lossless_video(frames: list[Path], path: Path, fps: int = 10) -> None:
    """The frames as a lossless RGB H.264 video: decoded, it gives back their very pixels."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264rgb", rate=fps)
        first = np.asarray(Image.open(frames[0]).convert("RGB"))
        stream.height, stream.width = first.shape[:2]
        stream.pix_fmt, stream.options = "rgb24", {"qp": "0"}
        for path_ in frames:
            pixels = np.asarray(Image.open(path_).convert("RGB"))
            for packet in stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def pngs(folder: Path) -> list[bytes]:
    return [p.read_bytes() for p in sorted(folder.glob("*.png"), key=lambda p: p.name)]


def test_a_video_file_gives_the_masks_of_its_frames_folder(tmp_path, tiny_root, weights):
    frames_dir = tiny_root / "valid" / "images" / "seq3"
    frames = sorted(frames_dir.glob("*.jpg"), key=lambda p: int(p.stem.removeprefix("frame")))
    write_lossless_video(frames, tmp_path / "clip.mkv")
    shutil_copy = tmp_path / "clip"
    shutil_copy.mkdir()
    for i, path in enumerate(frames):  # the same frames as a folder, named as a video's frames are
        (shutil_copy / f"{i:05d}.jpg").write_bytes(path.read_bytes())

    done = predict(str(tmp_path / "clip.mkv"), "--weights", str(weights), "--output-dir", str(tmp_path / "v"))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "clip: 12 frames" in done.stderr and "(1 sequence(s), 12 frames)" in done.stdout
    done = predict(str(shutil_copy), "--weights", str(weights), "--output-dir", str(tmp_path / "f"))
    assert done.returncode == 0, done.stderr[-3000:]

    for kind in ("masks", "soft"):
        from_video, from_folder = pngs(tmp_path / "v" / kind / "clip"), pngs(tmp_path / "f" / kind / "clip")
        assert len(from_video) == len(frames) and from_video == from_folder
    masks = [np.asarray(Image.open(p)) for p in sorted((tmp_path / "v" / "masks" / "clip").glob("*.png"))]
    assert all(set(np.unique(m)) <= {0, 255} for m in masks)
    rows = list(csv.DictReader((tmp_path / "v" / "frames.csv").open()))
    assert [r["frame"] for r in rows] == [f"{i:05d}" for i in range(len(frames))]
    assert [int(r["polyp_pixels"]) for r in rows] == [int((m > 0).sum()) for m in masks]
    assert all(0.0 <= float(r["presence"]) <= 1.0 for r in rows)
    with av.open(str(tmp_path / "v" / "overlays" / "clip.mp4")) as container:
        rate = float(container.streams.video[0].average_rate)
        decoded = list(container.decode(video=0))
    assert len(decoded) == len(frames) and (decoded[0].height, decoded[0].width) == (64, 64)
    assert rate == 10  # the source's
    assert (tmp_path / "v" / "overlays" / "clip.gif").stat().st_size > 0


def test_a_folder_of_sequences_and_videos_is_one_sequence_each(tmp_path, tiny_root, weights):
    images = tiny_root / "train" / "images"
    write_lossless_video(sorted((images / "seq1").glob("*.jpg"))[:5], images / "extra.mkv")
    (images / "notes.txt").write_text("not a frame")
    out = tmp_path / "out"
    done = predict(str(images), "--weights", str(weights), "--output-dir", str(out), "--no-video")
    assert done.returncode == 0, done.stderr[-3000:]
    sequences = sorted(p.name for p in (out / "masks").iterdir())
    assert sequences == ["extra", "seq1", "seq2"]
    assert len(list((out / "masks" / "extra").glob("*.png"))) == 5
    assert not list((out / "overlays").glob("*.mp4"))


@pytest.mark.parametrize("case", ["not_video", "corrupt_video", "empty_folder", "odd_frame", "missing"])
def test_bad_input_is_one_line_naming_the_file_and_leaves_no_output(tmp_path, tiny_root, weights, case):
    frames = tiny_root / "valid" / "images" / "seq3"
    target, expected = {
        "not_video": (tmp_path / "notes.txt", "notes.txt: not a video file"),
        "corrupt_video": (tmp_path / "broken.mp4", "broken.mp4: cannot read video"),
        "empty_folder": (tmp_path / "empty", "empty: holds no frames"),
        "odd_frame": (frames, "frame7.jpg: frame is 32x32, the sequence started at 64x64"),
        "missing": (tmp_path / "nope", "nope: no such file or folder"),
    }[case]
    if case == "not_video":
        target.write_text("hello")
    elif case == "corrupt_video":
        target.write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 20)
    elif case == "empty_folder":
        target.mkdir()
    elif case == "odd_frame":
        Image.new("RGB", (32, 32)).save(frames / "frame7.jpg")
    out = tmp_path / "out"
    done = predict(str(target), "--weights", str(weights), "--output-dir", str(out))
    assert done.returncode == 1
    assert expected in done.stderr and "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) <= 3  # the error (and a frame already done, at most)
    assert not out.exists() and not list(tmp_path.glob(".out.tmp-*"))


def _counted_sequence(name: str, n: int, size: int, live: set[int], stats: dict[str, int]) -> LazyVideo:
    """A synthetic sequence of `n` frames decoded on demand, each frame's life watched."""

    def read():
        rng = np.random.default_rng(0)
        for i in range(n):
            image = torch.from_numpy(rng.integers(0, 255, (3, size, size), dtype=np.uint8))
            frame = Frame(i, image, [], name=f"f{i}")
            live.add(i)
            weakref.finalize(frame, live.discard, i)
            stats["read"] += 1
            stats["most_alive"] = max(stats["most_alive"], len(live))
            yield frame

    return LazyVideo(name, (size, size), n, read)


def test_a_long_sequence_keeps_a_bounded_number_of_frames_alive(tmp_path, model):
    """Frames in flight (read ahead, in an encoder batch, waiting to be written) are bounded by the
    pipeline's depths, not by the sequence's length; nothing holds on to a frame once it is written."""
    from autosam2.eval.inference import READ_AHEAD, WRITE_BEHIND, evaluate_sequences
    from autosam2.eval.report import OVERLAY_FRAMES, PredictionWriter

    bound = READ_AHEAD + WRITE_BEHIND + 2 * 4 + 4  # + an encoder batch of 4 on each side of the model
    for n in (20, 150):
        live: set[int] = set()
        stats = {"read": 0, "most_alive": 0}
        out = tmp_path / f"n{n}"
        metrics = evaluate_sequences(
            model,
            [_counted_sequence("long", n, 64, live, stats)],
            torch.device("cpu"),
            encode_batch=4,
            sink=PredictionWriter(out),
        )
        assert stats["read"] == n and metrics.frame_counts() == {"long": n}
        assert stats["most_alive"] <= min(n, bound), stats
        assert len(list((out / "masks" / "long").glob("*.png"))) == n
        sheet = Image.open(out / "overlays" / "long.png")  # a sheet of at most OVERLAY_FRAMES tiles
        assert sheet.height <= -(-min(n, OVERLAY_FRAMES) // 8) * 160
        assert Image.open(out / "overlays" / "long.gif").n_frames == min(n, OVERLAY_FRAMES)


@pytest.mark.parametrize("source", ["shards", "folder"])
def test_a_sequence_broken_part_way_is_forgotten_whole(
    tmp_path, tiny_root, tiny_shards, model, capsys, source
):
    """Under on_error=skip, a frame that cannot be decoded after others were written drops the whole
    sequence: no metrics, no files; the other sequences are scored as if it had never been there."""
    from autosam2.data.sources import read_sequences
    from autosam2.eval.inference import evaluate_sequences
    from autosam2.eval.report import PredictionWriter
    from tests.helpers import rewrite_tar, truncate

    if source == "shards":
        rewrite_tar(
            tiny_shards["train"] / "train-000-00000.tar",
            lambda n, d: b"junk" if n == "seq1__00001.f0002.jpg" else d,
        )
        data = tiny_shards["train"]
    else:
        truncate(tiny_root / "train" / "images" / "seq1" / "frame9.jpg")
        data = tiny_root
    with pytest.raises(DatasetError, match="seq1"):
        evaluate_sequences(model, read_sequences(data, "train", 0, 1), torch.device("cpu"))
    out = tmp_path / "out"
    metrics = evaluate_sequences(
        model,
        read_sequences(data, "train", 0, 1, on_error="skip"),
        torch.device("cpu"),
        sink=PredictionWriter(out),
    )
    assert list(metrics.per_sequence()) == ["seq2"]
    assert sorted(p.name for p in (out / "masks").iterdir()) == ["seq2"]
    assert sorted(p.name for p in (out / "soft").iterdir()) == ["seq2"]
    assert not (out / "overlays" / "seq1.gif").exists()
    err = capsys.readouterr().err
    assert err.count("warning: skipped") == 1 and "seq1" in err


def files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.slow
def test_two_ranks_write_what_one_writes_and_a_resume_finishes_what_a_stop_left(tmp_path, tiny_root, weights):
    """Under torchrun the ranks split the sequences and rank 0 writes frames.csv: the same files as one
    rank. A folder left by a stop (a sequence not finished: its part-written outputs, no record, no
    frames.csv) goes on with --resume to those files again."""
    videos = tmp_path / "videos"
    for split, name in (("train", "seq1"), ("train", "seq2"), ("valid", "seq3")):
        shutil.copytree(tiny_root / split / "images" / name, videos / name)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # torchrun's own: equal float sums on 1 and 2 ranks

    def run(out: Path, *more: str, ranks: Sequence[str] = (sys.executable,)) -> subprocess.CompletedProcess:
        args = ["-m", "autosam2.cli", "predict", str(videos), "--weights", str(weights), "--cpu"]
        command = [*ranks, *args, "--no-overlay-video", "--output-dir", str(out), *more]
        return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)

    one, two, stopped = tmp_path / "one", tmp_path / "two", tmp_path / "stopped"
    for done in (run(one), run(two, ranks=TORCHRUN_2)):
        assert done.returncode == 0, done.stderr[-3000:]
        assert "(3 sequence(s), 36 frames)" in done.stdout
    assert "ranks: 0 " in done.stdout and ", 1 " in done.stdout
    assert files(two) == files(one)  # masks, soft maps, overlays, frames.csv, records
    assert len((one / "frames.csv").read_text().splitlines()) == 1 + 36

    shutil.copytree(one, stopped)
    progress = json.loads((stopped / "progress.json").read_text())
    (stopped / "progress.json").write_text(json.dumps({**progress, "finished": False}))
    for left in ("frames.csv", "sequences/seq2.json", "sequences/seq2.csv", "overlays/seq2.png"):
        (stopped / left).unlink()
    (stopped / "overlays" / "seq2.gif").write_bytes(b"GIF89a")  # cut short
    (stopped / "masks" / "seq2" / "frame99.png").write_bytes(b"?")
    (stopped / "sequences" / ".seq2.csv.tmp-123").write_text("seq2,frame1,0.5,3\r\n")
    refused = run(stopped)
    assert (
        refused.returncode == 1 and "holds predictions, unfinished (2 sequences finished)" in refused.stderr
    )
    done = run(stopped, "--resume")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "predict: 1/1 sequences (seq2: 12 frames)" in done.stderr
    assert "(3 sequence(s), 36 frames)" in done.stdout and files(stopped) == files(one)
