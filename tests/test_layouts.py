"""Dataset layouts: detection, splits, the official SUN-SEG frame order, labels, polyp_gen's free splits."""

from __future__ import annotations

import shutil

import pytest

from autosam2.cli import main
from autosam2.config import Layout
from autosam2.data.folder import FolderDataset, validate_root
from autosam2.data.layouts import detect, reader, scan, split_name
from autosam2.data.layouts.sunseg import TESTS, frame_order, official_key
from autosam2.errors import DatasetError
from tests.layout_fixtures.sunseg import SPLIT_CASES, frame_stems, write_sunseg


@pytest.fixture(scope="module")
def sunseg_root(tmp_path_factory):
    return write_sunseg(tmp_path_factory.mktemp("sunseg") / "SUN-SEG")


def test_each_layout_is_detected_and_named(sunseg_root, tiny_root_pristine):
    assert detect(sunseg_root) == Layout.sunseg
    assert detect(tiny_root_pristine) == Layout.polyp_gen
    assert reader(sunseg_root).splits(sunseg_root) == ["TrainDataset", *TESTS]


def test_a_folder_in_no_known_layout_is_one_line(tmp_path):
    (tmp_path / "photos").mkdir()
    with pytest.raises(DatasetError, match="not a dataset folder in a known layout"):
        detect(tmp_path)
    with pytest.raises(DatasetError, match="dataset root does not exist"):
        detect(tmp_path / "nowhere")


def test_sunseg_frames_are_in_the_official_evaluators_order_not_name_order(sunseg_root):
    sequences, problems = scan(sunseg_root, "TestEasyDataset/Unseen")
    assert problems == []
    (case,) = sequences
    names = [f.name for f in case.frames]
    assert names == frame_stems("case3_1", 6)
    assert names != sorted(names)  # the fixture's names sort otherwise: the order is the evaluator's
    assert [official_key(n) for n in names] == sorted(official_key(n) for n in names)


def test_official_key_reads_the_three_numbers_and_odd_names_fall_back_to_natural_order():
    assert official_key("case_M_20181001100941_0U62372100109341_1_005_001-1_a2_ayy_image0001") == (1, 2, 1)
    assert frame_order(["frame10", "frame2"]) == ["frame2", "frame10"]


def test_a_sunseg_name_outside_the_pattern_among_names_in_it_is_a_problem(sunseg_root, tmp_path):
    root = shutil.copytree(sunseg_root, tmp_path / "SUN-SEG")
    case = root / "TestHardDataset/Seen"
    first = sorted((case / "Frame/case1_2").iterdir())[0]
    odd = shutil.copy(first, case / "Frame/case1_2/copy of frame.jpg")
    shutil.copy(case / "GT/case1_2" / f"{first.stem}.png", case / "GT/case1_2/copy of frame.png")
    (report,) = validate_root(root, ["TestHardDataset/Seen"])
    assert [str(p) for p in report.problems] == [
        f"{odd}: name outside SUN-SEG's pattern (..._<n>-1_a<k>_..._image<m>): the official frame order "
        "cannot place it"
    ]


def test_the_parent_of_seen_and_unseen_names_them(sunseg_root):
    (report,) = validate_root(sunseg_root, ["TestEasyDataset"])
    assert [str(p) for p in report.problems] == [
        f"{sunseg_root / 'TestEasyDataset' / 'Frame'}: split 'TestEasyDataset' has no Frame folder (it holds "
        "the splits TestEasyDataset/Seen, TestEasyDataset/Unseen: name one)"
    ]


def test_sunseg_reads_gt_as_masks_and_classification_as_labels_and_ignores_the_rest(sunseg_root):
    sequences, _ = scan(sunseg_root, "TrainDataset")
    assert [s.name for s in sequences] == SPLIT_CASES["TrainDataset"]
    frame = sequences[0].frames[0]
    assert frame.image.parent.parent.name == "Frame" and frame.mask.parent.parent.name == "GT"
    assert frame.mask.suffix == ".png" and frame.image.suffix == ".jpg"
    assert frame.labels == {"pathology": "low_grade_adenoma"}
    assert sequences[1].frames[0].labels == {"pathology": "hyperplastic_polyp"}


def test_a_sunseg_frame_without_gt_is_a_problem_naming_it(sunseg_root, tmp_path):
    root = shutil.copytree(sunseg_root, tmp_path / "SUN-SEG")
    gt = sorted((root / "TestHardDataset/Seen/GT/case1_2").iterdir())[2]
    gt.unlink()
    (report,) = validate_root(root, ["TestHardDataset/Seen"])
    assert [str(p) for p in report.problems] == [
        f"{root / 'TestHardDataset/Seen/Frame/case1_2' / gt.with_suffix('.jpg').name}: image has no mask "
        f"(expected {gt.with_suffix('')}.jpg or .png)"
    ]


def test_validate_and_inspect_read_sunseg_where_it_lies(sunseg_root, capsys):
    assert main(["validate", str(sunseg_root)]) == 0
    out = capsys.readouterr().out
    assert "TestHardDataset/Unseen: 1 sequences, 6 frames" in out and "sunseg" in out
    dataset = FolderDataset(sunseg_root, "TestHardDataset/Unseen")
    video = dataset.load_sequence("case10_1")
    assert len(video.frames) == 6 and video.frames[0].object_mask().any()


def test_polyp_gen_takes_any_split_name_and_list_files_are_optional(tiny_root, capsys):
    shutil.copytree(tiny_root / "valid", tiny_root / "test")
    (tiny_root / "test" / "val_list.txt").unlink()
    sequences, problems = scan(tiny_root, "test")
    assert problems == [] and [s.name for s in sequences] == ["seq3"]
    assert "no test_list.txt; reading all 1 sequence folders" in capsys.readouterr().err
    (tiny_root / "test" / "test_list.txt").write_text("# held out\nseq3\n")
    assert [s.name for s in scan(tiny_root, "test")[0]] == ["seq3"]
    assert reader(tiny_root).splits(tiny_root) == ["test", "train", "valid"]


@pytest.mark.parametrize("split", ["../train", "/etc", "", ".", "./"])
def test_a_split_outside_the_dataset_is_refused(tiny_root_pristine, split):
    with pytest.raises(DatasetError, match="is not a folder name inside the dataset"):
        scan(tiny_root_pristine, split)


@pytest.mark.parametrize("split", ["TestEasyDataset/Unseen/", "./TestEasyDataset//Unseen"])
def test_a_split_is_named_as_the_layout_names_it(sunseg_root, split, capsys):
    assert split_name(sunseg_root, "auto", split, "valid") == "TestEasyDataset/Unseen"
    (report,) = validate_root(sunseg_root, [split])
    assert report.split == "TestEasyDataset/Unseen" and report.problems == []
    assert main(["inspect", str(sunseg_root), "--split", split]) == 0
    assert capsys.readouterr().out.splitlines()[1].startswith("TestEasyDataset/Unseen/case3_1: ")


def test_validate_of_a_missing_split_lists_the_splits_there_are(sunseg_root, capsys):
    (report,) = validate_root(sunseg_root, ["TestEasy"])
    (problem,) = report.problems
    assert str(problem) == (
        f"{sunseg_root / 'TestEasy'}: split folder is missing (splits: TrainDataset, {', '.join(TESTS)})"
    )
    assert main(["inspect", str(sunseg_root), "--split", "TestEasy"]) == 1
    assert "(splits: TrainDataset, TestEasyDataset/Seen, " in capsys.readouterr().err


def test_a_listed_sequence_that_climbs_out_of_the_split_is_a_problem_not_a_sequence(tiny_root):
    (tiny_root / "valid" / "val_list.txt").write_text("seq3\n../../train/images/seq1\n")
    sequences, problems = scan(tiny_root, "valid")
    assert [s.name for s in sequences] == ["seq3"]
    assert [str(p) for p in problems] == [
        f"{tiny_root / 'valid'}: sequence '../../train/images/seq1': a name outputs named after it would "
        "write outside their folder"
    ]
    with pytest.raises(DatasetError, match="would write outside their folder"):
        FolderDataset(tiny_root, "valid")  # so evaluate and predict write nothing


def test_an_explicit_layout_that_does_not_fit_says_what_is_there(sunseg_root):
    with pytest.raises(
        DatasetError, match=r"no train split 'train' in this polyp_gen folder \(splits: none\)"
    ):
        reader(sunseg_root, "polyp_gen").default_split(sunseg_root, "train")


def test_classification_lines_that_are_not_frame_and_class_are_said_and_the_rest_read(
    sunseg_root, tmp_path, capsys
):
    root = shutil.copytree(sunseg_root, tmp_path / "SUN-SEG")
    path = root / "TestHardDataset/Seen/Classification/classification.txt"
    path.write_text("garbage\r\n" + path.read_text().replace("\n", "\r\n"))
    sequences, problems = scan(root, "TestHardDataset/Seen")
    assert problems == [] and sequences[0].frames[0].labels == {"pathology": "low_grade_adenoma"}
    assert "1 line(s) are not '<frame> <class>' (first: line 1); not read" in capsys.readouterr().err
    path.write_bytes(b"\xff\xfe\x00bad")
    sequences, problems = scan(root, "TestHardDataset/Seen")
    assert problems == [] and sequences[0].frames[0].labels == {}
    assert "frames carry no pathology label" in capsys.readouterr().err
