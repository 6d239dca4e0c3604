"""`pip install autosam2` beside the site's own torch, as docs/install.md says: a fresh venv that already
holds torch 2.14.0 and torchvision 0.29.0 (a release other than constraints.txt's 2.14.1), the project's
wheel installed into it with no extra, then torch checked untouched, `pip check`, `autosam2 --help`, a
2-step training on the shipped CPU demo config (logging to SQLite) and an evaluation (logging to an MLflow
server) run from another directory, and a DeepSpeed run refused in one line.

The site's torch is 2.14.0 because it is the cheapest other release that runs here: 2.13.0+cpu (in the
machine's /opt/wheels) cannot import torchvision 0.28.0 from the registry (its `_C.so` needs
libtorch_cuda.so: "operator torchvision::nms does not exist"), and the 2.13.0 CUDA build wants other
CUDA libraries (cudnn 9.20, nccl 2.29.7) than those 2.14.x share. Cost, measured 2026-12-06 on the
2-core CPU machine of this repository's CI (pip's cache empty for the project's install): torch +
torchvision 49 s (555 MB torch wheel from PyPI; the nvidia-* and triton wheels lie on this machine's
disk, elsewhere they are ~3 GB more to download), the project 42 s, training 29 s, evaluation 44 s; the
whole test 249 and 307 s (two runs) under pytest beside other jobs, and 6.2 GB of disk under its tmp_path (5.6 GB of it
torch's venv)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest

from launch.wheelhouse import project_wheel

SITE_TORCH = ("torch==2.14.0", "torchvision==0.29.0")
TORCH_VERSION = "2.14.0"
# the install runs with the machine's pip configuration (its indexes and caps), never the checkout's code
ENV = {
    k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PIP_REQUIRE_VIRTUALENV")
}


def run(cmd: list[str], cwd: Path, timeout: int = 900, **env: str) -> subprocess.CompletedProcess:
    done = subprocess.run(cmd, cwd=cwd, env={**ENV, **env}, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{' '.join(map(str, cmd))}:\n{done.stdout[-3000:]}{done.stderr[-3000:]}"
    return done


def torch_files(python: Path, cwd: Path) -> dict:
    """torch's version and every file it installed, with its size and modification time."""
    snippet = (
        "import importlib.metadata as md, json\n"
        "d = md.distribution('torch')\n"
        "files = {str(f): [(s := d.locate_file(f).stat()).st_size, s.st_mtime_ns] for f in d.files"
        " if d.locate_file(f).exists()}\n"
        "print(json.dumps({'version': d.version, 'files': files}))\n"
    )
    return json.loads(run([str(python), "-c", snippet], cwd).stdout)


@pytest.mark.slow
def test_the_base_install_keeps_the_sites_torch_and_trains_and_evaluates(
    tiny_shards_pristine, tmp_path, mlflow_server
):
    venv = tmp_path / "venv"
    python, pip = venv / "bin" / "python", [str(venv / "bin" / "python"), "-m", "pip", "-q"]
    run([getattr(sys, "_base_executable", sys.executable), "-m", "venv", str(venv)], tmp_path)
    run([*pip, "install", *SITE_TORCH], tmp_path)  # the site's torch, there before the project
    before = torch_files(python, tmp_path)
    assert before["version"].split("+")[0] == TORCH_VERSION and len(before["files"]) > 1000

    # docs/install.md: build tools, then the project built against the installed torch
    run([*pip, "install", "setuptools>=64", "wheel"], tmp_path)
    wheel = project_wheel(tmp_path / "dist")
    run([*pip, "install", "--no-cache-dir", "--no-build-isolation", str(wheel)], tmp_path)

    assert torch_files(python, tmp_path) == before
    run([*pip, "check"], tmp_path)
    listed = run([str(python), "-m", "pip", "list", "--format", "json"], tmp_path).stdout  # -q hides it
    installed = {p["name"].lower() for p in json.loads(listed)}
    assert {"autosam2", "mlflow-skinny", "sqlalchemy", "psutil"} <= installed
    assert not {"mlflow", "deepspeed", "flask"} & installed  # the extras stay out of the base install

    autosam2 = str(venv / "bin" / "autosam2")
    assert "train" in run([autosam2, "--help"], tmp_path).stdout
    data = [f"data.train={tiny_shards_pristine['train']}", f"data.valid={tiny_shards_pristine['valid']}"]
    small = ["data.clip_len=2", "data.num_workers=0", "model.image_size=64", "train.device=cpu"]
    steps = [
        "train.max_steps=2",
        "train.checkpoint_every=2",
        "train.validate_every=2",
        "train.valid_sequences=1",
    ]
    train = [autosam2, "train", "--config", "cpu_demo", *data, *small, *steps, "train.output_dir=run"]
    run(train, tmp_path, OMP_NUM_THREADS="1")  # the shipped CPU demo config, made tiny
    # the default store: beside the output directory, shared by the runs of the folder
    assert (tmp_path / "run" / "final.pt").is_file() and (tmp_path / "mlflow.db").is_file()
    # MLflow's client alone logs to a server too (the server is this checkout's, with the server extra)
    uri = mlflow_server[0]
    valid = str(tiny_shards_pristine["valid"])
    evaluate = [autosam2, "evaluate", "--weights", "run/final.pt", "--data", valid, "--output-dir", "results"]
    run([*evaluate, "--cpu", "--tracking-uri", uri], tmp_path, OMP_NUM_THREADS="1")
    assert json.loads((tmp_path / "results" / "metrics.json").read_text())["summary"]
    client = mlflow.MlflowClient(uri)
    served = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert [r.info.status for r in served] == ["FINISHED"]

    deepspeed = [autosam2, "train", *data, *small, "train.output_dir=ds", "train.engine=deepspeed"]
    refused = subprocess.run(deepspeed, cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=300)
    assert refused.returncode == 1 and not (tmp_path / "ds").exists()
    assert (
        refused.stderr == "autosam2 train: train.engine=deepspeed needs: pip install 'autosam2[deepspeed]'\n"
    )
