"""`autosam2 demo`: its data steps give every split shards, and its evaluation step scores each model on
the valid and the held-out test split, side by side in the tables and in demo.json."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from autosam2 import demo
from autosam2.cli import main as cli
from autosam2.data.synthetic import SynthSpec, write_dataset


@pytest.fixture
def commands(monkeypatch) -> list[list[str]]:
    """The stages the demo runs, each run here in this process (autosam2 and shards commands)."""
    from shards.__main__ import main as shards

    ran: list[list[str]] = []

    def run_here(cmd: list[str]) -> None:
        assert cmd[0] == sys.executable and cmd[1] == "-m", cmd
        ran.append(cmd)
        command = {"autosam2.cli": cli, "shards": shards}[cmd[2]]
        assert command(cmd[3:]) == 0, cmd

    monkeypatch.setattr(demo, "_run", run_here)
    return ran


def test_the_data_steps_write_and_shard_a_test_split(tmp_path, commands, monkeypatch):
    small = SynthSpec(train_sequences=1, valid_sequences=1, frames=4, size=32)
    real = demo._run

    def smaller(cmd: list[str]) -> None:  # the demo's synth flags, at a size a test can afford
        if cmd[3] == "synth":
            cmd = [*cmd, "--sequences", "1", "--valid-sequences", "1", "--frames", "4", "--size", "32"]
        real(cmd)

    monkeypatch.setattr(demo, "_run", smaller)
    demo._data(tmp_path / "pg", tmp_path / "shards")
    synth = next(cmd for cmd in commands if cmd[3] == "synth")
    assert synth[synth.index("--test-sequences") + 1] == str(demo.TEST_SEQUENCES)
    written = json.loads((tmp_path / "pg" / "synth.json").read_text())
    assert written["splits"]["test"] == [f"seq{3 + i}" for i in range(demo.TEST_SEQUENCES)]
    assert written["spec"]["frames"] == small.frames
    for split in ("train", "valid", "test"):
        manifest = json.loads((tmp_path / "shards" / split / "manifest.json").read_text())
        assert manifest["split"] == split
    assert [cmd[3] for cmd in commands if cmd[2] == "shards"] == ["build", "verify"] * 3


@pytest.fixture
def demo_set(tmp_path) -> tuple[Path, Path]:
    """A tiny synthetic set with a test split, its valid and test splits sharded."""
    from shards.writer import build

    root = tmp_path / "pg"
    write_dataset(root, SynthSpec(train_sequences=1, valid_sequences=1, test_sequences=1, frames=5, size=64))
    for split in ("valid", "test"):
        build(root, split, tmp_path / "shards" / split, frames_per_sample=5)
    return root, tmp_path / "shards"


@pytest.mark.slow  # two evaluations, each logged to MLflow (which starts a process)
def test_each_model_is_scored_on_valid_and_test_side_by_side(demo_set, weights, tmp_path, commands, capsys):
    root, shards = demo_set
    results, uri = tmp_path / "results", f"sqlite:///{tmp_path / 'mlflow.db'}"
    summaries = demo._evaluate(root, shards, results, uri, [("tiny model", weights, "frame")])
    assert list(summaries["tiny model"]) == ["valid", "test"]
    test = json.loads((results / "w-frame-test" / "metrics.json").read_text())
    assert list(test["per_sequence"]) == ["seq3"] and test["data"] == str(shards / "test")
    valid = json.loads((results / "w-frame" / "metrics.json").read_text())
    assert list(valid["per_sequence"]) == ["seq2"]
    assert (results / "w-frame" / "overlays").is_dir() and not (
        results / "w-frame-test" / "overlays"
    ).exists()
    figures = summaries["tiny model"]["test"]
    assert figures["dice"] == test["summary"]["dice"] and figures["sequences"] == 1
    assert figures["frames"]["all"] == 5 and figures["dice_hidden"] == test["episodes"]["hidden"]["dice"]

    capsys.readouterr()
    demo._summary("the tiny set", summaries)
    lines = capsys.readouterr().out.splitlines()
    assert lines[3].split()[:3] == ["tiny", "model", "valid"] and lines[4].split()[0] == "test"
    assert f"{figures['dice']:.3f}" == lines[4].split()[1]
    assert lines[5].startswith("(valid: 1 sequences, 5 frames") and lines[6].startswith("(test: 1 sequences")

    (tmp_path / "demo.json").write_text(json.dumps({"written_by": "autosam2 demo"}))
    demo._record(tmp_path, {"the tiny set": summaries}, 90)
    record = json.loads((tmp_path / "demo.json").read_text())
    assert record["written_by"] == "autosam2 demo" and record["minutes"] == 1.5
    assert record["results"]["the tiny set"]["tiny model"]["test"]["dice"] == figures["dice"]
    assert "held out" in record["held_out"]
