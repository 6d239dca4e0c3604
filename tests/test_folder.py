import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from autosam2.data.folder import ClipWindow, FolderDataset
from autosam2.data.layouts.files import natural_key
from autosam2.data.synthetic import generate_sequence, sequence_names
from autosam2.errors import DatasetError
from tests.helpers import TINY


def test_natural_order_puts_frame2_before_frame10():
    names = ["frame10", "frame2", "frame1", "Frame3", "frame_20b", "frame_3b"]
    assert sorted(names, key=natural_key) == [
        "frame1",
        "frame2",
        "Frame3",
        "frame10",
        "frame_3b",
        "frame_20b",
    ]


def test_reads_the_synthetic_set_in_natural_order_with_its_masks(tiny_root):
    train = FolderDataset(tiny_root, "train")
    assert train.sequence_names == sequence_names(TINY)["train"]
    video = train.load_sequence("seq1")
    # 12 frames named frame1..frame12: natural order, not frame1, frame10, frame11, frame12, frame2
    assert [f.name for f in video.frames] == [f"frame{i}" for i in range(1, 13)]
    assert video.size == (64, 64)
    expected = generate_sequence("seq1", "train", 0, TINY)
    for frame, mask in zip(video.frames, expected.masks, strict=True):
        assert frame.image_CHW.shape == (3, 64, 64) and frame.image_CHW.dtype == torch.uint8
        assert torch.equal(frame.object_mask(), torch.from_numpy(mask))


def test_png_masks_pair_by_stem_and_grey_or_rgba_frames_become_rgb(tiny_root):
    seq_images = tiny_root / "train" / "images" / "seq1"
    seq_masks = tiny_root / "train" / "masks" / "seq1"
    mask = np.asarray(Image.open(seq_masks / "frame3.jpg"))
    (seq_masks / "frame3.jpg").unlink()
    Image.fromarray(mask).save(seq_masks / "frame3.png")
    Image.open(seq_images / "frame4.jpg").convert("L").save(seq_images / "frame4.jpg")
    (seq_images / "frame5.jpg").unlink()
    Image.new("RGBA", (64, 64), (10, 20, 30, 128)).save(seq_images / "frame5.png")

    dataset = FolderDataset(tiny_root, "train")
    frame3 = dataset.load_frame("seq1", 2)
    assert torch.equal(frame3.object_mask(), torch.from_numpy(mask > 128))
    grey = dataset.load_frame("seq1", 3).image_CHW
    assert grey.shape == (3, 64, 64) and torch.equal(grey[0], grey[1]) and torch.equal(grey[1], grey[2])
    rgba = dataset.load_frame("seq1", 4).image_CHW
    assert rgba.shape == (3, 64, 64) and rgba[:, 0, 0].tolist() == [10, 20, 30]


def test_a_frame_of_another_size_is_refused_naming_the_file(tiny_root):
    path = tiny_root / "train" / "images" / "seq2" / "frame7.jpg"
    Image.open(path).resize((48, 64)).save(path)
    dataset = FolderDataset(tiny_root, "train")  # lazy: construction reads no pixels
    dataset.load_frame("seq2", 5)
    with pytest.raises(DatasetError, match=r"seq2/frame7\.jpg: frame is 48x64, sequence 'seq2' is 64x64"):
        dataset.load_frame("seq2", 6)


def test_clip_windows_and_short_sequences(tiny_root):
    dataset = FolderDataset(tiny_root, "train", clip_len=5, stride=3)
    assert dataset.windows == [ClipWindow(s, start, 5) for s in ("seq1", "seq2") for start in (0, 3, 6)]
    clip = dataset[4]
    assert clip.video_id == "seq2" and [f.frame_index for f in clip.frames] == [3, 4, 5, 6, 7]
    assert [f.name for f in clip.frames] == ["frame4", "frame5", "frame6", "frame7", "frame8"]
    whole = FolderDataset(tiny_root, "valid")
    assert whole.windows == [ClipWindow("seq3", 0, 12)] and len(whole[0]) == 12
    long = FolderDataset(tiny_root, "train", clip_len=13)
    assert len(long) == 0 and long.short_sequences == ["seq1", "seq2"]
    with pytest.raises(IndexError):
        dataset.load_clip(ClipWindow("seq1", 10, 5))


def test_structural_problems_raise_one_error_naming_the_file(tiny_root):
    (tiny_root / "train" / "masks" / "seq2" / "frame9.jpg").unlink()
    with pytest.raises(DatasetError, match=r"seq2/frame9\.jpg: image has no mask.*autosam2 validate"):
        FolderDataset(tiny_root, "train")


def test_missing_root_is_named(tmp_path: Path):
    with pytest.raises(DatasetError, match="nowhere: dataset root does not exist"):
        FolderDataset(tmp_path / "nowhere", "train")


def test_corrupt_image_is_named_when_read(tiny_root):
    path = tiny_root / "valid" / "images" / "seq3" / "frame2.jpg"
    path.write_bytes(b"not a jpeg at all")
    dataset = FolderDataset(tiny_root, "valid")
    with pytest.raises(DatasetError, match=r"seq3/frame2\.jpg: cannot"):
        dataset.load_sequence("seq3")


def test_copy_of_root_is_independent(tiny_root_pristine, tiny_root):
    shutil.rmtree(tiny_root / "valid")
    assert (tiny_root_pristine / "valid").is_dir()
