"""Host memory of long videos: peak RSS of `autosam2 evaluate` (a polyp_gen sequence) and `autosam2
predict` (an MP4 file) over sequences of several lengths, each run in its own process.

A sequence of N frames is built from a short synthetic one played back and forth (hard links, so a
5,000-frame sequence costs no generation time); the video file is the same frames encoded once. The
model is random-init (the memory of a trained one is the same). Peak RSS is the kernel's high-water
mark of each command's process (``wait4``'s ``ru_maxrss``); the ratio is the highest over the lowest.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from autosam2.arguments import add_device, positive_int
from autosam2.data.layouts.polyp_gen import LIST_FILES
from autosam2.data.synthetic import SynthSpec, write_dataset


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--lengths",
        type=_lengths,
        default="100,1000,5000",
        help="sequence lengths in frames (comma-separated)",
    )
    p.add_argument("--size", type=positive_int, default=256, help="frame side in pixels (default 256)")
    p.add_argument(
        "--image-size", type=positive_int, default=256, help="the model's input size (default 256)"
    )
    p.add_argument("--variant", default="hiera_t")
    p.add_argument(
        "--commands",
        type=_commands,
        default="evaluate,predict",
        help="which commands to measure (evaluate, predict)",
    )
    add_device(
        p,
        "auto",
        gpu_help="run the commands on GPU N (default: a GPU if there is one)",
        cpu_help="run the commands on the CPU even with a GPU",
    )
    p.add_argument("--keep", type=Path, default=None, help="keep the data and outputs in this folder")


def _device_flags(request: str) -> list[str]:
    """The commands' device flags for a device request (``auto``, ``cpu``, ``cuda``, ``cuda:N``)."""
    if request == "cpu" or not torch.cuda.is_available():
        return ["--cpu"]
    return ["--gpu", request.split(":")[1]] if ":" in request else []


def _lengths(text: str) -> list[int]:
    return [positive_int(n) for n in text.split(",")]


def _commands(text: str) -> list[str]:
    names = text.split(",")
    unknown = [n for n in names if n not in ("evaluate", "predict")]
    if unknown:
        raise argparse.ArgumentTypeError(f"{', '.join(unknown)}: not evaluate or predict")
    return names


def _long_root(base: Path, size: int, lengths: list[int]) -> Path:
    """A polyp_gen root whose valid split holds one sequence per length (``long<N>``), hard-linked
    from a 48-frame synthetic sequence played forwards and backwards."""
    source = base / "source"
    write_dataset(source, SynthSpec(train_sequences=1, valid_sequences=1, frames=48, size=size, seed=0))
    short = sorted((source / "valid" / "images").iterdir())[0].name
    n = 48
    cycle = [*range(n), *range(n - 2, 0, -1)]  # 0..47..1: no jump back to the start
    root = base / "long"
    for length in lengths:
        for kind in ("images", "masks"):
            folder = root / "valid" / kind / f"long{length}"
            folder.mkdir(parents=True)
            for i in range(length):
                os.link(
                    source / "valid" / kind / short / f"frame{cycle[i % len(cycle)] + 1}.jpg",
                    folder / f"{i:05d}.jpg",
                )
    (root / "valid" / LIST_FILES["valid"]).write_text("".join(f"long{n}\n" for n in lengths))
    return root


def _video_file(root: Path, name: str, path: Path) -> Path:
    from autosam2.overlays import VideoWriter

    frames = sorted((root / "valid" / "images" / name).iterdir())
    first = Image.open(frames[0])
    writer = VideoWriter(path, (first.height, first.width), 25.0)
    for frame in frames:
        writer.write(Image.open(frame))
    writer.close()
    return path


def _peak_rss(command: list[str]) -> tuple[int, float]:
    """(peak RSS in bytes, seconds) of one command in its own process; its error text on failure."""
    start = time.perf_counter()
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    assert proc.stderr is not None
    err = proc.stderr.read()  # until it exits: the pipe never fills
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(command[:4])} ... failed ({proc.returncode}): {err.strip()[-2000:]}")
    return usage.ru_maxrss * 1024, time.perf_counter() - start  # Linux reports KiB


def run(args: argparse.Namespace) -> dict[str, Any]:
    from autosam2.errors import OutputRefused

    lengths, commands = args.lengths, args.commands
    if args.keep is not None and args.keep.exists() and (not args.keep.is_dir() or any(args.keep.iterdir())):
        raise OutputRefused(f"{args.keep}: --keep needs a new or empty folder (this one holds something)")
    base = args.keep or Path(tempfile.mkdtemp(prefix="autosam2-longvideo-"))
    base.mkdir(parents=True, exist_ok=True)
    try:
        table, device = _measure(args, base, lengths, commands)
    finally:
        if not args.keep:
            shutil.rmtree(base, ignore_errors=True)
    ratios = {
        c: round(max(r["peak_rss_mb"] for r in t.values()) / min(r["peak_rss_mb"] for r in t.values()), 3)
        for c, t in table.items()
    }
    return {
        "bench": "longvideo",
        "peak_rss": table,
        "ratio_highest_over_lowest": ratios,
        "config": {
            "lengths": lengths,
            "frame_size": args.size,
            "image_size": args.image_size,
            "variant": args.variant,
            "device": "cpu" if device == ["--cpu"] else "cuda" + (f":{device[1]}" if device else ""),
            "torch_threads": torch.get_num_threads(),
            "cpu_count": os.cpu_count(),
            "kept": str(base) if args.keep else None,
        },
        "note": "peak RSS of each command's own process (ru_maxrss); ratio = max / min over the lengths",
    }


def _measure(
    args: argparse.Namespace, base: Path, lengths: list[int], commands: list[str]
) -> tuple[dict[str, Any], list[str]]:
    """Peak RSS and time of each command on a video of each length, all under `base`."""
    from autosam2.bench.common import model_config
    from autosam2.model.sam2_builder import build_autosam2
    from autosam2.model.weights import save_weights

    root = _long_root(base, args.size, lengths)
    cfg = model_config(args.variant, args.image_size)
    torch.manual_seed(0)
    save_weights(base / "w.pt", build_autosam2(cfg, torch.device("cpu")), cfg, base=None)
    cli = [sys.executable, "-m", "autosam2.cli"]
    device = _device_flags(args.device)
    table: dict[str, dict[str, Any]] = {c: {} for c in commands}
    for n in lengths:
        name = f"long{n}"
        one = base / f"only-{name}"  # a root holding just this sequence, for evaluate
        (one / "valid").mkdir(parents=True)
        for kind in ("images", "masks"):
            (one / "valid" / kind).mkdir()
            (one / "valid" / kind / name).symlink_to(root / "valid" / kind / name)
        (one / "valid" / LIST_FILES["valid"]).write_text(f"{name}\n")
        runs = {}
        if "evaluate" in commands:
            runs["evaluate"] = [*cli, "evaluate", "--data", str(one), "--metric-mode", "sunseg"]
        if "predict" in commands:
            runs["predict"] = [*cli, "predict", str(_video_file(root, name, base / f"{name}.mp4"))]
        for command, argv in runs.items():
            argv += ["--weights", str(base / "w.pt"), "--output-dir", str(base / f"{command}-{n}"), *device]
        for command in commands:
            rss, seconds = _peak_rss(runs[command])
            table[command][str(n)] = {
                "peak_rss_mb": round(rss / 2**20, 1),
                "seconds": round(seconds, 1),
                "frames_per_s": round(n / seconds, 2),
            }
    return table, device
