"""Decoding frames and masks, the one way every reader does it; shard masks encoded losslessly."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from autosam2.data.codec import decode_image, decode_mask, encode_mask_png, mask_values
from autosam2.errors import DatasetError


def test_masks_are_foreground_above_128():
    values = np.array([[0, 127, 128, 129, 255]], dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(values).save(buf, format="PNG")
    assert decode_mask(buf.getvalue(), "m.png").tolist() == [[False, False, False, True, True]]


def test_a_shard_mask_round_trips_as_a_one_bit_png():
    mask = torch.zeros(5, 7, dtype=torch.bool)
    mask[1:3, 2:6] = True
    data = encode_mask_png(mask)
    with Image.open(io.BytesIO(data)) as im:
        assert im.mode == "1" and im.format == "PNG"
    assert torch.equal(decode_mask(data, "m0000.png"), mask)
    assert sorted(np.unique(mask_values(data, "m0000.png"))) == [0, 255]


def test_undecodable_bytes_are_one_error_naming_the_source():
    with pytest.raises(DatasetError, match=r"^f0000\.jpg: cannot decode image"):
        decode_image(b"not an image", "f0000.jpg")
    with pytest.raises(DatasetError, match=r"^m0000\.png: cannot decode mask"):
        decode_mask(b"\x89PNG broken", "m0000.png")


def test_decoding_on_a_device_gives_what_pil_gives_and_names_a_bad_file(tmp_path):
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).resize((48, 40), Image.BICUBIC)
    jpeg, png = io.BytesIO(), io.BytesIO()
    image.save(jpeg, format="JPEG", quality=90)
    image.save(png, format="PNG")
    cpu = torch.device("cpu")
    for data in (jpeg.getvalue(), png.getvalue()):  # JPEG through torchvision there; others through PIL
        here, there = decode_image(data, "f"), decode_image(data, "f", cpu)
        assert there.shape == here.shape == (3, 40, 48) and there.dtype == torch.uint8
        assert (there.int() - here.int()).abs().max() <= 1
    with pytest.raises(DatasetError, match="^frames/f3.jpg: cannot decode image"):
        decode_image(jpeg.getvalue()[:100], "frames/f3.jpg", cpu)
