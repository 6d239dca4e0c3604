"""Two test hosts against one: submit -> first step and its phases, step time, bytes on the wire per step.

`python launch/hosts_bench.py [--steps 4 12]` (root; it starts `slurm_test_cluster.sh --hosts 2` and stops
it at the end). The CPU demo's model and trainable parts (the shipped run config cpu_demo) on small synthetic
shards, through launch/train.sbatch: 2 hosts x 1 rank (gloo over the veth pair) and 1 host x 2 ranks
(gloo over loopback), each run twice, with a few and with more steps, one after the other. Prints one
JSON object: per layout the time from sbatch to the first logged step, the median step time, and for
the two-host layout the bytes node1's link carried per step (the difference of the two runs' counters
over the difference of their steps), beside the gradient bytes DDP all-reduces (trainable parameters x 4;
the config's feature cache also all-gathers each step's newly encoded frames while it fills).
Every rank runs `--threads` torch threads (default 1) in both layouts: the job asks for `--threads` x
ranks-per-host CPUs per task, and a rank's threads are SLURM_CPUS_PER_TASK over its host's ranks
(autosam2.engine.dist.settings.torch_threads). Both "hosts" share this machine's cores, so the layouts
compare only when they run as many threads in all.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "launch" / "slurm_test_cluster.sh"
STATE = Path("/tmp/autosam2-slurm-hosts")
LINK = "as2v1"  # node1's veth, this machine's side: every byte node1 sends or receives crosses it
LAYOUTS = {"2_hosts_x_1_rank": (2, 1), "1_host_x_2_ranks": (1, 2)}


def link_bytes() -> int:
    stats = Path("/sys/class/net") / LINK / "statistics"
    return int((stats / "rx_bytes").read_text()) + int((stats / "tx_bytes").read_text())


def run_job(
    data: dict[str, Path], out: Path, nodes: int, procs: int, steps: int, threads: int
) -> dict[str, float]:
    """One sbatch job to the end: seconds to its first step, its step times, the link's bytes."""
    log = out.with_suffix(".out")
    overrides = [
        f"data.train={data['train']}",
        f"data.valid={data['valid']}",
        f"train.output_dir={out}",
        f"train.max_steps={steps}",
        "train.checkpoint_every=100000",
        "train.validate_every=100000",
        "train.log_every=1",
        "tracking.enabled=false",
    ]
    cpus = threads * procs  # every rank `threads` threads, whatever the layout
    cmd = ["sbatch", "--parsable", f"--nodes={nodes}", "--gpus-per-node=0", f"--cpus-per-task={cpus}"]
    cmd += [f"--output={log}", str(REPO / "launch" / "train.sbatch"), "--config", "cpu_demo"]
    env = {**os.environ, "AUTOSAM2_PROCS_PER_NODE": str(procs), "AUTOSAM2_PYTHON": sys.executable}
    before = link_bytes()
    submitted = time.monotonic()
    subprocess.run([*cmd, *overrides], cwd=REPO, env=env, check=True, capture_output=True)
    first = None
    while True:
        text = log.read_text(errors="replace") if log.exists() else ""
        if first is None and re.search(r"^step 1/", text, re.M):
            first = time.monotonic() - submitted
        if f"done: {steps} steps" in text:
            break
        if "Traceback" in text or time.monotonic() - submitted > 900:
            raise RuntimeError(f"{log}: the job failed or hangs:\n{text[-3000:]}")
        time.sleep(0.1)
    frames = 4 * 1 * nodes * procs  # clip_len x batch x ranks per step (cpu_demo)
    rates = [float(m) for m in re.findall(r"^step \d+/\d+ .* ([\d.]+) frames/s ", text, re.M)]
    record = out / "startup.json"  # every rank's phases (autosam2.engine.startup.RECORD)
    ranks = json.loads(record.read_text())["ranks"] if record.exists() else []
    return {
        "rank_phases_s": [{k: round(v, 2) for k, v in r["phases"].items()} for r in ranks],
        "submit_to_first_step_s": first,
        "startup_s": {m[0]: float(m[1]) for m in re.findall(r"^startup: (\w+) +([\d.]+) s", text, re.M)},
        "step_s": [frames / r for r in rates[1:]],  # the first step also builds DDP's buckets
        "bytes": link_bytes() - before,
    }


def trainable_bytes() -> int:
    import torch

    from autosam2.config import load_config
    from autosam2.model.sam2_builder import build_autosam2

    model = build_autosam2(load_config("cpu_demo", []).model, torch.device("cpu"))
    return 4 * sum(p.numel() for p in model.parameters() if p.requires_grad)


def layout_figures(short: dict, long: dict, more_steps: int, nodes: int) -> dict:
    """One layout's figures from its short and its long job (`run_job`)."""
    found = {
        "submit_to_first_step_s": round(
            statistics.median([short["submit_to_first_step_s"], long["submit_to_first_step_s"]]), 2
        ),
        "step_s_median": round(statistics.median(long["step_s"]), 3),
        "startup_s": {  # the training's own timeline (`startup:` lines), slowest rank
            phase: round(statistics.median([short["startup_s"][phase], seconds]), 2)
            for phase, seconds in long["startup_s"].items()
            if phase in short["startup_s"]
        },
        "rank_phases_s": {"short": short["rank_phases_s"], "long": long["rank_phases_s"]},
    }
    if nodes == 2:
        found["link_bytes_per_step"] = round((long["bytes"] - short["bytes"]) / more_steps)
    return found


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The arguments, every one checked before the cluster starts (argparse's one line)."""
    from autosam2.arguments import positive_int
    from autosam2.commands import HOSTS_BENCH

    parser = argparse.ArgumentParser(
        prog=HOSTS_BENCH, description=__doc__.splitlines()[0], allow_abbrev=False
    )
    parser.add_argument(
        "--steps",
        type=positive_int,
        nargs=2,
        default=[4, 12],
        metavar=("SHORT", "LONG"),
        help="the short and the long run's steps (LONG > SHORT: the link's bytes per step are their difference's)",
    )
    parser.add_argument("--threads", type=positive_int, default=1, help="torch threads per rank")
    args = parser.parse_args(argv)
    if args.steps[1] <= args.steps[0]:
        parser.error(
            f"argument --steps: the long run's {args.steps[1]} must be more than the short run's {args.steps[0]}"
        )
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    few, more = args.steps

    from autosam2.data.synthetic import SynthSpec, write_dataset
    from shards.writer import build

    env = {**os.environ, "AUTOSAM2_SLURM_DIR": str(STATE)}
    subprocess.run(["bash", str(SCRIPT), "start", "--hosts", "2"], env=env, check=True, capture_output=True)
    os.environ["SLURM_CONF"] = str(STATE / "slurm.conf")
    try:
        with tempfile.TemporaryDirectory(prefix="hosts-bench-", dir="/tmp") as tmp:
            base = Path(tmp)
            write_dataset(
                base / "pg", SynthSpec(train_sequences=4, valid_sequences=2, frames=8, size=256, seed=5)
            )
            data = {}
            for split in ("train", "valid"):
                data[split] = base / "shards" / split
                build(base / "pg", split, data[split], frames_per_sample=4, max_shard_mb=0.0001)
            figures: dict[str, dict[str, float]] = {}
            for name, (nodes, procs) in LAYOUTS.items():
                short = run_job(data, base / f"{name}_{few}", nodes, procs, few, args.threads)
                long = run_job(data, base / f"{name}_{more}", nodes, procs, more, args.threads)
                figures[name] = layout_figures(short, long, more - few, nodes)
    finally:
        subprocess.run(["bash", str(SCRIPT), "stop", "--hosts", "2"], env=env, capture_output=True)
    two, one = figures["2_hosts_x_1_rank"], figures["1_host_x_2_ranks"]
    result = {
        "threads_per_rank": args.threads,
        "config": "cpu_demo (hiera-t, 256 px, 4-frame clips, prompt encoder + mask decoder trainable)",
        **figures,
        "gradient_bytes_all_reduced_per_step": trainable_bytes(),
        "step_time_ratio_2_hosts_vs_1_host": round(two["step_s_median"] / one["step_s_median"], 3),
        "submit_to_first_step_ratio_2_hosts_vs_1_host": round(
            two["submit_to_first_step_s"] / one["submit_to_first_step_s"], 3
        ),
    }
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
