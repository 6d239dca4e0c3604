"""The PolypGen reader: detection, splits, single frames as one-frame sequences, ``_mask`` pairing,
negative-only sequences as polyp-free frames, one problem line per missing mask."""

from __future__ import annotations

import json
import shutil
import tarfile

import numpy as np
import pytest
from PIL import Image

from autosam2.cli import main
from autosam2.config import Layout
from autosam2.data.folder import FolderDataset, validate_root
from autosam2.data.layouts import READERS, detect, reader, scan
from autosam2.data.layouts.polypgen import NEGATIVE, POSITIVE
from autosam2.data.sample_format import read_manifest
from autosam2.errors import DatasetError
from shards.__main__ import main as shards
from shards.verify import verify
from tests.layout_fixtures.polypgen import CENTRES, EMPTY_SINGLE, write_polypgen
from tests.layout_fixtures.polypgen import NEGATIVE as NEGATIVE_FRAMES
from tests.layout_fixtures.polypgen import POSITIVE as POSITIVE_FRAMES
from tests.layout_fixtures.sunseg import write_sunseg

CENTRE_SPLITS = [f"data_{c}" for c in CENTRES]


@pytest.fixture(scope="module")
def polypgen_root(tmp_path_factory):
    return write_polypgen(tmp_path_factory.mktemp("polypgen") / "PolypGen2021_MultiCenterData_v3")


@pytest.fixture
def damaged_root(polypgen_root, tmp_path):
    """A private copy a test may damage."""
    return shutil.copytree(polypgen_root, tmp_path / "PolypGen2021_MultiCenterData_v3")


def test_polypgen_is_detected_and_no_other_layout_is_taken_for_it(
    polypgen_root, tiny_root_pristine, tmp_path
):
    sunseg_root = write_sunseg(tmp_path / "SUN-SEG", frames=2)
    assert detect(polypgen_root) == Layout.polypgen
    assert [layout for layout, r in READERS.items() if r.looks_like(polypgen_root)] == [Layout.polypgen]
    assert detect(sunseg_root) == Layout.sunseg and detect(tiny_root_pristine) == Layout.polyp_gen
    assert not READERS[Layout.polypgen].looks_like(sunseg_root)
    assert not READERS[Layout.polypgen].looks_like(tiny_root_pristine)


def test_splits_are_the_centres_and_the_two_sequence_sets(polypgen_root):
    found = reader(polypgen_root)
    assert found.splits(polypgen_root) == [*CENTRE_SPLITS, POSITIVE, NEGATIVE]
    assert found.default_split(polypgen_root, "valid") == "data_C6"
    assert found.default_split(polypgen_root, "test") == POSITIVE
    with pytest.raises(DatasetError, match=r"no train split in this polypgen folder \(splits: data_C1, "):
        found.default_split(polypgen_root, "train")


def test_a_centres_frames_are_one_frame_sequences_paired_with_their_mask_suffix(polypgen_root):
    sequences, problems = scan(polypgen_root, "data_C1")
    assert problems == []
    assert [s.name for s in sequences] == ["100H0050", "326OLCV1_100H0006", "326OLCV1_100H0010"]
    for sequence in sequences:
        (frame,) = sequence.frames
        assert frame.name == sequence.name and frame.image.name == f"{frame.name}.jpg"
        assert frame.mask == polypgen_root / "data_C1" / "masks_C1" / f"{frame.name}_mask.jpg"


def test_c3s_stem_ending_in_underscore_pairs_with_its_mask(polypgen_root):
    sequences, problems = scan(polypgen_root, "data_C3")
    assert problems == []
    frames = {s.name: s.frames[0] for s in sequences}
    assert frames["C3_EndoCV2021_00489_"].mask.name == "C3_EndoCV2021_00489_mask.jpg"


def test_positive_sequences_pair_images_and_masks_in_natural_order(polypgen_root):
    sequences, problems = scan(polypgen_root, POSITIVE)
    assert problems == []  # the bbox .txt files inside masks_seq2 are not frames
    assert [(s.name, len(s.frames)) for s in sequences] == list(POSITIVE_FRAMES.items())
    seq2 = sequences[1]
    assert [f.name for f in seq2.frames] == [f"1_endocv2021_positive_{k}" for k in (8, 9, 10, 11)]
    assert all(f.mask.parent.name == "masks_seq2" and f.mask.stem == f"{f.name}_mask" for f in seq2.frames)
    (one,) = scan(polypgen_root, f"{POSITIVE}/seq10")[0]
    assert one.name == "seq10" and one.frames == sequences[2].frames


def test_negative_only_frames_have_no_mask_and_read_as_empty(polypgen_root):
    sequences, problems = scan(polypgen_root, NEGATIVE)
    assert problems == []
    assert [s.name for s in sequences] == list(NEGATIVE_FRAMES)
    assert [f.name for f in sequences[0].frames] == ["seq1_img1", "seq1_img2", "seq1_img10"]
    assert all(f.mask is None for s in sequences for f in s.frames)
    video = FolderDataset(polypgen_root, f"{NEGATIVE}/seq10_neg").load_sequence("seq10_neg")
    assert len(video.frames) == 2 and not any(f.object_mask().any() for f in video.frames)


def test_score_reads_negative_only_frames_as_empty_ground_truth(polypgen_root, tmp_path):
    pred = tmp_path / "pred"
    for name, numbers in NEGATIVE_FRAMES.items():
        (pred / name).mkdir(parents=True)
        for n in numbers:
            Image.new("L", (64, 64)).save(pred / name / f"{name.removesuffix('_neg')}_img{n}.png")
    out = tmp_path / "scores"
    argv = ["score", "--pred", str(pred), "--gt", str(polypgen_root), "--split", NEGATIVE]
    assert main([*argv, "--keep-first-last", "--output-dir", str(out)]) == 0
    scores = json.loads((out / "metrics.json").read_text())
    assert sorted(scores["per_sequence"]) == sorted(NEGATIVE_FRAMES)
    assert scores["frames"] == {name: len(numbers) for name, numbers in NEGATIVE_FRAMES.items()}


def test_a_missing_mask_in_a_positive_set_is_one_problem_naming_the_file(damaged_root):
    mask = damaged_root / POSITIVE / "seq2" / "masks_seq2" / "1_endocv2021_positive_9_mask.jpg"
    mask.unlink()
    (report,) = validate_root(damaged_root, [POSITIVE])
    image = damaged_root / POSITIVE / "seq2" / "images_seq2" / "1_endocv2021_positive_9.jpg"
    assert [str(p) for p in report.problems] == [
        f"{image}: image has no mask (expected {mask.with_suffix('')}.jpg or .png)"
    ]
    (damaged_root / "data_C5" / "masks_C5" / "C5_EndoCV2021_0001_mask.jpg").unlink()
    (report,) = validate_root(damaged_root, ["data_C5"])
    assert [p.path.name for p in report.problems] == ["C5_EndoCV2021_0001.jpg"]


def test_a_mask_in_a_negative_only_sequence_is_a_problem_not_a_frame(damaged_root):
    folder = damaged_root / NEGATIVE / "seq1_neg"
    stray = shutil.copy(folder / "seq1_img1.jpg", folder / "seq1_img1_mask.jpg")
    (report,) = validate_root(damaged_root, [NEGATIVE])
    assert [str(p) for p in report.problems] == [
        f"{stray}: a mask in a negative-only sequence, whose frames are polyp-free"
    ]
    sequences, _ = scan(damaged_root, NEGATIVE)
    assert [f.name for f in sequences[0].frames] == ["seq1_img1", "seq1_img2", "seq1_img10"]


def test_broken_sequence_folders_are_named(damaged_root):
    shutil.rmtree(damaged_root / POSITIVE / "seq1" / "images_seq1")
    (damaged_root / NEGATIVE / "seq11_neg").mkdir()
    problems = [str(p) for r in validate_root(damaged_root, [POSITIVE, NEGATIVE]) for p in r.problems]
    assert problems == [
        f"{damaged_root / POSITIVE / 'seq1' / 'images_seq1'}: sequence 'seq1' has no images folder",
        f"{damaged_root / NEGATIVE / 'seq11_neg'}: sequence folder has no frames",
    ]
    assert "not a PolypGen split" in str(scan(damaged_root, "sequenceData")[1][0])


def test_validate_reads_polypgen_where_it_lies(polypgen_root, capsys):
    assert main(["validate", str(polypgen_root)]) == 0
    out = capsys.readouterr().out
    assert "(polypgen layout)" in out
    assert "data_C4: 2 sequences, 2 frames, 1 empty-mask frames" in out
    assert f"{POSITIVE}: 3 sequences, 10 frames, 3 empty-mask frames" in out  # seq1's masks are empty
    assert f"{NEGATIVE}: 3 sequences, 7 frames, 7 empty-mask frames" in out
    assert main(["validate", str(polypgen_root), "--layout", "polypgen", "--split", "data_C2"]) == 0
    assert "data_C2: 3 sequences, 3 frames" in capsys.readouterr().out
    assert main(["validate", str(polypgen_root), "--layout", "polypgen", "--split", "data_C9"]) == 1
    assert "data_C9: split folder is missing" in capsys.readouterr().out


def test_a_single_frame_is_read_at_its_own_size(polypgen_root):
    dataset = FolderDataset(polypgen_root, "data_C2", layout="polypgen")
    assert dataset.sequence_names == CENTRES["C2"]
    small = dataset.load_sequence("EndoCV2021_001359").frames[0]
    assert small.object_mask().shape == (48, 48) and small.object_mask().any()
    other = dataset.load_sequence("EndoCV2021_001000").frames[0]
    assert other.object_mask().shape == (64, 64)
    empty = FolderDataset(polypgen_root, "data_C4").load_sequence(next(iter(EMPTY_SINGLE))).frames[0]
    assert not empty.object_mask().any()


def test_inspect_names_the_layout_and_reads_the_held_out_centre(polypgen_root, capsys):
    assert main(["inspect", str(polypgen_root)]) == 0
    out = capsys.readouterr().out
    assert "polypgen layout (PolypGen2021_MultiCenterData_v3" in out and "C6_0002" in out


def test_shards_build_writes_negative_frames_with_empty_masks_in_natural_order(polypgen_root, tmp_path):
    out = tmp_path / "negative"
    build = ["build", str(polypgen_root), "--layout", "polypgen", "--split", NEGATIVE, "--out", str(out)]
    assert shards(build) == 0
    manifest = read_manifest(out)
    assert (manifest["layout"], manifest["split"]) == ("polypgen", NEGATIVE)
    assert manifest["totals"]["sequences"] == 3 and manifest["totals"]["frames"] == 7
    assert verify(out) == []
    with tarfile.open(next(out.glob("*.tar"))) as tar:
        members = tar.getmembers()
        first = json.loads(tar.extractfile("seq1_neg__00000.json").read())
        masks = [np.asarray(Image.open(tar.extractfile(m))) for m in members if m.name.endswith(".png")]
    assert first["frames"] == ["seq1_img1", "seq1_img2", "seq1_img10"]
    assert len(masks) == 7 and not any(m.any() for m in masks)


def test_shards_build_of_a_centre_and_of_a_set_with_a_missing_mask(damaged_root, tmp_path, capsys):
    out = tmp_path / "c2"
    assert shards(["build", str(damaged_root), "--split", "data_C2", "--out", str(out)]) == 0
    totals = read_manifest(out)["totals"]
    assert (totals["sequences"], totals["samples"], totals["frames"]) == (3, 3, 3)  # one frame each
    (damaged_root / POSITIVE / "seq10" / "masks_seq10" / "9_endocv2021_positive_8_mask.jpg").unlink()
    assert shards(["build", str(damaged_root), "--split", POSITIVE, "--out", str(tmp_path / "pos")]) != 0
    assert "9_endocv2021_positive_8.jpg: image has no mask" in capsys.readouterr().err
    assert not (tmp_path / "pos").exists()
