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
