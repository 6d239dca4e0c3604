"""Meta's SAM2 checkpoints: what a file holds, read from its contents, and the model it settles.

Meta publishes eight checkpoints (``checkpoints/download_ckpts.sh`` of facebookresearch/sam2):
``sam2.1_hiera_{tiny,small,base_plus,large}.pt`` (SAM 2.1) and ``sam2_hiera_{...}.pt`` (SAM 2.0). Each is
``{"model": state_dict}`` of ``SAM2Base`` built from sam2's config of that size and release
(``configs/sam2.1/sam2.1_hiera_t.yaml``, ``configs/sam2/sam2_hiera_t.yaml``, ...), which sam2's own
``build_sam2`` loads strictly. A file's size is read from its Hiera trunk (the patch embedding's width and
the number of blocks), its release from the object pointers' temporal projection, which only SAM 2.1's
configs build. The file is opened memory-mapped: only the tensors' descriptions are read, not their data.
Its name is a cross-check: a file under one of Meta's names must hold what Meta's file of that name holds;
under any other name its contents decide.
"""

from __future__ import annotations

import dataclasses
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from autosam2.config import DEFAULT_RELEASE, DEFAULT_VARIANT, ModelConfig, Release, Variant
from autosam2.errors import CheckpointError

OWN_MODULES = ("prompt_encoder.",)  # state_dict prefixes of our modules, which no SAM2 checkpoint holds
# the size names of Meta's file names
SIZE_NAMES = {
    Variant["hiera_t"]: "tiny",
    Variant["hiera_s"]: "small",
    Variant["hiera_b+"]: "base_plus",
    Variant["hiera_l"]: "large",
}
# (patch embedding width, blocks) of the Hiera trunk sam2's config of each size builds
TRUNKS = {
    (96, 12): Variant["hiera_t"],
    (96, 16): Variant["hiera_s"],
    (112, 24): Variant["hiera_b+"],
    (144, 48): Variant["hiera_l"],
}
PATCH_EMBED = "image_encoder.trunk.patch_embed.proj.weight"
BLOCKS = "image_encoder.trunk.blocks."
MEMORY = "memory_attention."
SAM2_1_KEY = "obj_ptr_tpos_proj.weight"  # SAM 2.1's configs project the object pointers' temporal encoding
RELEASE_NAMES = {Release["sam2"]: "SAM2.0", Release["sam2.1"]: "SAM2.1"}


def meta_name(variant: Variant | str, release: Release | str) -> str:
    """The name of Meta's checkpoint of a size and release: ``sam2.1_hiera_tiny.pt``."""
    return f"{Release(release)}_hiera_{SIZE_NAMES[Variant(variant)]}.pt"


META_NAMES = {meta_name(v, r): (v, r) for v in Variant for r in Release}


def held(variant: Variant | str, release: Release | str) -> str:
    """A size and release in words: ``hiera_s (SAM2.1)``."""
    return f"{variant} ({RELEASE_NAMES[Release(release)]})"


@dataclass(frozen=True)
class Sam2File:
    """A SAM2 checkpoint: where it is, the size and release it holds, its state_dict (memory-mapped)."""

    path: Path
    variant: Variant
    release: Release
    state: dict[str, torch.Tensor]

    @property
    def holds(self) -> str:
        return held(self.variant, self.release)


def read_sam2_checkpoint(path: str | Path) -> Sam2File:
    """Open a SAM2 checkpoint in Meta's format; anything else (a missing file, another torch file, our
    own weights, not a torch file at all) is one CheckpointError naming the file and what it is."""
    path = Path(path)
    payload = _load(path)
    foreign = _foreign(payload)
    if foreign is not None:
        raise CheckpointError(f"{path}: not a SAM2 checkpoint: {foreign}")
    state = payload["model"]
    variant = _variant(path, state)
    release = Release["sam2.1"] if SAM2_1_KEY in state else Release["sam2"]
    named = META_NAMES.get(path.name)
    if named is not None and named != (variant, release):
        raise CheckpointError(
            f"{path}: holds {held(variant, release)}, not the {held(*named)} of Meta's file of that name: "
            f"rename it (Meta's name for what it holds: {meta_name(variant, release)})"
        )
    return Sam2File(path, variant, release, state)


def settle(
    variant: Variant | str | None, release: Release | str | None, checkpoint: str | Path | None
) -> tuple[Variant, Release, Sam2File | None]:
    """The size and release to build, and the checkpoint read. With a checkpoint: what it holds, and a
    `variant` or `release` given (None: unset) must be that, else one CheckpointError naming the file,
    what it holds and what was asked. Without: the values given, the defaults for those unset."""
    if checkpoint is None:
        return Variant(variant or DEFAULT_VARIANT), Release(release or DEFAULT_RELEASE), None
    found = read_sam2_checkpoint(checkpoint)
    asked = {"model.variant": (variant, found.variant), "model.release": (release, found.release)}
    wrong = [f"{key}={want}" for key, (want, has) in asked.items() if want is not None and want != has]
    if wrong:
        wanted = meta_name(variant or found.variant, release or found.release)
        raise CheckpointError(
            f"{found.path}: holds {found.holds}; {' and '.join(wrong)} {'was' if len(wrong) == 1 else 'were'} "
            f"asked: leave {' and '.join(w.split('=')[0] for w in wrong)} unset to build what the file "
            f"holds, or give Meta's {wanted}"
        )
    return found.variant, found.release, found


def settle_model(cfg: ModelConfig) -> ModelConfig:
    """`cfg` with the size and release it builds (`settle`): what a run records and logs."""
    variant, release, _ = settle(cfg.variant, cfg.release, cfg.checkpoint)
    return dataclasses.replace(cfg, variant=variant, release=release)


# reading ------------------------------------------------------------------------------------------------


def _load(path: Path) -> Any:
    if path.is_dir():
        raise CheckpointError(f"{path}: a folder, not a SAM2 checkpoint file")
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint file not found")
    try:  # memory-mapped where torch allows it (its zip format): the tensors' data stay on disk
        return torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except OSError:  # unreadable (permissions, I/O): the file system's own error
        raise
    except Exception as err:  # torch.load raises many types for a file that is not its own
        first = (str(err).strip().splitlines() or [""])[0][:200]
        raise CheckpointError(
            f"{path}: not a SAM2 checkpoint: {sniff(path)}, which torch.load cannot read "
            f"({type(err).__name__}: {first})"
        ) from err


def _is_sam2(state: Any) -> bool:
    return (
        isinstance(state, dict)
        and isinstance(state.get(PATCH_EMBED), torch.Tensor)
        and any(str(k).startswith(MEMORY) for k in state)
    )


def _variant(path: Path, state: dict[str, torch.Tensor]) -> Variant:
    width = state[PATCH_EMBED].shape[0]
    indices = [k[len(BLOCKS) :].split(".")[0] for k in state if k.startswith(BLOCKS)]
    blocks = 1 + max((int(i) for i in indices if i.isdigit()), default=-1)
    variant = TRUNKS.get((width, blocks))
    if variant is None:
        sizes = ", ".join(f"{v} {w} wide, {b} blocks" for (w, b), v in TRUNKS.items())
        raise CheckpointError(
            f"{path}: SAM2 weights whose Hiera trunk ({width} wide, {blocks} blocks) is none of Meta's "
            f"sizes ({sizes}): no SAM2 config builds it"
        )
    return variant


def _foreign(payload: Any) -> str | None:
    """None for a SAM2 checkpoint (SAM2's weights under "model"); else what the torch file holds, in words."""
    from autosam2.model.weights import WEIGHTS_FORMAT  # the weights format builds on this module

    if isinstance(payload, dict) and payload.get("format") == WEIGHTS_FORMAT:
        return (
            "an AutoSAM2 weights file (written by `autosam2 train`): give it as --weights to evaluate or "
            "predict, or start a run from it with train.init_from"
        )
    if isinstance(payload, dict) and {"optimizer", "micro"} <= payload.keys():
        return "the engine state of an `autosam2 train` checkpoint: resume its folder with --resume FOLDER"
    if isinstance(payload, dict) and _is_sam2(payload.get("model")):
        return None
    if _is_sam2(payload):
        return (
            "SAM2 weights without Meta's {'model': state_dict} wrapper: save them as "
            "torch.save({'model': state_dict}, path)"
        )
    inner = payload.get("model") if isinstance(payload, dict) else None
    state, where = (inner, " under 'model'") if isinstance(inner, dict) else (payload, "")
    if isinstance(state, dict):
        tensors = [str(k) for k, v in state.items() if isinstance(v, torch.Tensor)]
        if tensors:
            shown = ", ".join(tensors[:3]) + (", ..." if len(tensors) > 3 else "")
            return (
                f"a torch file of {len(tensors)} tensors{where} ({shown}), without SAM2's Hiera trunk "
                f"({PATCH_EMBED}) and memory attention"
            )
        keys = ", ".join(repr(k) for k in list(state)[:5])
        return f"a torch file holding a dict{where} of {keys or 'nothing'}, no tensors"
    return f"a torch file holding a {type(payload).__name__}"


MAGIC = (
    (b"\xff\xd8\xff", "a JPEG image"),
    (b"\x89PNG", "a PNG image"),
    (b"PK\x03\x04", "a zip archive"),
    (b"\x1f\x8b", "a gzip file"),
    (b"\x89HDF", "an HDF5 file"),
)


def sniff(path: Path) -> str:
    """What a file torch cannot read looks like, from its first bytes."""
    with open(path, "rb") as f:
        head = f.read(64)
    if not head:
        return "an empty file"
    if head.startswith(b"PK\x03\x04") and not zipfile.is_zipfile(path):
        return "a cut-off or damaged zip (the format torch saves in; an interrupted download?)"
    for magic, what in MAGIC:
        if head.startswith(magic):
            return what
    if head[8:10] == b'{"':
        return "a safetensors file (not Meta's format)"
    try:
        head[:-4].decode("utf-8")
    except UnicodeDecodeError:
        return "binary data"
    return "a text file"
