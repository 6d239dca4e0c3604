"""Decoding frames and masks, the one way every reader does it; shard masks encoded losslessly."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from autosam2.data.codec import decode_image, decode_mask, encode_mask_png, mask_values
from autosam2.errors import DatasetError


def test_masks_are_binarised_at_128():
    values = np.array([[0, 127, 128, 255]], dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(values).save(buf, format="PNG")
    assert decode_mask(buf.getvalue(), "m.png").tolist() == [[False, False, True, True]]


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
