"""The extras of the install: a command that needs one that is missing says, in one line, which to install."""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

import pytest

from autosam2.bench.mlflow_server import start_mlflow_server
from autosam2.config import load_config
from autosam2.engine.engines import require_deepspeed
from autosam2.engine.inputs import check_inputs
from autosam2.errors import run_command
from autosam2.extras import EXTRAS, MissingExtra, require


@pytest.fixture
def without_extras(monkeypatch: pytest.MonkeyPatch) -> None:
    """The install as `pip install autosam2` leaves it: neither DeepSpeed nor the MLflow server."""
    real = importlib.metadata.distribution

    def distribution(name: str):
        if name in EXTRAS.values():
            raise importlib.metadata.PackageNotFoundError(name)
        return real(name)

    monkeypatch.setattr(importlib.metadata, "distribution", distribution)


def test_installed_extras_pass():
    for extra in EXTRAS:
        require(extra, "this test")


def test_deepspeed_missing_is_one_line_naming_the_extra(without_extras, capsys):
    def command() -> None:
        require_deepspeed()

    assert run_command("autosam2 train", command) == 1
    assert (
        capsys.readouterr().err
        == "autosam2 train: train.engine=deepspeed needs: pip install 'autosam2[deepspeed]'\n"
    )


def test_a_deepspeed_run_is_refused_with_its_inputs_before_anything_is_written(
    without_extras, tiny_shards_pristine, tmp_path
):
    out = tmp_path / "run"
    overrides = [
        f"data.train={tiny_shards_pristine['train']}",
        f"data.valid={tiny_shards_pristine['valid']}",
        f"train.output_dir={out}",
        "data.clip_len=2",
        "train.engine=deepspeed",
    ]
    with pytest.raises(
        MissingExtra, match=r"^train.engine=deepspeed needs: pip install 'autosam2\[deepspeed\]'$"
    ):
        check_inputs(load_config(None, overrides))
    assert not out.exists()


def test_a_server_without_the_server_extra_is_one_line_and_starts_nothing(without_extras, tmp_path: Path):
    with pytest.raises(MissingExtra, match=r"^an MLflow server needs: pip install 'autosam2\[server\]'$"):
        start_mlflow_server(tmp_path / "server")
    assert not (tmp_path / "server").exists()


def test_the_demos_ui_line_names_the_server_extra_only_where_it_is_missing(monkeypatch, capsys):
    from autosam2.demo import _print_ui_line

    _print_ui_line("sqlite:///x/mlflow.db")
    here = capsys.readouterr().out
    assert "mlflow ui --backend-store-uri sqlite:///x/mlflow.db" in here and "autosam2[server]" not in here
    real = importlib.metadata.distribution

    def distribution(name: str):
        if name == EXTRAS["server"]:
            raise importlib.metadata.PackageNotFoundError(name)
        return real(name)

    monkeypatch.setattr(importlib.metadata, "distribution", distribution)
    _print_ui_line("sqlite:///x/mlflow.db")
    assert "(MLflow's UI is not installed here: pip install 'autosam2[server]')" in capsys.readouterr().out
