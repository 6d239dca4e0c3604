"""The device check behind `make gpu-check`: a wheelhouse built here, the GPU path measured there.

A device machine has its own Python and torch and no package registry, and is lent for minutes. So:
- `wheels` (here): every package the project needs that the device image lacks, torch excepted, as
  wheels for the device's Python, in `.gpu-check/wheels-cpXY/` (sam2 without its CUDA extension and
  DeepSpeed without ops, built from source; the MLflow client and its SQLite store, not the server);
- `run` (there, after `launch/gpu_check.sh` installed them): `pytest -m gpu`, training throughput and
  peak memory of the two GPU configs against `bench memory`'s estimate, `bench infer` eager and compiled,
  the data path, JPEG decoding; one JSON (rewritten after every part, so a timeout keeps what was
  measured) and the log under `--out`, a table last;
- `dry-run` (here, in CI): the same wheels built for this Python, installed into a stand-in for the
  device image (a bare venv that sees only the image's packages, taken from this venv), and `run` in it
  on the CPU at tiny sizes, so neither the wheel list nor the check can rot between loans.

Only the standard library is imported at module level: `run` starts before anything is importable.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import xml.etree.ElementTree as ET
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WHEELS = REPO / ".gpu-check"
DEVICE_PYTHON = "3.12"
WHEELHOUSE_LIMIT_MIB = 40

# The device image's Python packages (the device tool's KINDS.md, read on 2026-11-17); they are used
# as they are there, never carried.
IMAGE_PACKAGES = frozenset(
    """absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch build
    certifi charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings cuda-core
    cuda-pathfinder cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils execnet filelock
    flatbuffers flax fonttools formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx
    huggingface-hub humanize hypothesis idna imageio iniconfig interface-meta jax jax-cuda13-pjrt
    jax-cuda13-plugin jaxlib jaxtyping jinja2 joblib kiwisolver lazy-loader lightning lightning-utilities
    linear-operator lineax llvmlite lxml markdown markdown-it-py markupsafe matplotlib mdurl meson ml-dtypes
    mpi4py mpmath msgpack multidict multipledispatch mypy-extensions nanobind narwhals networkx ninja numba
    numba-cuda numpy numpyro nvidia-cublas nvidia-cuda-cupti nvidia-cuda-nvrtc nvidia-cuda-runtime
    nvidia-cudnn-cu13 nvidia-cufft nvidia-cufile nvidia-curand nvidia-cusolver nvidia-cusparse
    nvidia-cusparselt-cu13 nvidia-ml-py nvidia-nccl-cu13 nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx onnx
    onnx-ir onnxruntime onnxscript opencv-python-headless optax opt-einsum opt-einsum-fx optimistix
    orbax-checkpoint packaging pandas pathspec patsy peft pillow pip pluggy portalocker prometheus-client
    propcache protobuf psutil pyarrow pybind11 py-cpuinfo pygments pyparsing pyproject-hooks pyre-extensions
    pytest pytest-benchmark pytest-cov pytest-mock pytest-timeout pytest-xdist python-dateutil
    pytorch-lightning pyyaml regex requests rich sacrebleu safetensors scikit-build-core scikit-image
    scikit-learn scipy seaborn sentencepiece sentence-transformers setuptools shellingham simplejson six
    sortedcontainers statsmodels sympy tabulate tensorboard tensorboard-data-server tensorstore threadpoolctl
    tifffile tiktoken timm tokenizers toolz torch torchaudio torchdiffeq torch-geometric torchmetrics
    torchvision tqdm transformers treescope triton typer typing-extensions typing-inspect
    urllib3 uvloop wadler-lindig werkzeug wheel wrapt xarray xxhash yarl zipp""".split()
)
# what the project needs there: its requirements, with MLflow as its client and SQLite store (the
# server and UI, most of `mlflow`'s size, run where users look at runs, not on the device)
ROOTS = (
    "sam2",
    "deepspeed",
    "webdataset",
    "submitit",
    "omegaconf",
    "hydra-core",
    "iopath",
    "scipy",
    "pillow",
    "tqdm",
    "nvidia-ml-py",
    "numpy",
    "mlflow-skinny",
    "mlflow-tracing",
    "sqlalchemy",
    "alembic",
)
# published as source only, or built with flags: made into wheels here from the pinned source
BUILT_HERE = {
    "sam2": {"SAM2_BUILD_CUDA": "0"},
    "deepspeed": {"DS_BUILD_OPS": "0"},
    "iopath": {},
    "antlr4-python3-runtime": {},
}
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64", "manylinux1_x86_64")


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


# the wheelhouse ------------------------------------------------------------------------------------------


def needed_distributions() -> dict[str, str]:
    """{name: version installed here} of what ROOTS pull in (markers evaluated here), less the image's."""
    import importlib.metadata as md

    from packaging.requirements import Requirement

    found: dict[str, str] = {}
    stack = list(ROOTS)
    while stack:
        name = _canonical(stack.pop())
        if name in found or name in IMAGE_PACKAGES:
            continue
        dist = md.distribution(name)
        found[name] = dist.version
        for text in dist.requires or []:
            req = Requirement(text)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                stack.append(req.name)
    return dict(sorted(found.items()))


def _pip(*args: str, env: dict[str, str] | None = None) -> None:
    cmd = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q", *args]
    done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **(env or {})})
    if done.returncode != 0:
        raise SystemExit(f"gpu-check: {' '.join(cmd)} failed:\n{done.stderr.strip()[-3000:]}")


def _tag(python_version: str) -> str:
    return "cp" + python_version.replace(".", "")


def build_wheels(python_version: str = DEVICE_PYTHON) -> Path:
    """The wheelhouse for `python_version` (kept between runs: a wheel already there is not fetched
    again), its listing in `wheels.json`; refused over the size that can travel."""
    out = WHEELS / f"wheels-{_tag(python_version)}"
    out.mkdir(parents=True, exist_ok=True)
    needed = needed_distributions()
    have = {_canonical(p.name.split("-")[0]): p for p in out.glob("*.whl")}
    for name, version in needed.items():
        if name in have and f"-{version}-" in have[name].name:
            continue
        if name in BUILT_HERE:
            flags = ["--no-deps", "--no-build-isolation", "-w", str(out), f"{name}=={version}"]
            _pip("wheel", *flags, env=BUILT_HERE[name])
            continue
        platform = [flag for p in PLATFORMS for flag in ("--platform", p)]
        _pip(
            "download",
            "--no-deps",
            "--only-binary=:all:",
            "--python-version",
            python_version,
            "--implementation",
            "cp",
            *platform,
            "-d",
            str(out),
            f"{name}=={version}",
        )
    project = [p for p in out.glob("autosam2-*.whl")]
    for stale in project:
        stale.unlink()
    with tempfile.TemporaryDirectory(prefix="autosam2-wheel-") as build:  # the working tree, as it is
        shutil.copytree(
            REPO,
            build,
            dirs_exist_ok=True,
            ignore=shutil.ignore_patterns(
                ".venv", ".git", ".gpu-check", "demo", "output", "results", "*.egg-info", "build"
            ),
        )
        _pip("wheel", "--no-deps", "--no-build-isolation", "-w", str(out), build)
    wheels = sorted(out.glob("*.whl"))
    extra = [
        w.name
        for w in wheels
        if _canonical(w.name.split("-")[0]) not in needed and not w.name.startswith("autosam2-")
    ]
    for name in extra:  # a version pinned earlier: one version of each travels
        (out / name).unlink()
    wheels = sorted(out.glob("*.whl"))
    size = sum(w.stat().st_size for w in wheels)
    listing = {
        "python": python_version,
        "bytes": size,
        "MiB": round(size / 2**20, 1),
        "wheels": [w.name for w in wheels],
    }
    (out / "wheels.json").write_text(json.dumps(listing, indent=1))
    if size > WHEELHOUSE_LIMIT_MIB * 2**20:
        raise SystemExit(f"gpu-check: {out} is {size / 2**20:.1f} MiB, over {WHEELHOUSE_LIMIT_MIB} MiB")
    return out


def install(wheels: Path, target: Path, python: str = sys.executable) -> None:
    """The wheelhouse into `target` against `python`'s own torch: no index, no dependency resolution."""
    cmd = [
        python,
        "-m",
        "pip",
        "--disable-pip-version-check",
        "install",
        "-q",
        "--no-index",
        "--no-deps",
        "--no-compile",
        "--no-cache-dir",
        "--upgrade",
        "--target",
        str(target),
        *map(str, wheels.glob("*.whl")),
    ]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"gpu-check: installing {wheels} failed:\n{done.stderr.strip()[-3000:]}")


def image_stand_in(base: Path, site: Path) -> Path:
    """A venv whose Python sees only the standard library, the image's packages (linked from this
    venv, where installed here) and `site`: the device image, as far as imports can tell."""
    import importlib.metadata as md
    import sysconfig

    image = base / "image"
    image.mkdir(parents=True, exist_ok=True)
    for dist in md.distributions():
        if _canonical(dist.metadata["Name"]) not in IMAGE_PACKAGES:
            continue
        for top in {Path(f).parts[0] for f in dist.files or [] if not str(f).startswith("..")}:
            source = Path(dist.locate_file(top))
            if top not in ("bin", "__pycache__") and source.exists() and not (image / top).exists():
                (image / top).symlink_to(source)
    venv = base / "venv"
    subprocess.run(
        [getattr(sys, "_base_executable", sys.executable), "-m", "venv", "--without-pip", str(venv)],
        check=True,
    )
    purelib = Path(sysconfig.get_path("purelib", vars={"base": str(venv), "platbase": str(venv)}))
    (purelib / "autosam2_device_image.pth").write_text(f"{site}\n{image}\n")
    return venv / "bin" / "python"


# the check -----------------------------------------------------------------------------------------------


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
        result = _last_json(stdout) if code == 0 and figures else None
        entry = {"ok": code == 0 and (result is not None or not figures), "seconds": seconds}
        if entry["ok"]:
            entry["result"] = result
        else:
            entry["error"] = _tail(output)
        self.report["parts"][name] = entry
        self.save()
        print(f"gpu-check: {name}: {'ok' if entry['ok'] else 'FAILED'} in {seconds} s", flush=True)
        return result

    def close(self) -> None:
        self.report["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        self.save()
        self.log.close()


def _last_json(output: str) -> dict | None:
    """The JSON object a part printed last (the benchmarks print one, after any progress lines)."""
    start = output.rfind("\n{") + 1  # 0: the object is the first line
    try:
        return json.loads(output[start:]) if output[start:].startswith("{") else None
    except ValueError:
        return None


def _tail(output: str, lines: int = 12) -> str:
    return "\n".join(output.strip().splitlines()[-lines:])


def _sizes(dry: bool) -> dict:
    """What each part runs at: the configs as they are on a GPU (1024 px, 8-frame clips, 8 loader
    workers); tiny on the CPU, where every part still runs, in a few minutes on 2 cores."""
    if dry:
        size, clip, frames_per_sample = 64, 2, 4  # the smallest SAM2 runs at: plumbing, not figures
        return {
            "device": "cpu",
            "synth": ["--size", "128", "--sequences", "2", "--valid-sequences", "1", "--frames", "8"],
            "frames_per_sample": frames_per_sample,
            "train_overrides": [f"model.image_size={size}", f"data.clip_len={clip}", "data.num_workers=1"],
            "train_steps": 3,
            "memory_steps": 1,
            "infer": [
                "--image-size",
                str(size),
                "--frames",
                "4",
                "--rounds",
                "1",
                "--compile-backend",
                "aot_eager",
            ],
            "data": [
                "--image-size",
                str(size),
                "--clip-len",
                str(clip),
                "--batch-size",
                "1",
                "--batches",
                "3",
                "--rounds",
                "1",
            ],
            "workers": [1],
            "decode": ["--size", "128", "--frames", "8"],
        }
    return {
        "device": "cuda",
        "synth": ["--size", "1024", "--sequences", "4", "--valid-sequences", "1", "--frames", "32"],
        "frames_per_sample": 16,
        "train_overrides": [],
        "train_steps": 8,
        "memory_steps": 2,
        "infer": ["--image-size", "1024", "--frames", "32", "--rounds", "3"],
        "data": [
            "--image-size",
            "1024",
            "--clip-len",
            "8",
            "--batch-size",
            "1",
            "--batches",
            "12",
            "--rounds",
            "2",
        ],
        "workers": [1, 8],
        "decode": ["--size", "1024", "--frames", "64"],
    }


TRAIN_CONFIGS = {
    "ddp_hiera_t": "configs/gpu_hiera_t_1024.yaml",
    "zero2_hiera_bplus": "configs/gpu_hiera_bplus_1024_deepspeed.yaml",
}


def run_check(out: Path, dry: bool, budget_s: float) -> dict:
    check = Check(out, budget_s, dry)
    sizes = _sizes(dry)
    py = [sys.executable]
    cli = [*py, "-m", "autosam2.cli"]
    check.report["parts"]["environment"] = _environment(check.env)
    check.save()

    # bench memory's estimates are CPU work: on a big host they run beside the GPU parts, on cores
    # of their own; on a small one after them
    cores = sorted(os.sched_getaffinity(0))
    spare = set(cores[-4:]) if len(cores) >= 12 else None
    main_cpus = set(cores[:-4]) if spare else None
    estimates: dict[str, threading.Thread] = {}

    def estimate(name: str, config: str) -> None:
        cmd = [
            *cli,
            "bench",
            "memory",
            "--config",
            config,
            "--ranks",
            "1",
            "--device",
            "cpu",
            "--steps",
            str(sizes["memory_steps"]),
            *sizes["train_overrides"],
        ]
        check.part(f"estimate_{name}", cmd, 420, spare)

    if spare:
        for name, config in TRAIN_CONFIGS.items():
            estimates[name] = threading.Thread(target=estimate, args=(name, config))
        threads = list(estimates.values())
        runner = threading.Thread(target=lambda: [t.start() or t.join() for t in threads])
        runner.start()

    # one synthetic data set at the check's size for the training and data parts, made on every core
    data = Path(tempfile.mkdtemp(prefix="autosam2-gpu-check-"))
    every = str(max(1, len(cores) - 1))
    check.part(
        "synth",
        [*cli, "synth", "--out", str(data / "pg"), "--workers", every, *sizes["synth"]],
        180,
        figures=False,
    )
    check.part(
        "shards",
        [
            *py,
            "-m",
            "shards",
            "build",
            str(data / "pg"),
            "--split",
            "train",
            "--out",
            str(data / "shards"),
            "--frames-per-sample",
            str(sizes["frames_per_sample"]),
            "--workers",
            every,
        ],
        120,
        figures=False,
    )

    junit = out / "gpu_tests.xml"
    check.part(
        "tests",
        [
            *py,
            "-m",
            "pytest",
            "-m",
            "gpu",
            "tests/test_gpu.py",
            "-q",
            "-p",
            "no:cacheprovider",
            f"--junitxml={junit}",
        ],
        300,
        main_cpus,
        figures=False,
    )
    check.report["parts"]["tests"].update(_junit(junit))
    check.save()
    for name, config in TRAIN_CONFIGS.items():
        check.part(
            f"train_{name}",
            [
                *cli,
                "bench",
                "train",
                "--config",
                config,
                "--steps",
                str(sizes["train_steps"]),
                "--device",
                sizes["device"],
                "--shards",
                str(data / "shards"),
                *sizes["train_overrides"],
            ],
            240,
            main_cpus,
        )
    for variant in ("hiera_t", "hiera_b+"):
        for compiled in (False, True):
            name = f"infer_{variant.replace('+', 'plus')}_{'compiled' if compiled else 'eager'}"
            cmd = [
                *cli,
                "bench",
                "infer",
                "--variant",
                variant,
                "--bf16",
                "--device",
                sizes["device"],
                *sizes["infer"],
            ]
            check.part(name, cmd + (["--compile"] if compiled else []), 240 if compiled else 90, main_cpus)
    for workers in sizes["workers"]:
        check.part(
            f"data_{workers}_workers",
            [
                *cli,
                "bench",
                "data",
                "--root",
                str(data / "pg"),
                "--workers",
                str(workers),
                "--frames-per-sample",
                str(sizes["frames_per_sample"]),
                *sizes["data"],
            ],
            120,
            main_cpus,
        )
    check.part(
        "decode",
        [*py, "-m", "launch.gpu_check", "decode", "--device", sizes["device"], *sizes["decode"]],
        60,
        main_cpus,
    )
    if spare:
        runner.join(max(0.0, check.deadline - time.monotonic()))
    else:
        for name, config in TRAIN_CONFIGS.items():
            estimate(name, config)
    shutil.rmtree(data, ignore_errors=True)
    check.report["summary"] = summarize(check.report["parts"], dry)
    check.close()
    return check.report


def _environment(env: dict[str, str]) -> dict:
    code = (
        "import json, sys, torch; d = torch.cuda.is_available(); print(json.dumps({'python': sys.version.split()[0], "
        "'torch': torch.__version__, 'cuda': torch.version.cuda, 'card': torch.cuda.get_device_name() if d else None, "
        "'cards': torch.cuda.device_count(), 'cpus': len(__import__('os').sched_getaffinity(0))}))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    info = _last_json(done.stdout) or {"error": _tail(done.stderr)}
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


def summarize(parts: dict, dry: bool = False) -> dict:
    """The figures the issue's goals name, and whether each was met (None: not measured)."""
    summary: dict = {
        "tests_passed": parts.get("tests", {}).get("passed"),
        "tests_failed": parts.get("tests", {}).get("failed"),
    }
    for name in TRAIN_CONFIGS:
        measured = _get(parts, f"train_{name}", "memory", "max_allocated_GiB")
        estimated = _get(parts, f"estimate_{name}", "estimate_per_gpu_GiB")
        summary[name] = {
            "frames_per_s": _get(parts, f"train_{name}", "frames_per_s", "full_trainer"),
            "step_s": _get(parts, f"train_{name}", "step_s", "full_trainer"),
            "mfu": _get(parts, f"train_{name}", "mfu"),
            "data_wait_share": _get(parts, f"train_{name}", "data_wait_share"),
            "peak_allocated_GiB": measured,
            "peak_reserved_GiB": _get(parts, f"train_{name}", "memory", "max_reserved_GiB"),
            "estimate_GiB": estimated,
            "measured_over_estimate": round(measured / estimated, 3) if measured and estimated else None,
        }
    for variant in ("hiera_t", "hiera_bplus"):
        for mode in ("eager", "compiled"):
            summary[f"infer_{variant}_{mode}"] = {
                "streaming_fps": _get(parts, f"infer_{variant}_{mode}", "fps", "streaming_inference"),
                "encoder_fps": _get(parts, f"infer_{variant}_{mode}", "fps", "bare_image_encoder"),
                "ratio": _get(parts, f"infer_{variant}_{mode}", "ratio_streaming_over_encoder"),
                "compiled_ran": _get(parts, f"infer_{variant}_{mode}", "config", "compiled_ran"),
            }
    for name, part in parts.items():
        if name.startswith("data_") and part.get("ok"):
            workers = part["result"]["config"]["workers"] or 1
            summary[name] = {
                "frames_per_s": part["result"]["frames_per_s"]["a_shard_stream"],
                "frames_per_s_per_worker": round(
                    part["result"]["frames_per_s"]["a_shard_stream"] / workers, 1
                ),
            }
    summary["decode"] = _get(parts, "decode")
    fps_t = [summary[f"infer_hiera_t_{m}"]["streaming_fps"] for m in ("eager", "compiled")]
    zero2 = summary["zero2_hiera_bplus"]
    waits = [summary[n]["data_wait_share"] for n in TRAIN_CONFIGS]
    ratio = zero2["measured_over_estimate"]
    summary["goals"] = {
        "streaming_fps_hiera_t_1024_bf16_ge_120": max((f for f in fps_t if f), default=None),
        "zero2_bplus_peak_le_24GiB": zero2["peak_allocated_GiB"],
        "estimate_within_15pct": ratio,
        "data_wait_share_le_2pct": max((w for w in waits if w is not None), default=None),
    }
    goals = summary["goals"]
    if dry:  # tiny sizes on a CPU: the figures prove the plumbing, the goals are a GPU's
        summary["goals_met"] = "not judged: a dry run"
        return summary
    summary["goals_met"] = {
        "streaming_fps": None
        if goals["streaming_fps_hiera_t_1024_bf16_ge_120"] is None
        else goals["streaming_fps_hiera_t_1024_bf16_ge_120"] >= 120,
        "zero2_peak": None if zero2["peak_allocated_GiB"] is None else zero2["peak_allocated_GiB"] <= 24,
        "estimate": None if ratio is None else abs(ratio - 1) <= 0.15,
        "data_wait": None
        if goals["data_wait_share_le_2pct"] is None
        else goals["data_wait_share_le_2pct"] <= 0.02,
    }
    return summary


def print_table(report: dict) -> None:
    print("\npart                          ok     seconds")
    for name, part in report["parts"].items():
        print(f"{name:<30}{'yes' if part.get('ok') else 'NO':<7}{part.get('seconds', '')}")
    print(json.dumps(report.get("summary", {}), indent=1))


# decoding ------------------------------------------------------------------------------------------------


def decode_bench(args: argparse.Namespace) -> dict:
    """JPEG frames/s, one process (as evaluation reads): PIL into an array, the project's decoder on the
    CPU (torchvision), and on the device (nvJPEG on a GPU): whether `evaluate --decode-device` helps."""
    import io

    import numpy as np
    import torch
    from PIL import Image

    from autosam2.data.codec import decode_image

    rng = np.random.default_rng(0)
    frames = []
    for _ in range(args.frames):
        smooth = rng.integers(0, 256, (args.size // 16, args.size // 16, 3), dtype=np.uint8)
        image = Image.fromarray(smooth).resize((args.size, args.size), Image.BICUBIC)
        buf = io.BytesIO()
        image.save(buf, format="JPEG", quality=90)
        frames.append(buf.getvalue())
    device = torch.device(args.device)

    def rate(decode) -> float:
        decode(frames[0])
        start = time.perf_counter()
        for data in frames:
            decode(data)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return len(frames) / (time.perf_counter() - start)

    pil = rate(lambda data: np.array(Image.open(io.BytesIO(data)).convert("RGB")))
    cpu = rate(lambda data: decode_image(data, "frame"))
    there = rate(lambda data: decode_image(data, "frame", device))
    return {
        "size": args.size,
        "frames": args.frames,
        "pil_fps": round(pil, 1),
        "cpu_fps": round(cpu, 1),
        "device_fps": round(there, 1),
        "device": str(device),
        "cpu_over_pil": round(cpu / pil, 2),
        "device_over_cpu": round(there / cpu, 2),
    }


# entry ---------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    from autosam2.arguments import add_device, add_output_dir

    parser = argparse.ArgumentParser(prog="python -m launch.gpu_check", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    wheels = sub.add_parser("wheels", help="build the wheelhouse for the device's Python (here)")
    wheels.add_argument("--python-version", default=DEVICE_PYTHON)
    for name in ("run", "dry-run"):
        p = sub.add_parser(
            name, help="the check on this machine's GPU" if name == "run" else "the check on the CPU, tiny"
        )
        add_output_dir(p, "--out", type=Path, default=Path(os.environ.get("OUT") or "gpu-check-out"))
        p.add_argument("--budget-s", type=float, default=420 if name == "run" else 1500)
    run = sub.choices["run"]
    run.add_argument("--dry", action="store_true", help=argparse.SUPPRESS)
    decode = sub.add_parser("decode", help="JPEG decoding frames/s, PIL vs the device")
    add_device(decode, "cuda", device_alias=True)
    decode.add_argument("--size", type=int, default=1024)
    decode.add_argument("--frames", type=int, default=64)
    args = parser.parse_args(argv)

    if args.command == "wheels":
        out = build_wheels(args.python_version)
        listing = json.loads((out / "wheels.json").read_text())
        print(f"gpu-check: {len(listing['wheels'])} wheels, {listing['MiB']} MiB in {out.relative_to(REPO)}")
        print(
            f"on the device, from the repository root: bash launch/gpu_check.sh   (carry {out.relative_to(REPO)})"
        )
        return 0
    if args.command == "decode":
        print(json.dumps(decode_bench(args)))
        return 0
    if args.command == "run":
        report = run_check(args.output_dir.resolve(), args.dry, args.budget_s)
        print_table(report)
        return 0 if all(p.get("ok") for p in report["parts"].values()) else 1
    # dry-run: this Python's wheels into the stand-in image, then `run --dry` there
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    wheelhouse = build_wheels(version)
    with tempfile.TemporaryDirectory(prefix="autosam2-device-") as tmp:
        site = Path(tmp) / "site"
        python = image_stand_in(Path(tmp), site)
        install(wheelhouse, site)
        cmd = [
            str(python),
            "-m",
            "launch.gpu_check",
            "run",
            "--dry",
            "--output-dir",
            str(args.output_dir.resolve()),
            "--budget-s",
            str(args.budget_s),
        ]
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
        return subprocess.run(cmd, cwd=REPO, env=env).returncode


if __name__ == "__main__":
    sys.exit(main())
