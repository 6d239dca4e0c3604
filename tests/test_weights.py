"""The trained-weights format: what `train` writes, `evaluate` rebuilds, and what is refused in one line."""

from __future__ import annotations

import errno

import pytest
import torch

from autosam2.config import ModelConfig
from autosam2.errors import CheckpointError
from autosam2.model.sam2_builder import build_autosam2, save_sam2_checkpoint
from autosam2.model.weights import (
    RunWeights,
    init_from_weights,
    load_trained_model,
    read_weights,
    save_weights,
)
from tests.helpers import TinyModel

SMALL = ModelConfig(image_size=64)


def _trained(cfg: ModelConfig):
    torch.manual_seed(1)
    model = build_autosam2(cfg)
    with torch.no_grad():
        for p in model.prompt_encoder.parameters():
            p.add_(0.5)  # unlike a fresh prompt encoder, which is zero at its output
    return model


def test_a_random_init_run_rebuilds_exactly_from_its_file_alone(tmp_path):
    model = _trained(SMALL)
    save_weights(tmp_path / "final.pt", model, SMALL, full=True, extra={"step": 7})
    rebuilt, payload = load_trained_model(tmp_path / "final.pt", None, torch.device("cpu"))
    assert payload["extra"] == {"step": 7} and payload["model_config"]["variant"] == "hiera_t"
    assert not rebuilt.training
    mine, theirs = model.state_dict(), rebuilt.state_dict()
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)


def test_a_run_from_a_checkpoint_keeps_only_the_trained_parts_and_needs_that_checkpoint(tmp_path):
    torch.manual_seed(2)
    save_sam2_checkpoint(build_autosam2(SMALL), tmp_path / "sam2.pt")
    cfg = ModelConfig(image_size=64, checkpoint=str(tmp_path / "sam2.pt"))
    model = _trained(cfg)
    save_weights(tmp_path / "best.pt", model, cfg, full=False)
    stored = read_weights(tmp_path / "best.pt")["model"]
    assert stored and all(k.startswith("prompt_encoder.") for k in stored)  # the only trainable part
    with pytest.raises(CheckpointError, match=r"best\.pt: holds the trained parts only; pass --checkpoint"):
        load_trained_model(tmp_path / "best.pt", None, torch.device("cpu"))
    rebuilt, _ = load_trained_model(tmp_path / "best.pt", tmp_path / "sam2.pt", torch.device("cpu"))
    mine, theirs = model.state_dict(), rebuilt.state_dict()
    assert all(torch.equal(mine[k], theirs[k]) for k in mine)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "weights file not found"),
        (b"not a zip", "not a loadable weights file"),
        ({"model": {}}, "not an AutoSAM2 weights file"),
    ],
)
def test_a_missing_or_foreign_file_is_one_error_naming_it(tmp_path, content, message):
    path = tmp_path / "w.pt"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        torch.save(content, path)
    with pytest.raises(CheckpointError, match=rf"w\.pt: {message}"):
        read_weights(path)


def test_a_weights_file_with_a_foreign_model_config_names_the_key(tmp_path):
    save_weights(tmp_path / "w.pt", _trained(SMALL), SMALL, full=True)
    payload = torch.load(tmp_path / "w.pt", weights_only=True)
    payload["model_config"]["variant"] = "hiera_xxl"
    torch.save(payload, tmp_path / "w.pt")
    with pytest.raises(ValueError, match=r"w\.pt: model_config: variant must be one of"):
        load_trained_model(tmp_path / "w.pt", None, torch.device("cpu"))


def test_only_the_main_rank_writes_the_runs_weights(tmp_path):
    model = TinyModel()
    RunWeights(tmp_path / "a", model, SMALL, is_main=False).save("initial.pt", 0)
    assert not (tmp_path / "a").exists()
    path = RunWeights(tmp_path / "b", model, SMALL, is_main=True).save("best.pt", 3, {"valid/dice": 0.5})
    assert read_weights(path)["extra"] == {"step": 3, "valid/dice": 0.5} and read_weights(path)["full"]


def test_weights_on_a_full_disk_name_the_file_and_leave_no_temp(tmp_path, monkeypatch):
    def full(obj, f, *args, **kwargs):
        f.write(b"x")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(CheckpointError, match=r"best\.pt: no space left on device writing weights"):
        save_weights(tmp_path / "best.pt", TinyModel(), SMALL, full=True)
    assert list(tmp_path.iterdir()) == []


def test_a_next_stage_starts_from_the_last_ones_weights_and_refuses_another_model(tmp_path):
    stage1 = _trained(SMALL)
    save_weights(tmp_path / "final.pt", stage1, SMALL, full=True, extra={"step": 240})
    video = ModelConfig(image_size=64, clip_mode="video")  # the next stage: another mode, the same model
    torch.manual_seed(9)
    stage2 = build_autosam2(video)
    assert init_from_weights(stage2, tmp_path / "final.pt", video) == {"step": 240}
    mine, theirs = stage1.state_dict(), stage2.state_dict()
    assert all(torch.equal(mine[k], theirs[k]) for k in mine)

    bigger = ModelConfig(image_size=128)
    with pytest.raises(
        CheckpointError, match=r"final\.pt: trained another model: image_size 64 \(this run: 128\)"
    ):
        init_from_weights(build_autosam2(bigger), tmp_path / "final.pt", bigger)
    torch.manual_seed(2)
    save_sam2_checkpoint(build_autosam2(SMALL), tmp_path / "sam2.pt")
    from_sam2 = ModelConfig(image_size=64, checkpoint=str(tmp_path / "sam2.pt"))
    save_weights(tmp_path / "partial.pt", _trained(from_sam2), from_sam2, full=False)
    with pytest.raises(
        CheckpointError, match=r"partial\.pt: holds the trained parts only.*model\.checkpoint="
    ):
        init_from_weights(build_autosam2(SMALL), tmp_path / "partial.pt", SMALL)
