"""Image and mask bytes <-> tensors: the one decoder of frames and masks (folder reader, shard format,
`shards verify`) and the encoder of shard masks.

Images become uint8 ``[3,H,W]`` RGB whatever their mode (grayscale, 16-bit, palette, RGBA, CMYK); masks
become bool ``[H,W]``, grey value above ``MASK_THRESHOLD`` (of 255) being polyp, because JPEG masks carry
compression noise between 0 and 255 (the gt rule of `autosam2.metrics`, the toolbox's ``gt > 128``): a
mask whose values all lie at or below it is empty, however noisy, unless what it stores are the labels 0
and 1 (`read_mask` tells). Bool arrays and tensors made here hold the bytes 0 and 1 only. Every failure is
one DatasetError naming the source.
"""

from __future__ import annotations

import io
import re
import warnings
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torchvision.io import ImageReadMode, decode_jpeg

from autosam2.errors import DatasetError
from autosam2.metrics import GT_THRESHOLD_8BIT as MASK_THRESHOLD

JPEG_MAGIC = b"\xff\xd8"
WIDE_MODES = ("I;16", "I;16B", "I;16L", "I")  # 16-bit greyscale (PNG has no wider integer mode)
DECODE_ERRORS = (OSError, UnidentifiedImageError, SyntaxError, ValueError)

# torchvision 0.29 warns on every decode that TorchCodec will take its image decoders over; until it does,
# its decode_jpeg is the fastest JPEG decoder we have on the CPU and the one that decodes on a GPU
warnings.filterwarnings(
    "ignore", "The image decoding and encoding capabilities of TorchVision", DeprecationWarning
)


def why(err: BaseException) -> str:
    """A decoder's error in words that do not change run to run (PIL names the in-memory buffer it read,
    by its address)."""
    text = re.sub(r"\s*<_io\.BytesIO object at 0x[0-9a-fA-F]+>", "", str(err)).strip()
    return text if text else type(err).__name__


def grey_values(im: Image.Image) -> np.ndarray:
    """uint8 ``[H,W]`` grey values; a 16-bit image is scaled from its full range (65535 -> 255), not
    clipped at 255, so its soft edges read as what they are. Rounded up: a non-zero value stays
    non-zero, so a 16-bit 0/1 label map is still told from an empty mask."""
    if im.mode in WIDE_MODES:
        wide = np.asarray(im).astype(np.int64)
        return ((np.clip(wide, 0, 65535) * 255 + 65534) // 65535).astype(np.uint8)
    return np.asarray(im.convert("L"))


def decode_image(data: bytes, source: str | Path, device: torch.device | None = None) -> torch.Tensor:
    """Decode image bytes to uint8 ``[3,H,W]`` RGB (grayscale, 16-bit, palette, RGBA and CMYK are
    converted), on `device` (default: the CPU).

    A JPEG is decoded by torchvision (libjpeg-turbo on the CPU, nvJPEG on a GPU): the same pixels as
    PIL's, three times faster at 1024 px (PIL's decode and its copy into an array); on a GPU it also
    spares evaluation, which reads frames in one process, the CPU's decoding. Any other format, or a
    JPEG torchvision refuses, goes through PIL, whose error names the problem.
    """
    if data[:2] == JPEG_MAGIC:
        encoded = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        try:
            return decode_jpeg(encoded, mode=ImageReadMode.RGB, device=device or "cpu")
        except RuntimeError:
            pass  # PIL below reads what libjpeg-turbo would not, or says why it cannot
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            if im.mode in WIDE_MODES:
                rgb = np.repeat(grey_values(im)[..., None], 3, axis=2)
            else:
                rgb = np.array(im if im.mode == "RGB" else im.convert("RGB"))
    except DECODE_ERRORS as err:
        raise DatasetError(f"{source}: cannot decode image ({why(err)})") from err
    image = torch.from_numpy(rgb).permute(2, 0, 1)  # a view: stacking frames makes it contiguous
    return image if device is None else image.to(device)


def check_image(data: bytes, source: str | Path) -> tuple[int, int]:
    """(H, W) of an image whose whole stream decodes; a JPEG is decoded at 1/8 scale (every byte is
    read, so a cut file shows, but few pixels are made). DatasetError otherwise."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            width, height = im.size
            if im.format == "JPEG":
                im.draft(im.mode, (max(1, width // 8), max(1, height // 8)))
            im.load()
    except DECODE_ERRORS as err:
        raise DatasetError(f"{source}: cannot decode image ({why(err)})") from err
    return height, width


def decode_mask(data: bytes, source: str | Path) -> torch.Tensor:
    """Decode mask bytes to bool ``[H,W]``: grey value above MASK_THRESHOLD (of 255) is polyp."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            if im.mode == "1":  # our shards' 1-bit PNG: no grey levels to threshold
                # compared, not cast: PIL's 1-bit pixels are the bytes 0 and 255, which a cast to
                # bool keeps as they are, and torch counts on a bool's byte being 0 or 1
                return torch.from_numpy(np.asarray(im) != 0)
    except DECODE_ERRORS as err:
        raise DatasetError(f"{source}: cannot decode mask ({why(err)})") from err
    return torch.from_numpy(mask_values(data, source) > MASK_THRESHOLD)


def mask_values(data: bytes, source: str | Path) -> np.ndarray:
    """Grey values ``[H,W]`` (uint8) of a mask file."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            return grey_values(im)
    except DECODE_ERRORS as err:
        raise DatasetError(f"{source}: cannot decode mask ({why(err)})") from err


class MaskValues(NamedTuple):
    grey: np.ndarray  # uint8 [H,W], as `mask_values`
    label_map: str | None  # how the file stores 0/1 labels, when it does (it then reads as empty)


def read_mask(data: bytes, source: str | Path) -> MaskValues:
    """The grey values of a mask file, and whether it is a 0/1 label map: a mask that reads as empty
    (no value above MASK_THRESHOLD) whose stored values are exactly 0 and 1 — a palette image's
    indices, not the colours they stand for. Any other mask that reads as empty is empty, its non-zero
    values compression noise."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            grey = grey_values(im)
            if im.mode == "1" or grey.max() > MASK_THRESHOLD:
                return MaskValues(grey, None)
            return MaskValues(grey, _label_map(im))
    except DECODE_ERRORS as err:
        raise DatasetError(f"{source}: cannot decode mask ({why(err)})") from err


def _label_map(im: Image.Image) -> str | None:
    stored = np.asarray(im)  # a palette image's indices
    if stored.max() != 1 or stored.min() < 0:
        return None
    if im.mode == "P":
        return "palette indices 0 and 1, both drawn darker than grey " + str(MASK_THRESHOLD)
    if im.mode in WIDE_MODES:
        return "16-bit values 0 and 1" if im.mode.startswith("I;16") else "32-bit values 0 and 1"
    return f"{'8-bit greyscale' if im.mode == 'L' else im.mode} values 0 and 1"


def image_size(path: Path) -> tuple[int, int]:
    """(H, W) from the file header, without decoding the pixels."""
    try:
        with Image.open(path) as im:
            width, height = im.size
    except DECODE_ERRORS as err:
        raise DatasetError(f"{path}: cannot read image header ({why(err)})") from err
    return height, width


def encode_mask_png(mask_HW: torch.Tensor) -> bytes:
    """A bool mask as a lossless 1-bit PNG (what shards store)."""
    buf = io.BytesIO()
    Image.fromarray(mask_HW.numpy().astype(np.uint8) * 255).convert("1").save(
        buf, format="PNG", optimize=False
    )
    return buf.getvalue()
