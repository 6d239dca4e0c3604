"""The fault matrix of docs/troubleshooting.md: every command that writes a folder, run against each fault
case in a fresh folder, each outcome judged by the contract alone (not by its wording): exit status not 0,
at most one error line, no traceback, the input and an unrelated folder byte for byte as they were, and
nothing left behind (no output, no temp folder, no parent folder made). Needs root (tmpfs mounts).

    python -m tests.fault_matrix [--json FILE]     # from the checkout to measure (PYTHONPATH=.)

Prints one row per command (cases that held / cases tried) and the failing cases.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

PY = [sys.executable]
CASES = ("unrelated folder", "the input", "inside the input", "holding the input", "a file", "missing input")
DISKS = ("full disk", "read-only disk")


def digest(root: Path) -> dict[str, str]:
    paths = [root, *sorted(root.rglob("*"))] if root.is_dir() else [root] if root.exists() else []
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir" for p in paths}


def commands(box: Path, weights: Path) -> dict[str, tuple[Path, list[str], bool]]:
    """name -> (its input, its argv with {out} for the output path, whether it has an input)."""
    data, cli = box / "polyp_gen", [*PY, "-m", "autosam2.cli"]
    frames, gt = data / "valid" / "images" / "seq3", data / "valid" / "masks"
    build = [*PY, "-m", "shards", "build", str(data), "--split", "valid", "--out", "{out}", "--overwrite"]
    model = ["--weights", str(weights), "--cpu", "--overwrite", "--output-dir", "{out}"]
    return {
        "shards build": (data, [*build, "--workers", "1"], True),
        "shards build --workers 2": (data, [*build, "--workers", "2", "--max-shard-mb", "0.001"], True),
        "shards build (array part)": (data, [*build, "--shard-index", "0", "--num-shards", "2"], True),
        "synth": (
            data,
            [*cli, "synth", "--out", "{out}", "--sequences", "1", "--size", "64", "--overwrite"],
            False,
        ),
        "evaluate": (data, [*cli, "evaluate", "--data", str(data), *model], True),
        "predict": (frames, [*cli, "predict", str(frames), *model], True),
        "score": (
            gt,
            [*cli, "score", "--pred", str(gt), "--gt", str(gt), "--output-dir", "{out}", "--overwrite"],
            True,
        ),
        "launch shard": (
            data,
            [*PY, "-m", "launch", "shard", "--cluster", "local", "--num-shards", "2", "--", *build[4:]],
            True,
        ),
    }


def _mount(path: Path, options: str) -> None:
    path.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], check=True)


def _place(case: str, tmp: Path, source: Path, box: Path) -> Path:
    if case in DISKS:
        disk = tmp / "disk"
        _mount(disk, "size=1m" if case == "full disk" else "ro,size=1m")
        if case == "full disk":
            (disk / "filler").write_bytes(b"\0" * (1024 * 1024 - 2048))
        return disk / "new" / "out"
    (tmp / "mine").mkdir()
    (tmp / "mine" / "notes.txt").write_text("a week of notes")
    (tmp / "afile").write_text("not a folder")
    return {
        "unrelated folder": tmp / "mine",
        "the input": source,
        "inside the input": source / "sub",
        "holding the input": box,
        "a file": tmp / "afile",
        "missing input": tmp / "out",
    }[case]


def judge(case: str, argv: list[str], source: Path, tmp: Path, box: Path) -> str | None:
    """None when the case held the contract, else what broke it."""
    out = _place(case, tmp, source, box)
    if case == "missing input":
        shutil.rmtree(source)
    before = digest(tmp)
    try:
        done = subprocess.run(
            [a.replace("{out}", str(out)) for a in argv], capture_output=True, text=True, timeout=600
        )
        after = digest(tmp)
    finally:
        if case in DISKS:
            subprocess.run(["umount", "-l", str(tmp / "disk")], check=False)
    lines = [
        line
        for line in done.stderr.splitlines()
        if line.strip() and "%|" not in line and "elapsed" not in line
    ]
    if done.returncode == 0:
        return "exit status 0"
    if "Traceback" in done.stderr:
        return f"traceback ({len(done.stderr.splitlines())} lines): {lines[-1][:120] if lines else ''}"
    if len(lines) > 1:
        return f"{len(lines)} lines: {lines[0][:100]} ..."
    if after != before:
        changed = sorted(set(after) ^ set(before) | {k for k in after if after.get(k) != before.get(k)})
        return f"changed or left behind: {', '.join(Path(c).name for c in changed[:3])}"
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.fault_matrix", description=__doc__.split("\n")[0])
    parser.add_argument("--json", type=Path, default=None, help="write every outcome here too")
    args = parser.parse_args(argv)
    from autosam2.config import load_config
    from autosam2.data.synthetic import write_dataset
    from tests.helpers import TINY

    work = Path(tempfile.mkdtemp(prefix="fault-matrix-"))
    import torch

    from autosam2.model.sam2_builder import build_autosam2
    from autosam2.model.weights import RunWeights

    cfg = load_config(None, ["model.image_size=64"])
    torch.manual_seed(0)
    RunWeights(work, build_autosam2(cfg.model, torch.device("cpu")), cfg.model, True).save("w.pt", 0)
    write_dataset(work / "pristine", TINY)
    results: dict[str, dict[str, str | None]] = {}
    for name in commands(work, work / "w.pt"):
        results[name] = {}
        for case in (*CASES, *DISKS):
            tmp = work / "case"
            box = tmp / "box"
            box.mkdir(parents=True)
            shutil.copytree(work / "pristine", box / "polyp_gen")
            source, call, has_input = commands(box, work / "w.pt")[name]
            if has_input or case in ("unrelated folder", "a file", *DISKS):
                results[name][case] = judge(case, call, source, tmp, box)
            shutil.rmtree(tmp)
        held = [c for c, r in results[name].items() if r is None]
        print(f"{name:28} {len(held)}/{len(results[name])}", flush=True)
        for case, why in results[name].items():
            if why is not None:
                print(f"    {case}: {why}", flush=True)
    shutil.rmtree(work)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
