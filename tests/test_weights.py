"""The trained-weights format: what `train` writes, `evaluate` rebuilds, and what is refused in one line."""

from __future__ import annotations

import errno
import hashlib
import shutil

import pytest
import torch
from torch import nn

from autosam2.config import ModelConfig
from autosam2.errors import CheckpointError
from autosam2.model.sam2_builder import build_autosam2, build_model, save_sam2_checkpoint
from autosam2.model.weights import (
    Base,
    NonFiniteWeights,
    RunWeights,
    init_from_weights,
    load_trained_model,
    read_weights,
    save_weights,
    trained_tensors,
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


def _same(a: nn.Module, b: nn.Module) -> bool:
    mine, theirs = a.state_dict(), b.state_dict()
    return mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)


def test_a_full_file_rebuilds_exactly_from_itself_alone(tmp_path):
    model = _trained(SMALL)
    save_weights(tmp_path / "final.pt", model, SMALL, base=None, extra={"step": 7})
    rebuilt, payload = load_trained_model(tmp_path / "final.pt", None, torch.device("cpu"))
    assert payload["extra"] == {"step": 7} and payload["model_config"]["variant"] == "hiera_t"
    assert not rebuilt.training
    mine, theirs = model.state_dict(), rebuilt.state_dict()
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)


def test_a_run_from_a_checkpoint_keeps_the_trained_parts_and_names_that_checkpoint(tmp_path):
    torch.manual_seed(2)
    sam2 = tmp_path / "models" / "sam2.pt"
    sam2.parent.mkdir()
    save_sam2_checkpoint(build_autosam2(SMALL), sam2)
    cfg = ModelConfig(image_size=64, checkpoint=str(sam2))
    model = _trained(cfg)
    weights = RunWeights(tmp_path / "run", model, cfg, is_main=True).save("best.pt", 3)
    assert not (tmp_path / "run" / "base.pt").exists()  # the checkpoint is the base
    payload = read_weights(weights)
    assert payload["model"] and all(k.startswith("prompt_encoder.") for k in payload["model"])
    digest = hashlib.sha256(sam2.read_bytes()).hexdigest()
    assert payload["base"] == {
        "path": str(sam2),
        "relative": "../models/sam2.pt",
        "bytes": sam2.stat().st_size,
        "sha256": digest,
    }
    assert _same(model, load_trained_model(weights, None, torch.device("cpu"))[0])  # found where it was

    elsewhere = tmp_path / "elsewhere.pt"
    sam2.rename(elsewhere)
    with pytest.raises(
        CheckpointError,
        match=rf"best\.pt: holds what was trained on top of {sam2} \(.* sha256 {digest[:16]}\), which is not "
        r"there, nor beside the weights file; pass --checkpoint PATH to that file",
    ):
        load_trained_model(weights, None, torch.device("cpu"))
    assert _same(model, load_trained_model(weights, elsewhere, torch.device("cpu"))[0])
    torch.manual_seed(3)
    save_sam2_checkpoint(build_autosam2(SMALL), tmp_path / "other.pt")
    with pytest.raises(
        CheckpointError,
        match=r"other\.pt: is another file, holding hiera_t \(SAM2\.1\), not the SAM2 weights .*best\.pt",
    ):
        load_trained_model(weights, tmp_path / "other.pt", torch.device("cpu"))


def test_a_random_init_run_writes_its_base_once_and_loads_from_a_moved_folder(tmp_path):
    model = _trained(SMALL)
    run = RunWeights(tmp_path / "run", model, SMALL, is_main=True)
    initial = run.begin()
    base = tmp_path / "run" / "base.pt"
    inode = base.stat().st_ino
    frozen = model.sam_mask_decoder.iou_token.weight
    kept = frozen.detach().clone()
    with torch.no_grad():
        frozen.add_(1.0)  # frozen here: a base changed after begin() is not written again
    final = run.save("final.pt", 9)
    assert base.stat().st_ino == inode  # written once, by begin()
    payload = read_weights(final)
    assert not payload["full"] and payload["base"]["relative"] == "base.pt"
    assert payload["base"]["sha256"] == Base.of(base).sha256
    assert final.stat().st_size < base.stat().st_size / 50  # the prompt head only, on hiera-t
    assert read_weights(initial)["base"] == payload["base"]

    shutil.move(tmp_path / "run", tmp_path / "moved")  # the recorded absolute path is gone
    rebuilt, _ = load_trained_model(tmp_path / "moved" / "final.pt", None, torch.device("cpu"))
    with torch.no_grad():
        frozen.copy_(kept)
    assert _same(model, rebuilt)
    # base.pt is a SAM2 checkpoint in its own format: it builds SAM2 strictly
    build_model("hiera_t", 64, tmp_path / "moved" / "base.pt")
    (tmp_path / "moved" / "base.pt").write_bytes(b"another")
    with pytest.raises(CheckpointError, match=r"final\.pt: .*base\.pt differs; pass --checkpoint"):
        load_trained_model(tmp_path / "moved" / "final.pt", None, torch.device("cpu"))


def test_a_version_1_file_still_loads(tmp_path):
    model = _trained(SMALL)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    payload = {"format": "autosam2-weights", "version": 1, "full": True, "extra": {"step": 2}}
    torch.save({**payload, "model_config": read_config(SMALL), "model": state}, tmp_path / "old.pt")
    assert _same(model, load_trained_model(tmp_path / "old.pt", None, torch.device("cpu"))[0])
    partial = {k: v for k, v in state.items() if k.startswith("prompt_encoder.")}
    torch.save(
        {**payload, "full": False, "model_config": read_config(SMALL), "model": partial}, tmp_path / "p.pt"
    )
    with pytest.raises(CheckpointError, match=r"p\.pt: holds the trained parts only; pass --checkpoint"):
        load_trained_model(tmp_path / "p.pt", None, torch.device("cpu"))


def read_config(cfg: ModelConfig) -> dict:
    from autosam2.config import to_dict

    return to_dict(cfg)


def test_weights_that_are_not_finite_are_never_written(tmp_path):
    model = _trained(SMALL)
    name = next(n for n, p in model.named_parameters() if p.requires_grad)
    with torch.no_grad():
        dict(model.named_parameters())[name].view(-1)[:3] = float("nan")
    with pytest.raises(
        NonFiniteWeights, match=rf"best\.pt: not written: .*: 3 of [\d,]+ values are not finite \(in {name}\)"
    ):
        RunWeights(tmp_path, model, SMALL, is_main=True).save("best.pt", 4)
    assert not (tmp_path / "best.pt").exists()


def test_the_trained_state_holds_the_running_statistics_of_a_trained_norm():
    model = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2), nn.BatchNorm1d(2))
    model[2].requires_grad_(False)
    assert sorted(trained_tensors(model)) == [
        "0.bias",
        "0.weight",
        "1.bias",
        "1.num_batches_tracked",
        "1.running_mean",
        "1.running_var",
        "1.weight",
    ]


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
    save_weights(tmp_path / "w.pt", _trained(SMALL), SMALL, base=None)
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
    assert read_weights(path)["extra"] == {"step": 3, "valid/dice": 0.5} and not read_weights(path)["full"]
    assert (tmp_path / "b" / "base.pt").is_file()
    full = RunWeights(tmp_path / "c", model, SMALL, is_main=True, full=True).save("best.pt", 3)
    assert read_weights(full)["full"] and not (tmp_path / "c" / "base.pt").exists()


def test_weights_on_a_full_disk_name_the_file_and_leave_no_temp(tmp_path, monkeypatch):
    def full(obj, f, *args, **kwargs):
        f.write(b"x")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(CheckpointError, match=r"best\.pt: no space left on device writing weights"):
        save_weights(tmp_path / "best.pt", TinyModel(), SMALL, base=None)
    assert list(tmp_path.iterdir()) == []


def test_a_next_stage_starts_from_the_last_ones_weights_and_refuses_another_model(tmp_path):
    stage1 = _trained(SMALL)
    RunWeights(tmp_path, stage1, SMALL, is_main=True).save("final.pt", 240)  # on top of its base.pt
    video = ModelConfig(image_size=64, clip_mode="video")  # the next stage: another mode, the same model
    torch.manual_seed(9)
    stage2 = build_autosam2(video)
    assert init_from_weights(stage2, tmp_path / "final.pt", video) == {"step": 240}
    assert _same(stage1, stage2)  # the frozen parts too, from the base

    bigger = ModelConfig(image_size=128)
    with pytest.raises(
        CheckpointError, match=r"final\.pt: trained another model: image_size 64 \(this run: 128\)"
    ):
        init_from_weights(build_autosam2(bigger), tmp_path / "final.pt", bigger)
    torch.manual_seed(2)
    save_sam2_checkpoint(build_autosam2(SMALL), tmp_path / "sam2.pt")
    from_sam2 = ModelConfig(image_size=64, checkpoint=str(tmp_path / "sam2.pt"))
    model = _trained(from_sam2)
    version1 = {k: v for k, v in model.state_dict().items() if k.startswith("prompt_encoder.")}
    torch.save(
        {
            "format": "autosam2-weights",
            "version": 1,
            "full": False,
            "model_config": read_config(from_sam2),
            "model": version1,
            "extra": {},
        },
        tmp_path / "partial.pt",
    )
    with pytest.raises(
        CheckpointError, match=r"partial\.pt: holds the trained parts only.*model\.checkpoint="
    ):
        init_from_weights(build_autosam2(SMALL), tmp_path / "partial.pt", SMALL)
