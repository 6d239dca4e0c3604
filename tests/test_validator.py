"""Training's validation: the figures it logs are `autosam2 evaluate`'s, under the same names and rules."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from autosam2.metrics import DICE_RULES
from tests.helpers import INFO, RecordingLogger, runs_of

REPO = Path(__file__).resolve().parents[1]


def evaluate(weights: Path, data: Path, out: Path) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "autosam2.cli", "evaluate", "--weights", str(weights), "--data", str(data)]
    cmd += ["--output-dir", str(out), "--no-overlays", "--cpu"]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)


def test_valid_dice_is_evaluate_dice_and_no_name_means_two_rules(tmp_path, tiny_root):
    """A model that never predicts a polyp (as after a few steps) on a valid sequence of 12 frames, the
    last 4 polyp-free: our rule scores those 4 frames 1 (dice 4/12), the toolbox's scores every frame 0.
    Each figure's name must carry one rule: validation's ``valid/X`` is evaluate's ``eval/X``."""

    from autosam2.config import load_config
    from autosam2.data.sources import read_sequences
    from autosam2.engine.validator import Validator
    from autosam2.eval.inference import evaluate_sequences
    from autosam2.model.sam2_builder import build_autosam2
    from autosam2.model.weights import RunWeights, load_trained_model

    cfg = load_config(None, ["model.image_size=64", f"data.valid={tiny_root}"])
    torch.manual_seed(0)
    model = build_autosam2(cfg.model, torch.device("cpu"))
    with torch.no_grad():  # the object score: no polyp anywhere, so every predicted mask is empty
        model.sam_mask_decoder.pred_obj_score_head.layers[-1].bias.fill_(-100.0)
    weights = RunWeights(tmp_path, model, cfg.model, True)
    path = weights.save("w.pt", 0)
    validated = Validator(cfg, model, INFO, RecordingLogger(), tmp_path / "run", weights).validate(1)
    assert validated["valid/dice"] == pytest.approx(4 / 12)

    done = evaluate(path, tiny_root, tmp_path / "evaluated")  # --metric-mode ours, the default
    assert done.returncode == 0, done.stderr[-3000:]
    ours = json.loads((tmp_path / "evaluated" / "metrics.json").read_text())["summary"]
    # the sunseg mode through evaluate's own path (inference into the accumulator, its summary)
    sequences = read_sequences(str(tiny_root), "valid", 0, 1)
    model = load_trained_model(path, None, torch.device("cpu"))[0]
    sunseg = evaluate_sequences(model, sequences, torch.device("cpu"), metric_mode="sunseg").summary()
    for summary in (ours, sunseg):
        shared = {k for k in summary if f"valid/{k}" in validated}
        assert {k: summary[k] for k in shared} == pytest.approx(
            {k: validated[f"valid/{k}"] for k in shared}, abs=1e-6
        )
    assert ours["dice"] == pytest.approx(validated["valid/dice"], abs=1e-6)
    assert "dice" not in sunseg and sunseg["meanDice"] < 1e-3  # > 0 only at the sweep's threshold 0
    # w.pt is no training run's: the run goes to the default store, beside the output folder
    client, (run,) = runs_of(tmp_path / "evaluated", f"sqlite:///{tmp_path.resolve()}/mlflow.db")
    assert run.data.metrics["eval/dice"] == pytest.approx(validated["valid/dice"], abs=1e-6)
    help_text = subprocess.run(
        [sys.executable, "-m", "autosam2.cli", "evaluate", "--help"], cwd=REPO, capture_output=True, text=True
    ).stdout
    assert DICE_RULES in help_text
