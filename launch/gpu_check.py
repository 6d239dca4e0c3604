"""The device check behind `make gpu-check`: a wheelhouse built here, the GPU path measured there.

A device machine has its own Python and torch and no package registry, and is lent for minutes. So:
- `wheels` (here): the wheelhouse of `launch/wheelhouse.py`, every package the project needs that the
  device image lacks, for the device's Python;
- `run` (there, after `launch/gpu_check.sh` installed them): the parts of `launch/gpu_parts.py`'s `PARTS`, one after the other
  (`pytest -m gpu`, training throughput and peak memory of the two GPU configs against `bench memory`'s
  estimate, `bench infer` eager and compiled, the data path, JPEG decoding), each within its time limit;
  one JSON (rewritten after every part, so a timeout keeps what was measured) and the log under `--out`,
  then the summary, judged against its `GOALS`, and a table;
- `dry-run` (here, in CI): the same wheels built for this Python, installed into a stand-in for the
  device image (a bare venv that sees only the image's packages, taken from this venv), and `run` in it
  on the CPU at tiny sizes, so neither the wheel list nor the check can rot between loans;
- `parts`: the parts and goals as a Markdown table, for the docs.

Only the standard library is imported at module level: `run` starts before anything is importable.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from launch.gpu_parts import PARTS, Part, Plan, last_json, parts_markdown, summarize, tail
from launch.wheelhouse import DEVICE_PYTHON, REPO, build_wheels, cached_stand_in, install

# the whole check's time by default: within a GPU loan's minutes; the dry run's tiny parts on 2 CPU cores
BUDGET_S = {"run": 420, "dry-run": 1500}

# the runner -----------------------------------------------------------------------------------------------


class Check:
    """Parts run one after the other as subprocesses, each within its own limit and the overall budget;
    the JSON is rewritten after each, and the log keeps every part's output."""

    def __init__(self, out: Path, budget_s: float, dry: bool):
        self.out, self.dry = out, dry
        self.deadline = time.monotonic() + budget_s
        self.report: dict = {"dry_run": dry, "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "parts": {}}
        out.mkdir(parents=True, exist_ok=True)
        self.log = open(out / "gpu_check.log", "a", buffering=1)
        self.lock = threading.Lock()  # bench memory's estimates may run in a thread beside the rest
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        if dry:
            self.env.update(AUTOSAM2_GPU_TESTS_ON_CPU="1", DS_ACCELERATOR="cpu")

    def save(self) -> None:
        with self.lock:
            tmp = self.out / "gpu_check.json.tmp"
            tmp.write_text(json.dumps(self.report, indent=1))
            tmp.replace(self.out / "gpu_check.json")

    def part(
        self, name: str, cmd: list[str], limit_s: float, cpus: set[int] | None = None, figures: bool = True
    ) -> dict | None:
        """Run one part; `figures`: its stdout ends with one JSON object (the benchmarks' output)."""
        left = self.deadline - time.monotonic()
        if left < 10:
            self.report["parts"][name] = {"ok": False, "error": "not run: the check's time budget was spent"}
            self.save()
            return None
        start = time.monotonic()
        if cpus and shutil.which("taskset"):  # cores of its own (preexec_fn is unsafe beside threads)
            cmd = ["taskset", "-c", ",".join(map(str, sorted(cpus))), *cmd]
        # its own process group: a part that overruns goes with its loader and compile workers
        proc = subprocess.Popen(
            cmd,
            cwd=REPO,
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        try:
            stdout, stderr = proc.communicate(timeout=min(limit_s, left))
            output, code = stdout + stderr, proc.returncode
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            stdout, stderr = proc.communicate()
            output, code = stdout + stderr + f"\n[timed out after {min(limit_s, left):.0f} s]", None
        with self.lock:
            self.log.write(f"\n===== {name}: {' '.join(cmd)}\n{output}")
        seconds = round(time.monotonic() - start, 1)
        result = last_json(stdout) if code == 0 and figures else None
        entry = {"ok": code == 0 and (result is not None or not figures), "seconds": seconds}
        if entry["ok"]:
            entry["result"] = result
        else:
            entry["error"] = tail(output)
        self.report["parts"][name] = entry
        self.save()
        print(f"gpu-check: {name}: {'ok' if entry['ok'] else 'FAILED'} in {seconds} s", flush=True)
        return result

    def close(self) -> None:
        self.report["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        self.save()
        self.log.close()


# the run --------------------------------------------------------------------------------------------------


def _run_part(check: Check, plan: Plan, part: Part, cpus: dict[str, set[int] | None]) -> None:
    if part.probe:
        check.report["parts"][part.name] = part.probe(check.env)
        check.save()
        return
    check.part(part.name, part.command(plan), part.limit_s, cpus[part.cores], figures=part.figures)
    if part.after:
        check.report["parts"][part.name].update(part.after(plan))
        check.save()


def run_check(out: Path, dry: bool, budget_s: float) -> dict:
    """Every part of `PARTS` (those of the dry run in a dry run), then the summary."""
    check = Check(out, budget_s, dry)
    cores = sorted(os.sched_getaffinity(0))
    data = Path(tempfile.mkdtemp(prefix="autosam2-gpu-check-"))
    plan = Plan(out=out, dry=dry, data=data, workers=str(max(1, len(cores) - 1)))
    # bench memory's estimates are CPU work: on a big host they run beside the GPU parts, on cores of
    # their own; on a small one after them
    spare = set(cores[-4:]) if len(cores) >= 12 else None
    cpus = {"all": None, "main": set(cores[:-4]) if spare else None, "spare": spare}
    todo = [part for part in PARTS if part.in_dry_run or not dry]
    estimates = [part for part in todo if part.cores == "spare"]
    for part in (part for part in todo if part.probe):
        _run_part(check, plan, part, cpus)
    beside = threading.Thread(target=lambda: [_run_part(check, plan, p, cpus) for p in estimates])
    if spare:
        beside.start()
    for part in (part for part in todo if not part.probe and part.cores != "spare"):
        _run_part(check, plan, part, cpus)
    if spare:
        beside.join(max(0.0, check.deadline - time.monotonic()))
    else:
        beside.run()
    shutil.rmtree(data, ignore_errors=True)
    check.report["summary"] = summarize(check.report["parts"], dry)
    check.close()
    return check.report


def print_table(report: dict) -> None:
    print("\npart                          ok     seconds")
    for name, part in report["parts"].items():
        print(f"{name:<30}{'yes' if part.get('ok') else 'NO':<7}{part.get('seconds', '')}")
    print(json.dumps(report.get("summary", {}), indent=1))


# entry ---------------------------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    from autosam2.arguments import add_output_dir

    parser = argparse.ArgumentParser(
        prog="python -m launch.gpu_check", description=__doc__.split("\n")[0], allow_abbrev=False
    )
    sub = parser.add_subparsers(dest="command", required=True)
    wheels = sub.add_parser(
        "wheels", help="build the wheelhouse for the device's Python (here)", allow_abbrev=False
    )
    wheels.add_argument("--python-version", default=DEVICE_PYTHON)
    for name in ("run", "dry-run"):
        p = sub.add_parser(
            name,
            help="the check on this machine's GPU" if name == "run" else "the check on the CPU, tiny",
            allow_abbrev=False,
        )
        add_output_dir(p, "--out", type=Path, default=Path(os.environ.get("OUT") or "gpu-check-out"))
        p.add_argument("--budget-s", type=float, default=BUDGET_S[name])
    sub.choices["run"].add_argument("--dry", action="store_true", help=argparse.SUPPRESS)
    sub.add_parser("parts", help="the parts and goals as a Markdown table", allow_abbrev=False)
    sub.add_parser(
        "decode",
        help="JPEG decoding frames/s: `autosam2 bench decode` under another name",
        allow_abbrev=False,
    )
    return parser


def _dry_run(args: argparse.Namespace) -> int:
    """This Python's wheels into the stand-in image (kept while they stay the same; the project's wheel,
    built on every run, into a folder of this run's on PYTHONPATH, as on the device), then `run --dry`
    there, DeepSpeed's JIT-built ops in a folder of the stand-in's."""
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    wheelhouse = build_wheels(version)
    image = cached_stand_in(wheelhouse)
    with tempfile.TemporaryDirectory(prefix="autosam2-device-") as tmp:
        install(wheelhouse, Path(tmp), files=list(wheelhouse.glob("autosam2-*.whl")))
        out = str(args.output_dir.resolve())
        cmd = [
            str(image / "venv" / "bin" / "python"),
            "-m",
            "launch.gpu_check",
            "run",
            "--dry",
            "--output-dir",
            out,
            "--budget-s",
            str(args.budget_s),
        ]
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
        env.update(PYTHONPATH=tmp, TORCH_EXTENSIONS_DIR=str(image / "torch-extensions"))
        return subprocess.run(cmd, cwd=REPO, env=env).returncode


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["decode"]:
        from autosam2.bench import main as bench

        return bench(["decode", *argv[1:]])
    args = _parser().parse_args(argv)
    if args.command == "wheels":
        out = build_wheels(args.python_version)
        listing = json.loads((out / "wheels.json").read_text())
        print(f"gpu-check: {len(listing['wheels'])} wheels, {listing['MiB']} MiB in {out.relative_to(REPO)}")
        print(
            f"on the device, from the repository root: bash launch/gpu_check.sh   (carry {out.relative_to(REPO)})"
        )
        return 0
    if args.command == "parts":
        print(parts_markdown())
        return 0
    if args.command == "run":
        report = run_check(args.output_dir.resolve(), args.dry, args.budget_s)
        print_table(report)
        return 0 if all(p.get("ok") for p in report["parts"].values()) else 1
    return _dry_run(args)


if __name__ == "__main__":
    from autosam2.errors import run_command

    sys.exit(run_command("python -m launch.gpu_check", main))
