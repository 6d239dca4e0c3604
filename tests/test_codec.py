"""Decoding frames and masks, the one way every reader does it; shard masks encoded losslessly."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from autosam2.data.codec import decode_image, decode_mask, encode_mask_png, mask_values, read_mask
from autosam2.errors import DatasetError
from tests.helpers import noisy_empty_jpeg


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


def test_a_one_bit_mask_decodes_to_canonical_bools():
    """PIL's 1-bit pixels are the bytes 0 and 255; a bool tensor must hold 0 and 1."""
    mask = torch.zeros(6, 9, dtype=torch.bool)
    mask[2:5, 1:7] = True
    decoded = decode_mask(encode_mask_png(mask), "m0000.png")
    assert decoded.dtype == torch.bool and torch.equal(decoded, mask)
    assert decoded.view(torch.uint8).max() == 1


def _png(values: np.ndarray, palette: list[int] | None = None) -> bytes:
    image = Image.fromarray(values)
    if palette is not None:
        image = image.convert("P")  # indices kept: a greyscale image converts value for value
        image.putpalette(palette + [0] * (768 - len(palette)))
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def test_a_mask_of_values_0_and_1_is_a_label_map_in_8_and_16_bit():
    labels = np.zeros((8, 8), np.uint8)
    labels[2:5, 2:5] = 1
    eight = read_mask(_png(labels), "m.png")
    assert eight.label_map == "8-bit greyscale values 0 and 1" and eight.grey.max() == 1
    sixteen = read_mask(_png(labels.astype(np.uint16)), "m.png")
    assert sixteen.label_map == "16-bit values 0 and 1"
    assert not decode_mask(_png(labels), "m.png").any()  # what it would read as, were it let through
    # 16-bit noise that the 8-bit scale rounds up to 1 is noise: its stored values are not 0/1
    faint = read_mask(_png(labels.astype(np.uint16) * 200), "m.png")
    assert faint.grey.max() == 1 and faint.label_map is None


def test_a_palette_mask_is_read_through_its_colours_and_its_indices_tell_a_label_map():
    indices = np.zeros((8, 8), np.uint8)
    indices[1:4, 2:6] = 1
    white = _png(indices, [0, 0, 0, 255, 255, 255])
    with Image.open(io.BytesIO(white)) as im:
        assert im.mode == "P" and np.array_equal(np.asarray(im), indices)
    assert read_mask(white, "m.png").label_map is None
    assert np.array_equal(decode_mask(white, "m.png").numpy(), indices == 1)
    dark = _png(indices, [0, 0, 0, 90, 20, 20])  # index 1 drawn dark red: grey 44
    values, label_map = read_mask(dark, "m.png")
    assert 0 < values.max() < 128 and label_map.startswith("palette indices 0 and 1")


@pytest.mark.parametrize("quality", [20, 50, 75, 95])
def test_a_jpeg_mask_of_a_polyp_free_frame_reads_as_empty_whatever_its_noise(tmp_path, quality):
    peak = noisy_empty_jpeg(tmp_path / "m.jpg", quality)
    assert 1 < peak < 128, peak
    data = (tmp_path / "m.jpg").read_bytes()
    values, label_map = read_mask(data, "m.jpg")
    assert int(values.max()) == peak and label_map is None
    assert not decode_mask(data, "m.jpg").any()


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
