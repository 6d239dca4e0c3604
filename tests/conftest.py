"""Shared fixtures: tiny synthetic polyp_gen roots made by the project's own generator."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

from autosam2.data.synthetic import SynthSpec, write_dataset

TINY = SynthSpec(train_sequences=2, valid_sequences=1, frames=12, size=64, seed=3)

# two local processes under torchrun (gloo on the CPU); append the module or script and its arguments
TORCHRUN_2 = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]


@pytest.fixture(scope="session")
def tiny_root_pristine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("tiny") / "polyp_gen"
    write_dataset(root, TINY)
    return root


@pytest.fixture
def tiny_root(tiny_root_pristine: Path, tmp_path: Path) -> Path:
    """A private copy of the tiny dataset that a test may damage."""
    root = tmp_path / "polyp_gen"
    shutil.copytree(tiny_root_pristine, root)
    return root


@pytest.fixture(scope="session")
def tiny_shards_pristine(
    tiny_root_pristine: Path, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Path]:
    """Shards of the tiny dataset: 5 frames per sample, so 12-frame sequences make chunks of 5, 5, 2."""
    from shards.writer import build

    out = tmp_path_factory.mktemp("tiny_shards")
    return {
        split: (build(tiny_root_pristine, split, out / split, frames_per_sample=5), out / split)[1]
        for split in ("train", "valid")
    }


@pytest.fixture
def tiny_shards(tiny_shards_pristine: dict[str, Path], tmp_path: Path) -> dict[str, Path]:
    """A private copy of the tiny shard sets that a test may damage."""
    copies = {}
    for split, path in tiny_shards_pristine.items():
        copies[split] = tmp_path / "shards" / split
        shutil.copytree(path, copies[split])
    return copies


def rewrite_tar(path: Path, edit) -> None:
    """Rewrite a tar in place; `edit(name, data)` returns new bytes, or None to drop the member."""
    import io
    import tarfile

    with tarfile.open(path) as tar:
        members = [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            new = edit(name, data)
            if new is None:
                continue
            info = tarfile.TarInfo(name)
            info.size = len(new)
            tar.addfile(info, io.BytesIO(new))


def truncate(path: Path, fraction: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * fraction)])


@pytest.fixture(scope="session")
def train_data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Synthetic shards at 256 px for training runs: 4 train + 2 valid sequences of 8 frames, one per shard."""
    from shards.writer import build

    base = tmp_path_factory.mktemp("train_data")
    write_dataset(base / "pg", SynthSpec(train_sequences=4, valid_sequences=2, frames=8, size=256, seed=5))
    for split in ("train", "valid"):
        build(base / "pg", split, base / "shards" / split, frames_per_sample=4, max_shard_mb=0.0001)
    return {"root": base / "pg", "train": base / "shards" / "train", "valid": base / "shards" / "valid"}


def train_overrides(data: dict[str, Path], out: Path, **extra: object) -> list[str]:
    """A few-step CPU run at 256 px: hiera-t, 2-frame clips, frame mode, trainable decoder."""
    settings = {
        "data.train": data["train"],
        "data.valid": data["valid"],
        "data.clip_len": 2,
        "data.num_workers": 1,
        "data.shuffle_buffer": 2,
        "model.image_size": 256,
        "model.clip_mode": "video",
        "model.freeze.mask_decoder": "false",
        "optim.lr": 0.001,
        "optim.warmup_steps": 1,
        "train.max_steps": 4,
        "train.device": "cpu",
        "train.precision": "fp32",
        "train.output_dir": out,
        "train.checkpoint_every": 2,
        "train.validate_every": 4,
        "train.log_every": 1,
        "train.valid_sequences": 2,
        "tracking.system_metrics": "false",
        **extra,
    }
    return [f"{k}={v}" for k, v in settings.items()]


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def kill_group(proc) -> None:
    """Stop a process started with start_new_session=True, and everything it started."""
    import os
    import signal
    import subprocess

    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=10)
    except ProcessLookupError:
        pass
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def start_mlflow_server(store: Path, backend_uri: str | None = None, timeout_s: float = 60):
    """A real `mlflow server` on 127.0.0.1 in its own process group; returns (uri, process)."""
    import os
    import subprocess
    import sys
    import time
    import urllib.request

    port = free_port()
    store.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
    cmd = [
        str(Path(sys.executable).with_name("mlflow")),
        "server",
        "--backend-store-uri",
        backend_uri or f"sqlite:///{store}/mlflow.db",
    ]
    cmd += [
        "--artifacts-destination",
        str(store / "artifacts"),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",
    ]
    with open(store / "server.log", "wb") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1) as reply:
                if reply.status == 200:
                    return f"http://127.0.0.1:{port}", proc
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            kill_group(proc)
            raise RuntimeError(
                f"mlflow server did not become healthy: {(store / 'server.log').read_text()[-2000:]}"
            )
        time.sleep(0.2)


@pytest.fixture
def mlflow_server(tmp_path: Path):
    """(uri, process, store folder) of a real mlflow server, stopped at the end of the test."""
    store = tmp_path / "server"
    uri, proc = start_mlflow_server(store)
    try:
        yield uri, proc, store
    finally:
        kill_group(proc)


@pytest.fixture(scope="session")
def slurm_cluster():
    """The real single-node SLURM of launch/slurm_test_cluster.sh, up for the session."""
    import os
    import subprocess

    script = Path(__file__).resolve().parents[1] / "launch" / "slurm_test_cluster.sh"
    state = Path(os.environ.get("AUTOSAM2_SLURM_DIR", "/tmp/autosam2-slurm"))
    started = subprocess.run(["bash", str(script), "start"], capture_output=True, text=True, timeout=600)
    assert started.returncode == 0, started.stdout + started.stderr
    previous = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = str(state / "slurm.conf")
    try:
        yield state
    finally:
        subprocess.run(["bash", str(script), "stop"], capture_output=True, text=True, timeout=300)
        if previous is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = previous
