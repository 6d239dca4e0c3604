"""`autosam2 validate`: every problem on its own line naming the file, exit 1; a summary when clean."""

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from autosam2.cli import main
from tests.helpers import noisy_empty_jpeg


def run_validate(root: Path, capsys: pytest.CaptureFixture) -> tuple[int, list[str]]:
    code = main(["validate", str(root)])
    return code, capsys.readouterr().out.strip().splitlines()


def test_clean_root_gives_exit_0_and_a_one_line_summary(tiny_root, capsys):
    code, lines = run_validate(tiny_root, capsys)
    assert code == 0
    assert len(lines) == 1
    assert "ok" in lines[0]
    assert "train: 2 sequences, 24 frames" in lines[0] and "valid: 1 sequences, 12 frames" in lines[0]
    assert "empty-mask frames" in lines[0] and "foreground above 128" in lines[0]


def test_jpeg_masks_of_polyp_free_frames_are_empty_masks_counted_with_their_noise(tiny_root, capsys):
    """Compression noise below 128 at any JPEG quality: accepted, counted, its highest value said."""
    masks = tiny_root / "train" / "masks"
    peaks = [
        noisy_empty_jpeg(masks / seq / f"frame{i}.jpg", quality)
        for seq, i, quality in [("seq1", 3, 20), ("seq1", 4, 50), ("seq2", 1, 75), ("seq2", 9, 95)]
    ]
    assert all(1 < peak < 128 for peak in peaks), peaks
    code, lines = run_validate(tiny_root, capsys)
    assert code == 0 and len(lines) == 1, lines
    assert lines[0].endswith(f"; 4 masks are empty with compression noise (max {max(peaks)})"), lines


def _damage(root: Path, case: str) -> str:
    """Apply one kind of damage; return the path fragment and message the report must contain."""
    train = root / "train"
    if case == "missing mask":
        (train / "masks" / "seq1" / "frame4.jpg").unlink()
        return "train/images/seq1/frame4.jpg: image has no mask"
    if case == "mask without image":
        (train / "images" / "seq2" / "frame5.jpg").unlink()
        return "train/masks/seq2/frame5.jpg: mask has no image"
    if case == "corrupt jpeg":
        (train / "images" / "seq1" / "frame2.jpg").write_bytes(b"\xff\xd8garbage" * 10)
        return "train/images/seq1/frame2.jpg: cannot decode image"
    if case == "truncated jpeg":
        path = train / "images" / "seq2" / "frame3.jpg"
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
        return "train/images/seq2/frame3.jpg: cannot decode image"
    if case == "empty list file":
        (root / "valid" / "val_list.txt").write_text("\n\n")
        return "valid/val_list.txt: list file names no sequence"
    if case == "list names a missing sequence":
        with (train / "train_list.txt").open("a") as f:
            f.write("seq99\n")
        return "train/images/seq99: sequence 'seq99' is listed in train_list.txt but has no images folder"
    if case == "mask size differs":
        path = train / "masks" / "seq1" / "frame6.jpg"
        Image.open(path).resize((32, 64)).save(path)
        return "train/masks/seq1/frame6.jpg: mask is 32x64, its frame is 64x64"
    if case == "sequence folder with no frames":
        for path in (train / "images" / "seq2").iterdir():
            path.unlink()
        return "train/images/seq2: sequence folder has no frames"
    if case == "frame size differs within a sequence":
        for kind in ("images", "masks"):
            path = train / kind / "seq1" / "frame8.jpg"
            Image.open(path).resize((80, 64)).save(path)
        return "train/images/seq1/frame8.jpg: frame is 80x64, the sequence started at 64x64 (frame1.jpg)"
    if case == "0/1 label map":
        path = train / "masks" / "seq1" / "frame1.png"
        (train / "masks" / "seq1" / "frame1.jpg").unlink()
        Image.fromarray(np.ones((64, 64), np.uint8)).save(path)
        return "train/masks/seq1/frame1.png: mask is a 0/1 label map (8-bit greyscale values 0 and 1)"
    raise AssertionError(case)


CASES = [
    "missing mask",
    "mask without image",
    "corrupt jpeg",
    "truncated jpeg",
    "empty list file",
    "list names a missing sequence",
    "mask size differs",
    "sequence folder with no frames",
    "frame size differs within a sequence",
    "0/1 label map",
]


@pytest.mark.parametrize("case", CASES)
def test_each_problem_is_reported_naming_the_file(tiny_root, capsys, case):
    expected = _damage(tiny_root, case)
    code, lines = run_validate(tiny_root, capsys)
    assert code == 1
    assert any(expected in line and line.startswith(str(tiny_root)) for line in lines), lines
    # one problem, one line
    assert len(lines) == 1, lines


def test_every_problem_is_listed_at_once(tiny_root, capsys):
    expected = [
        _damage(tiny_root, case)
        for case in ("missing mask", "corrupt jpeg", "empty list file", "mask size differs")
    ]
    code, lines = run_validate(tiny_root, capsys)
    assert code == 1
    assert len(lines) == len(expected)
    for fragment in expected:
        assert sum(fragment in line for line in lines) == 1, (fragment, lines)


def test_missing_root(tmp_path, capsys):
    code, lines = run_validate(tmp_path / "absent", capsys)
    assert code == 1 and lines == [f"{tmp_path / 'absent'}: dataset root does not exist"]


def test_a_named_split_that_is_missing_is_a_problem_and_the_others_are_read(tiny_root, capsys):
    import shutil

    shutil.rmtree(tiny_root / "valid")
    assert main(["validate", str(tiny_root), "--split", "valid"]) == 1
    assert f"{tiny_root / 'valid'}: split folder is missing" in capsys.readouterr().out
    assert main(["validate", str(tiny_root)]) == 0  # every split there is: train alone
    out = capsys.readouterr().out
    assert "train: 2 sequences" in out and "valid:" not in out
