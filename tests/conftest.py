"""Shared fixtures: tiny synthetic polyp_gen roots made by the project's own generator, shard sets, a
real MLflow server, the real SLURM. What is not a fixture lives in `tests/helpers.py`."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from autosam2.data.synthetic import SynthSpec, write_dataset
from tests.helpers import TINY, kill_group, start_mlflow_server


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


@pytest.fixture(scope="session")
def weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A weights file of a random-init model at 64 px (holding every weight), for evaluate and predict."""
    import torch

    from autosam2.config import load_config
    from autosam2.model.sam2_builder import build_autosam2
    from autosam2.model.weights import RunWeights

    folder = tmp_path_factory.mktemp("weights")
    cfg = load_config(None, ["model.image_size=64"])
    torch.manual_seed(0)
    RunWeights(folder, build_autosam2(cfg.model, torch.device("cpu")), cfg.model, True).save("w.pt", 0)
    return folder / "w.pt"


@pytest.fixture(scope="session")
def train_data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Synthetic shards at 256 px for training runs: 4 train + 2 valid sequences of 8 frames, one per shard."""
    from shards.writer import build

    base = tmp_path_factory.mktemp("train_data")
    write_dataset(base / "pg", SynthSpec(train_sequences=4, valid_sequences=2, frames=8, size=256, seed=5))
    for split in ("train", "valid"):
        build(base / "pg", split, base / "shards" / split, frames_per_sample=4, max_shard_mb=0.0001)
    return {"root": base / "pg", "train": base / "shards" / "train", "valid": base / "shards" / "valid"}


@pytest.fixture
def mlflow_server(tmp_path: Path):
    """(uri, process, store folder) of a real mlflow server, stopped at the end of the test."""
    store = tmp_path / "server"
    uri, proc = start_mlflow_server(store)
    try:
        yield uri, proc, store
    finally:
        kill_group(proc)


def _slurm(state: Path, *flags: str):
    """launch/slurm_test_cluster.sh started with `flags`, SLURM_CONF pointing at it while the caller
    runs, stopped and the previous SLURM_CONF back afterwards."""
    import os
    import subprocess

    script = Path(__file__).resolve().parents[1] / "launch" / "slurm_test_cluster.sh"
    env = {**os.environ, "AUTOSAM2_SLURM_DIR": str(state)}
    started = subprocess.run(
        ["bash", str(script), "start", *flags], capture_output=True, text=True, timeout=600, env=env
    )
    assert started.returncode == 0, started.stdout + started.stderr
    previous = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = str(state / "slurm.conf")
    try:
        yield state
    finally:
        subprocess.run(
            ["bash", str(script), "stop", *flags], capture_output=True, text=True, timeout=300, env=env
        )
        if previous is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = previous


@pytest.fixture(scope="session")
def slurm_cluster():
    """The real single-node SLURM of launch/slurm_test_cluster.sh, up for the session."""
    import os

    yield from _slurm(Path(os.environ.get("AUTOSAM2_SLURM_DIR", "/tmp/autosam2-slurm")))


@pytest.fixture(scope="module")
def slurm_hosts():
    """Three test hosts, node1..node3 (network namespaces on one bridge, 10.231.0.1 to .3), with a
    slurmd each, from launch/slurm_test_cluster.sh --hosts 3; jobs take two, the third stands in for
    a dead one. For the module, then removed."""
    yield from _slurm(Path("/tmp/autosam2-slurm-hosts"), "--hosts", "3")
