"""The GPU check's parts and goals, as data: each part's command, time limit, what it measures and the
goals its figures feed (`PARTS`), the goals with their thresholds (`GOALS`), the summary that judges them,
and the table the docs show (`parts_markdown`). `launch/gpu_check.py` runs them.

Only the standard library is imported: the check starts before anything is importable.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

TRAIN_CONFIGS = {  # the shipped run configs (autosam2/configs/) the check trains, by name
    "ddp_hiera_t": "gpu_hiera_t_1024",
    "zero2_hiera_bplus": "gpu_hiera_bplus_1024_deepspeed",
}
INFER_VARIANTS = ("hiera_t", "hiera_b+")

# the goals the GPU path is judged against (`GOALS`)
STREAMING_FPS_GOAL = 120.0  # frames/s of streaming inference, hiera_t at 1024 px in bf16: at least
ZERO2_PEAK_GOAL_GIB = 24.0  # peak allocated GiB per GPU of the ZeRO-2 hiera_b+ config: at most
ESTIMATE_TOLERANCE = 0.15  # |measured peak / bench memory's estimate - 1| of that config: at most
DATA_WAIT_GOAL = 0.02  # share of a training step spent waiting for data, either config: at most
FULL_MODEL_CONFIG = "gpu_hiera_bplus_1024_full"  # all of hiera-b+ trained, activation checkpointing on
ACTIVATION_RATIO_GOAL = 0.5  # its activations with checkpointing over without: at most
FULL_MODEL_PEAK_GOAL_GIB = 40.0  # its per-GPU peak with checkpointing (ZeRO-2 over 8 ranks), GiB: under

# what each part runs at: the configs as they are on a GPU (1024 px, 8-frame clips, 8 loader workers);
# tiny on the CPU (the smallest SAM2 runs at: plumbing, not figures), where every part still runs, in a
# few minutes on 2 cores
SIZES = {
    "gpu": {
        "device": ["--gpu", "0"],
        "synth": "--size 1024 --sequences 4 --valid-sequences 1 --test-sequences 0 --frames 32".split(),
        "frames_per_sample": 16,
        "train_overrides": [],
        "train_steps": 8,
        "memory_steps": 2,
        "infer": "--image-size 1024 --frames 32 --rounds 3".split(),
        "data": "--image-size 1024 --clip-len 8 --batch-size 1 --batches 12 --rounds 2".split(),
        "decode": "--size 1024 --frames 64".split(),
        "checkpointing": [],
        "comm": "--config gpu_hiera_t_1024 --ranks 1 --steps 10".split(),
        "features": "--variant hiera_b+ --image-size 1024 --frames 8 --passes 3 --memory-frames 2".split(),
    },
    "dry": {
        "device": ["--cpu"],
        "synth": "--size 128 --sequences 2 --valid-sequences 1 --test-sequences 0 --frames 8".split(),
        "frames_per_sample": 4,
        "train_overrides": ["model.image_size=64", "data.clip_len=2", "data.num_workers=1"],
        "train_steps": 3,
        "memory_steps": 1,
        "infer": "--image-size 64 --frames 4 --rounds 1 --compile-backend aot_eager".split(),
        # the resume cost over a 40-sample epoch (the default's 2000 are 200 sequences to write and replay)
        "data": "--image-size 64 --clip-len 2 --batch-size 1 --batches 3 --rounds 1 --resume-samples 40".split(),
        "decode": "--size 128 --frames 8".split(),
        "checkpointing": ["model.image_size=64", "data.clip_len=2"],
        "comm": "--ranks 1 --steps 2".split(),
        "features": "--image-size 64 --frames 3 --passes 2 --memory-frames 1".split(),
    },
}


# the parts ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    """Where and at what size one check runs: what the parts' commands are made of."""

    out: Path
    dry: bool
    data: Path  # the check's synthetic data set, made by its first parts
    workers: str  # loader and writer processes of the data parts: every core but one
    py: tuple[str, ...] = (sys.executable,)

    @property
    def sizes(self) -> dict:
        return SIZES["dry" if self.dry else "gpu"]

    @property
    def cli(self) -> list[str]:
        return [*self.py, "-m", "autosam2.cli"]


@dataclass(frozen=True)
class Part:
    """One part of the check: its key under the JSON's `parts`, its time limit, what it measures, the
    goals its figures feed, and how it runs."""

    name: str
    limit_s: float | None  # None: a probe, run in this process
    measures: str
    command: Callable[[Plan], list[str]] | None = None
    probe: Callable[[dict[str, str]], dict] | None = None  # the part's entry, from the check's environment
    figures: bool = True  # its stdout ends with one JSON object (the benchmarks' output)
    cores: str = "main"  # "main": the cores beside the GPU; "all"; "spare": beside the rest on a big host
    in_dry_run: bool = True
    after: Callable[[Plan], dict] | None = None  # fields added to its entry once it ran
    summary: Callable[[dict], dict] | None = None  # its figures in the summary, from every part's entry
    goals: tuple[str, ...] = ()  # names of GOALS


def last_json(output: str) -> dict | None:
    """The JSON object a part printed last (the benchmarks print one, after any progress lines)."""
    start = output.rfind("\n{") + 1  # 0: the object is the first line
    try:
        return json.loads(output[start:]) if output[start:].startswith("{") else None
    except ValueError:
        return None


def tail(output: str, lines: int = 12) -> str:
    return "\n".join(output.strip().splitlines()[-lines:])


def _environment(env: dict[str, str]) -> dict:
    code = (
        "import json, sys, torch; d = torch.cuda.is_available(); print(json.dumps({'python': sys.version.split()[0], "
        "'torch': torch.__version__, 'cuda': torch.version.cuda, 'card': torch.cuda.get_device_name() if d else None, "
        "'cards': torch.cuda.device_count(), 'cpus': len(__import__('os').sched_getaffinity(0))}))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    info = last_json(done.stdout) or {"error": tail(done.stderr)}
    smi = shutil.which("nvidia-smi")
    if smi:
        query = subprocess.run(
            [smi, "--query-gpu=name,driver_version,memory.total,clocks.max.sm", "--format=csv,noheader"],
            capture_output=True,
            text=True,
        )
        info["nvidia_smi"] = query.stdout.strip()
    return {"ok": "error" not in info, "result": info}


def _junit(path: Path) -> dict:
    if not path.exists():
        return {"passed": 0, "failed": None, "tests": []}
    cases = []
    for case in ET.parse(path).getroot().iter("testcase"):
        outcome = "passed"
        for tag in ("failure", "error", "skipped"):
            found = case.find(tag)
            if found is not None:
                outcome = {"failure": "failed", "error": "failed", "skipped": "skipped"}[tag]
                message = (found.get("message") or "").splitlines()[:1]
        entry = {
            "name": case.get("name"),
            "outcome": outcome,
            "seconds": round(float(case.get("time", 0)), 1),
        }
        if outcome != "passed":
            entry["message"] = message[0][:300] if message else ""
        cases.append(entry)
    count = {k: sum(c["outcome"] == k for c in cases) for k in ("passed", "failed", "skipped")}
    return {**count, "tests": cases}


def _get(parts: dict, name: str, *keys: str):
    value = parts.get(name, {}).get("result")
    for key in keys:
        if not isinstance(value, dict):
            return None
        value = value.get(key)
    return value


def _synth(plan: Plan) -> list[str]:
    out = ["--output-dir", str(plan.data / "pg"), "--workers", plan.workers]
    return [*plan.cli, "synth", *out, *plan.sizes["synth"]]


def _shards(plan: Plan) -> list[str]:
    out = [
        "--output-dir",
        str(plan.data / "shards"),
        "--frames-per-sample",
        str(plan.sizes["frames_per_sample"]),
    ]
    return [
        *plan.py,
        "-m",
        "shards",
        "build",
        str(plan.data / "pg"),
        "--split",
        "train",
        *out,
        "--workers",
        plan.workers,
    ]


def _tests(plan: Plan) -> list[str]:
    pytest = "-m pytest -m gpu tests/test_gpu.py -q -p no:cacheprovider".split()
    return [*plan.py, *pytest, f"--junitxml={plan.out / 'gpu_tests.xml'}"]


def _estimate(config: str, plan: Plan) -> list[str]:
    steps = ["--steps", str(plan.sizes["memory_steps"])]
    memory = [*plan.cli, "bench", "memory", "--config", config, "--ranks", "1", "--cpu", *steps]
    return [*memory, *plan.sizes["train_overrides"]]


def _train(config: str, plan: Plan) -> list[str]:
    s = plan.sizes
    run = ["--steps", str(s["train_steps"]), *s["device"], "--shards", str(plan.data / "shards")]
    return [*plan.cli, "bench", "train", "--config", config, *run, *s["train_overrides"]]


def _infer(variant: str, compiled: bool, plan: Plan) -> list[str]:
    s = plan.sizes
    cmd = [*plan.cli, "bench", "infer", "--variant", variant, "--bf16", *s["device"], *s["infer"]]
    return cmd + (["--compile"] if compiled else [])


def _data(workers: int, plan: Plan) -> list[str]:
    s = plan.sizes
    root = ["--root", str(plan.data / "pg"), "--loader-workers", str(workers)]
    return [*plan.cli, "bench", "data", *root, "--frames-per-sample", str(s["frames_per_sample"]), *s["data"]]


def _decode(plan: Plan) -> list[str]:
    return [*plan.cli, "bench", "decode", *plan.sizes["device"], *plan.sizes["decode"]]


def _checkpointing(plan: Plan) -> list[str]:
    steps = ["--steps", str(plan.sizes["memory_steps"]), "--compare-checkpointing"]
    memory = [*plan.cli, "bench", "memory", "--config", FULL_MODEL_CONFIG, *plan.sizes["device"], *steps]
    return [*memory, *plan.sizes["checkpointing"]]


def _comm(plan: Plan) -> list[str]:
    return [*plan.cli, "bench", "comm", *plan.sizes["device"], *plan.sizes["comm"]]


def _features(plan: Plan) -> list[str]:
    disk = ["--dir", str(plan.out / "feature-cache")]  # the device's local disk
    return [*plan.cli, "bench", "features", *plan.sizes["device"], *plan.sizes["features"], *disk]


# what each part adds to the summary


def _tests_summary(parts: dict) -> dict:
    return {
        "tests_passed": parts.get("tests", {}).get("passed"),
        "tests_failed": parts.get("tests", {}).get("failed"),
    }


def _train_summary(name: str, parts: dict) -> dict:
    measured = _get(parts, f"train_{name}", "memory", "max_allocated_GiB")
    estimated = _get(parts, f"estimate_{name}", "estimate_per_gpu_GiB")
    return {
        name: {
            "frames_per_s": _get(parts, f"train_{name}", "frames_per_s", "full_trainer"),
            "step_s": _get(parts, f"train_{name}", "step_s", "full_trainer"),
            "mfu": _get(parts, f"train_{name}", "mfu"),
            "data_wait_share": _get(parts, f"train_{name}", "data_wait_share"),
            "peak_allocated_GiB": measured,
            "peak_reserved_GiB": _get(parts, f"train_{name}", "memory", "max_reserved_GiB"),
            "estimate_GiB": estimated,
            "measured_over_estimate": round(measured / estimated, 3) if measured and estimated else None,
        }
    }


def _infer_summary(name: str, parts: dict) -> dict:
    return {
        name: {
            "streaming_fps": _get(parts, name, "fps", "streaming_inference"),
            "encoder_fps": _get(parts, name, "fps", "bare_image_encoder"),
            "ratio": _get(parts, name, "ratio_streaming_over_encoder"),
            "compiled_ran": _get(parts, name, "config", "compiled_ran"),
        }
    }


def _data_summary(name: str, parts: dict) -> dict:
    part = parts.get(name, {})
    if not part.get("ok"):
        return {}
    workers = part["result"]["config"]["workers"] or 1
    fps = part["result"]["frames_per_s"]["a_shard_stream"]
    return {name: {"frames_per_s": fps, "frames_per_s_per_worker": round(fps / workers, 1)}}


def _checkpointing_summary(parts: dict) -> dict:
    found = _get(parts, "checkpointing", "checkpointing") or {}
    return {
        "checkpointing": {
            "activation_ratio": found.get("activation_ratio"),
            "peak_GiB_with": (found.get("with") or {}).get("estimate_per_gpu_GiB"),
            "peak_GiB_without": (found.get("without") or {}).get("estimate_per_gpu_GiB"),
        }
    }


def _comm_summary(parts: dict) -> dict:
    seconds = _get(parts, "comm", "step_seconds") or {}
    ratio = seconds["bf16"] / seconds["none"] if seconds.get("none") and seconds.get("bf16") else None
    return {
        "comm": {"bytes_ratio": _get(parts, "comm", "ratio"), "step_s": seconds, "step_time_ratio": ratio}
    }


def _features_summary(parts: dict) -> dict:
    settings = _get(parts, "features", "settings") or {}
    return {
        "features": {
            name: {k: found.get(k) for k in ("bytes_per_frame", "hit_rate", "disk_hit_rate", "lookup_ms")}
            for name, found in settings.items()
        }
    }


def _infer_name(variant: str, compiled: bool) -> str:
    return f"infer_{variant.replace('+', 'plus')}_{'compiled' if compiled else 'eager'}"


PARTS: tuple[Part, ...] = (
    Part(
        "environment",
        None,
        "Python, torch, CUDA, the card, its driver and clocks, the cores",
        probe=_environment,
    ),
    *(
        Part(
            f"estimate_{name}",
            420,
            f"`bench memory`'s per-GPU estimate for the run config {config}, on the CPU",
            partial(_estimate, config),
            cores="spare",
            goals=("estimate",) if name == "zero2_hiera_bplus" else (),
        )
        for name, config in TRAIN_CONFIGS.items()
    ),
    Part(
        "synth",
        180,
        "the check's synthetic polyp_gen data set, made on every core",
        _synth,
        figures=False,
        cores="all",
    ),
    Part("shards", 120, "that data set's training shards", _shards, figures=False, cores="all"),
    Part(
        "tests",
        300,
        "`pytest -m gpu tests/test_gpu.py`: the GPU tests, each one's outcome",
        _tests,
        figures=False,
        after=lambda plan: _junit(plan.out / "gpu_tests.xml"),
        summary=_tests_summary,
    ),
    *(
        Part(
            f"train_{name}",
            240,
            f"`bench train` of the run config {config}: frames/s, step time, MFU, data wait, peak memory",
            partial(_train, config),
            summary=partial(_train_summary, name),
            goals=("data_wait", "zero2_peak", "estimate") if name == "zero2_hiera_bplus" else ("data_wait",),
        )
        for name, config in TRAIN_CONFIGS.items()
    ),
    *(
        Part(
            _infer_name(variant, compiled),
            240 if compiled else 90,
            f"`bench infer` of {variant} in bf16, {'torch.compile' if compiled else 'eager'}: streaming vs bare-encoder frames/s",
            partial(_infer, variant, compiled),
            summary=partial(_infer_summary, _infer_name(variant, compiled)),
            goals=("streaming_fps",) if variant == "hiera_t" else (),
        )
        for variant in INFER_VARIANTS
        for compiled in (False, True)
    ),
    *(
        Part(
            f"data_{workers}_workers",
            120,
            f"`bench data` with {workers} loader worker(s): shard stream frames/s",
            partial(_data, workers),
            in_dry_run=workers == 1,
            summary=partial(_data_summary, f"data_{workers}_workers"),
        )
        for workers in (1, 8)
    ),
    Part(
        "checkpointing",
        600,
        f"`bench memory --compare-checkpointing` of {FULL_MODEL_CONFIG} (all of hiera-b+) on the device: "
        "peak and activation memory with and without activation checkpointing",
        _checkpointing,
        summary=_checkpointing_summary,
        goals=("activation_ratio", "full_model_peak"),
    ),
    Part(
        "comm",
        300,
        "`bench comm`: step time and gradient bytes with bf16 gradient communication against fp32",
        _comm,
        summary=_comm_summary,
    ),
    Part(
        "features",
        300,
        "`bench features`: the feature cache's bytes per frame, hit rates and lookup times, fp32 / bf16, "
        "in memory and on the device's local disk",
        _features,
        summary=_features_summary,
    ),
    Part(
        "decode",
        60,
        "`bench decode`: JPEG frames/s, PIL vs the project's decoder on the CPU and on the device",
        _decode,
        summary=lambda parts: {"decode": _get(parts, "decode")},
    ),
)


# the goals ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Goal:
    """One goal: its name under the summary's `goals_met`, its figure's key under `goals`, and its test."""

    name: str
    figure: str
    text: str
    measure: Callable[[dict], float | None]  # the figure, from the summary
    met: Callable[[float], bool]


def _largest(values: list) -> float | None:
    return max((v for v in values if v is not None), default=None)


GOALS: tuple[Goal, ...] = (
    Goal(
        "streaming_fps",
        "streaming_fps_hiera_t_1024_bf16",
        f"hiera_t streaming inference at 1024 px in bf16 (eager or compiled) ≥ {STREAMING_FPS_GOAL:g} frames/s",
        lambda s: _largest([s[_infer_name("hiera_t", c)]["streaming_fps"] for c in (False, True)]),
        lambda fps: fps >= STREAMING_FPS_GOAL,
    ),
    Goal(
        "zero2_peak",
        "zero2_bplus_peak_GiB",
        f"ZeRO-2 hiera_b+ peak allocated memory ≤ {ZERO2_PEAK_GOAL_GIB:g} GiB per GPU",
        lambda s: s["zero2_hiera_bplus"]["peak_allocated_GiB"],
        lambda gib: gib <= ZERO2_PEAK_GOAL_GIB,
    ),
    Goal(
        "estimate",
        "zero2_bplus_measured_over_estimate",
        f"ZeRO-2 hiera_b+ peak within {ESTIMATE_TOLERANCE:.0%} of `bench memory`'s estimate",
        lambda s: s["zero2_hiera_bplus"]["measured_over_estimate"],
        lambda ratio: abs(ratio - 1) <= ESTIMATE_TOLERANCE,
    ),
    Goal(
        "activation_ratio",
        "full_model_activation_ratio",
        f"{FULL_MODEL_CONFIG}: activations with checkpointing ≤ {ACTIVATION_RATIO_GOAL:g}× without",
        lambda s: s["checkpointing"]["activation_ratio"],
        lambda ratio: ratio <= ACTIVATION_RATIO_GOAL,
    ),
    Goal(
        "full_model_peak",
        "full_model_peak_GiB",
        f"{FULL_MODEL_CONFIG} with checkpointing: per-GPU peak < {FULL_MODEL_PEAK_GOAL_GIB:g} GiB",
        lambda s: s["checkpointing"]["peak_GiB_with"],
        lambda gib: gib < FULL_MODEL_PEAK_GOAL_GIB,
    ),
    Goal(
        "data_wait",
        "data_wait_share_max",
        f"data wait ≤ {DATA_WAIT_GOAL:.0%} of a training step, both configs",
        lambda s: _largest([s[name]["data_wait_share"] for name in TRAIN_CONFIGS]),
        lambda share: share <= DATA_WAIT_GOAL,
    ),
)


def summarize(parts: dict, dry: bool = False) -> dict:
    """Every part's figures (`Part.summary`), the goals' figures, and whether each goal was met (None: not
    measured; not judged in a dry run, whose tiny sizes on a CPU prove the plumbing, not the figures)."""
    summary: dict = {}
    for part in PARTS:
        if part.summary:
            summary.update(part.summary(parts))
    figures = {goal.name: goal.measure(summary) for goal in GOALS}
    summary["goals"] = {goal.figure: figures[goal.name] for goal in GOALS}
    if dry:
        summary["goals_met"] = "not judged: a dry run"
    else:
        summary["goals_met"] = {
            g.name: None if figures[g.name] is None else g.met(figures[g.name]) for g in GOALS
        }
    return summary


def parts_markdown() -> str:
    """The parts, their time limits, what they measure and the goals they feed, as a Markdown table."""
    plan = Plan(out=Path("$OUT"), dry=False, data=Path("$DATA"), workers="N", py=("python",))
    goals = {goal.name: goal.text for goal in GOALS}
    rows = ["| part | limit | measures | goal | command (on a GPU) |", "|---|---|---|---|---|"]
    for part in PARTS:
        limit = "—" if part.limit_s is None else f"{part.limit_s:g} s"
        command = "(in the check's process)"
        if part.command:
            command = "`" + " ".join(part.command(plan)).replace("python -m autosam2.cli", "autosam2") + "`"
        goal = "; ".join(goals[name] for name in part.goals) or "—"
        dry = "" if part.in_dry_run else " (not in the dry run)"
        rows.append(f"| `{part.name}` | {limit} | {part.measures}{dry} | {goal} | {command} |")
    return "\n".join(rows)
