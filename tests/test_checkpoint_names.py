"""Meta's SAM2 checkpoints by name: the size and release read from the file, mismatches and files that are
not SAM2's refused in one line, and `train` / `evaluate` taking `--checkpoint sam2.1_hiera_tiny.pt`.

The files are written here in Meta's released format: ``{"model": state_dict}`` of the model sam2's own
`build_sam2` makes from sam2's own config of each size and release (random weights), under Meta's names;
sam2's loader, which loads the released files strictly, reads them back.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image
from sam2.build_sam import build_sam2

from autosam2.cli import main as cli
from autosam2.config import ConfigError, ModelConfig, Release, Variant, load_config
from autosam2.errors import CheckpointError
from autosam2.model.sam2_builder import build_autosam2, build_model
from autosam2.model.sam2_checkpoint import read_sam2_checkpoint, settle_model
from autosam2.model.weights import read_weights, save_weights
from tests.helpers import train_overrides

# Meta's file names (checkpoints/download_ckpts.sh of facebookresearch/sam2) and what each holds
META = {
    f"{release}_hiera_{size}.pt": (release, variant)
    for release in ("sam2.1", "sam2")
    for size, variant in (
        ("tiny", "hiera_t"),
        ("small", "hiera_s"),
        ("base_plus", "hiera_b+"),
        ("large", "hiera_l"),
    )
}
BIG = {"sam2.1_hiera_base_plus.pt", "sam2.1_hiera_large.pt"}  # 309 MB and 857 MB: marked slow
TESTED = [
    "sam2.1_hiera_tiny.pt",
    "sam2.1_hiera_small.pt",
    "sam2.1_hiera_base_plus.pt",
    "sam2.1_hiera_large.pt",
]
TESTED += ["sam2_hiera_tiny.pt", "sam2_hiera_small.pt"]
PATCH = "image_encoder.trunk.patch_embed.proj.weight"


def _named(names: list[str]) -> list:
    return [pytest.param(n, marks=pytest.mark.slow) if n in BIG else n for n in names]


def write_meta_file(path: Path, release: str, variant: str) -> None:
    """A checkpoint as Meta releases it: sam2's own model of that config, its whole state_dict."""
    torch.manual_seed(0)
    model = build_sam2(
        f"configs/{release}/{release}_{variant}.yaml", ckpt_path=None, device="cpu", mode="eval"
    )
    torch.save({"model": model.state_dict()}, path)


@pytest.fixture(scope="session")
def meta_file(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[[str], Path]]:
    """Meta's checkpoint of a name, written on first use (once per session) into one folder, removed at
    the end of the session (up to 1.9 GB)."""
    folder = tmp_path_factory.mktemp("meta_checkpoints")

    def get(name: str) -> Path:
        path = folder / name
        if not path.exists():
            start = time.perf_counter()
            write_meta_file(path, *META[name])
            print(
                f"{name}: {path.stat().st_size / 1e6:.0f} MB written in {time.perf_counter() - start:.1f} s"
            )
        return path

    yield get
    shutil.rmtree(folder)


def refusal(checkpoint: Path, **asked: str) -> str:
    with pytest.raises(CheckpointError) as err:
        settle_model(ModelConfig(checkpoint=str(checkpoint), **asked))
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"{checkpoint}: "), message
    return message


# the files themselves ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["sam2.1_hiera_tiny.pt", "sam2_hiera_tiny.pt"])
def test_the_files_are_what_sam2s_own_loader_reads(meta_file, name):
    path = meta_file(name)
    payload = torch.load(path, map_location="cpu", weights_only=True)
    assert list(payload) == ["model"]
    release, variant = META[name]
    build_sam2(
        f"configs/{release}/{release}_{variant}.yaml", ckpt_path=str(path), device="cpu"
    )  # strict: raises on a key


@pytest.mark.parametrize("name", _named(TESTED))
def test_the_size_and_release_are_read_from_the_file(meta_file, name):
    path = meta_file(name)
    release, variant = META[name]
    found = read_sam2_checkpoint(path)
    assert (found.variant, found.release) == (Variant(variant), Release(release))
    cfg = settle_model(ModelConfig(checkpoint=str(path), image_size=64))
    assert (cfg.variant, cfg.release) == (variant, release)
    model = build_autosam2(cfg)  # every SAM2 key of the file loads, at any image size
    assert torch.equal(model.state_dict()[PATCH], found.state[PATCH])
    # SAM2.0's architecture for a SAM2.0 file: no projection of the object pointers' temporal encoding
    assert isinstance(model.obj_ptr_tpos_proj, torch.nn.Identity) == (release == "sam2")


def test_the_size_asked_must_be_the_files(meta_file):
    small = meta_file("sam2.1_hiera_small.pt")
    assert refusal(small, variant="hiera_t") == (
        f"{small}: holds hiera_s (SAM2.1); model.variant=hiera_t was asked: leave model.variant unset to "
        "build what the file holds, or give Meta's sam2.1_hiera_tiny.pt"
    )
    tiny_2_0 = meta_file("sam2_hiera_tiny.pt")
    assert refusal(tiny_2_0, variant="hiera_s", release="sam2.1") == (
        f"{tiny_2_0}: holds hiera_t (SAM2.0); model.variant=hiera_s and model.release=sam2.1 were asked: "
        "leave model.variant and model.release unset to build what the file holds, or give Meta's "
        "sam2.1_hiera_small.pt"
    )
    assert settle_model(ModelConfig(checkpoint=str(small), variant="hiera_s")).variant == "hiera_s"
    with pytest.raises(CheckpointError, match="holds hiera_s"):
        build_model("hiera_t", 64, small)
    with pytest.raises(ConfigError, match=r"model\.release must be sam2 or sam2\.1, got 'sam3'"):
        load_config(None, ["model.release=sam3"])
    # without a checkpoint: what was asked, else the defaults
    assert (settle_model(ModelConfig()).variant, settle_model(ModelConfig()).release) == ("hiera_t", "sam2.1")
    assert settle_model(ModelConfig(variant="hiera_l", release="sam2")).release == "sam2"


def test_a_renamed_file_is_read_by_its_contents_and_a_misnamed_one_refused(meta_file, tmp_path):
    renamed = tmp_path / "polyp_start.pt"
    os.link(meta_file("sam2.1_hiera_small.pt"), renamed)
    assert settle_model(ModelConfig(checkpoint=str(renamed))).variant == "hiera_s"
    misnamed = tmp_path / "sam2.1_hiera_tiny.pt"
    os.link(meta_file("sam2.1_hiera_small.pt"), misnamed)
    assert refusal(misnamed) == (
        f"{misnamed}: holds hiera_s (SAM2.1), not the hiera_t (SAM2.1) of Meta's file of that name: rename "
        "it (Meta's name for what it holds: sam2.1_hiera_small.pt)"
    )
    older = tmp_path / "other" / "sam2.1_hiera_tiny.pt"
    older.parent.mkdir()
    os.link(meta_file("sam2_hiera_tiny.pt"), older)
    assert "holds hiera_t (SAM2.0), not the hiera_t (SAM2.1)" in refusal(older)
    for link in (renamed, misnamed, older):  # the last links to files the session removes
        link.unlink()


# files that are not SAM2 checkpoints ----------------------------------------------------------------------


def _jpeg(path: Path, _) -> None:
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(path, "JPEG")


def _cut_off(path: Path, meta_file) -> None:
    path.write_bytes(meta_file("sam2.1_hiera_tiny.pt").read_bytes()[:50_000_000])


def _our_weights(path: Path, _) -> None:
    cfg = ModelConfig(image_size=64)
    save_weights(path, build_autosam2(cfg), cfg, base=None)


def _resnet(path: Path, _) -> None:
    torch.save({"model": torchvision.models.resnet18(weights=None).state_dict()}, path)


def _bare(path: Path, meta_file) -> None:
    torch.save(torch.load(meta_file("sam2_hiera_tiny.pt"), weights_only=True)["model"], path)


def _other_trunk(path: Path, meta_file) -> None:
    state = torch.load(meta_file("sam2_hiera_tiny.pt"), weights_only=True)["model"]
    torch.save({"model": {k: v for k, v in state.items() if ".blocks.11." not in k}}, path)


def _engine_state(path: Path, _) -> None:
    torch.save(
        {"model": {"prompt_encoder.w": torch.zeros(1)}, "optimizer": {}, "scheduler": {}, "micro": 0}, path
    )


NOT_SAM2 = {  # file name, how it is made, what the one line says it is
    "notes.txt": (
        lambda p, _: p.write_text("a SAM2 checkpoint\n"),
        "a text file, which torch.load cannot read",
    ),
    "frame.jpg": (_jpeg, "a JPEG image, which torch.load cannot read"),
    "empty.pt": (lambda p, _: p.write_bytes(b""), "an empty file"),
    "sam2.1_hiera_tiny.pt": (_cut_off, "a cut-off or damaged zip (the format torch saves in; an interrupted"),
    "final.pt": (
        _our_weights,
        "not a SAM2 checkpoint: an AutoSAM2 weights file (written by `autosam2 train`)",
    ),
    "resnet.pt": (
        _resnet,
        "not a SAM2 checkpoint: a torch file of 122 tensors under 'model' (conv1.weight, bn1.weight, "
        "bn1.bias, ...), without SAM2's Hiera trunk",
    ),
    "tensor.pt": (
        lambda p, _: torch.save(torch.zeros(3), p),
        "not a SAM2 checkpoint: a torch file holding a Tensor",
    ),
    "engine.pt": (_engine_state, "not a SAM2 checkpoint: the engine state of an `autosam2 train` checkpoint"),
    "bare.pt": (_bare, "not a SAM2 checkpoint: SAM2 weights without Meta's {'model': state_dict} wrapper"),
    "custom.pt": (
        _other_trunk,
        "SAM2 weights whose Hiera trunk (96 wide, 11 blocks) is none of Meta's sizes",
    ),
}


@pytest.mark.parametrize("name", sorted(NOT_SAM2))
def test_a_file_that_is_not_a_sam2_checkpoint_says_what_it_is(meta_file, tmp_path, name):
    make, says = NOT_SAM2[name]
    path = tmp_path / name
    make(path, meta_file)
    message = refusal(path)
    assert says in message, message
    path.unlink()  # up to 160 MB


def test_a_folder_or_a_missing_file_is_one_line(tmp_path):
    assert refusal(tmp_path) == f"{tmp_path}: a folder, not a SAM2 checkpoint file"
    assert refusal(tmp_path / "absent.pt") == f"{tmp_path / 'absent.pt'}: checkpoint file not found"


# the commands -------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_train_and_evaluate_take_metas_file_by_name(meta_file, train_data, tmp_path, capsys):
    """A one-step CPU run at 64 px from sam2.1_hiera_tiny.pt records the size and release it read; evaluate
    rebuilds on that file; a size that is not the file's, and a file that is not the base, are one line."""
    tiny = meta_file("sam2.1_hiera_tiny.pt")
    quick = {
        "model.image_size": 64,
        "train.max_steps": 1,
        "train.validate_every": 1,
        "tracking.enabled": "false",
    }
    out = tmp_path / "run"
    assert cli(["train", "--checkpoint", str(tiny), *train_overrides(train_data, out, **quick)]) == 0
    model = load_config(out / "config.yaml").model  # the config in effect, as the run wrote it
    assert (model.variant, model.release, model.checkpoint) == ("hiera_t", "sam2.1", str(tiny))
    assert read_weights(out / "final.pt")["base"]["path"] == str(tiny.resolve())
    results = tmp_path / "eval"
    evaluate = ["evaluate", "--weights", str(out / "final.pt"), "--data", str(train_data["valid"]), "--cpu"]
    evaluate += ["--no-overlays", "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"]
    assert cli([*evaluate, "--checkpoint", str(tiny), "--output-dir", str(results)]) == 0
    assert (results / "metrics.json").is_file()
    capsys.readouterr()

    refused = tmp_path / "refused"
    argv = [
        "train",
        "--checkpoint",
        str(tiny),
        *train_overrides(train_data, refused, **quick),
        "model.variant=hiera_s",
    ]
    assert cli(argv) == 1
    assert capsys.readouterr().err.strip().splitlines() == [
        f"autosam2 train: {tiny}: holds hiera_t (SAM2.1); model.variant=hiera_s was asked: leave model.variant "
        "unset to build what the file holds, or give Meta's sam2.1_hiera_small.pt"
    ]
    assert not refused.exists()
    other = meta_file("sam2_hiera_tiny.pt")
    assert cli([*evaluate, "--checkpoint", str(other), "--output-dir", str(tmp_path / "eval2")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(
        f"autosam2 evaluate: {other}: is another file, holding hiera_t (SAM2.0), not the SAM2 weights {out / 'final.pt'} was trained on"
    ), err
    assert (
        cli([*evaluate, "--checkpoint", str(out / "final.pt"), "--output-dir", str(tmp_path / "eval3")]) == 1
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "final.pt: not a SAM2 checkpoint: an AutoSAM2 weights file" in err[0], err
