"""Shared fixtures: tiny synthetic polyp_gen roots made by the project's own generator."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from autosam2.data.synthetic import SynthSpec, write_dataset

TINY = SynthSpec(train_sequences=2, valid_sequences=1, frames=12, size=64, seed=3)


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
