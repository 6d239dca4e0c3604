"""Flat image sets (Kvasir-SEG, CVC-ClinicDB, PraNet's data): detection beside the other layouts, splits,
pairing by stem, sequences grouped by a CSV and its problems, validate, FolderDataset, TIFF and BMP."""

from __future__ import annotations

import io
import shutil

import numpy as np
import pytest
from PIL import Image

from autosam2.cli import main
from autosam2.config import Layout
from autosam2.data.folder import FolderDataset, validate_root
from autosam2.data.layouts import detect, reader, scan
from autosam2.data.layouts import images as flat
from autosam2.data.sample_format import read_manifest
from autosam2.errors import DatasetError
from shards.__main__ import main as shards
from shards.verify import verify
from tests.layout_fixtures import frame_and_mask, save
from tests.layout_fixtures.images import (
    PRANET_TESTS,
    write_cvc_clinicdb,
    write_kvasir,
    write_pranet,
    write_sequences_csv,
)
from tests.layout_fixtures.polypgen import write_polypgen
from tests.layout_fixtures.sunseg import write_sunseg


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    """Each published set, written once: Kvasir-SEG, CVC-ClinicDB's own release, PraNet's data/."""
    parent = tmp_path_factory.mktemp("flat")
    return {
        "kvasir": write_kvasir(parent),
        "cvc": write_cvc_clinicdb(parent),
        "pranet": write_pranet(parent),
        "sunseg": write_sunseg(parent / "SUN-SEG", frames=2, size=32),
        "polypgen": write_polypgen(parent / "PolypGen2021_MultiCenterData_v3", size=32),
    }


@pytest.fixture
def cvc(sets, tmp_path):
    """A private copy of CVC-ClinicDB that a test may change."""
    return shutil.copytree(sets["cvc"], tmp_path / "CVC-ClinicDB")


def test_detect_tells_every_fixture_layout_apart(sets, tiny_root_pristine):
    expected = {
        sets["kvasir"]: Layout.images,
        sets["cvc"]: Layout.images,
        sets["pranet"]: Layout.images,
        sets["pranet"] / "TestDataset": Layout.images,
        sets["pranet"] / "TrainDataset": Layout.images,
        sets["sunseg"]: Layout.sunseg,
        sets["polypgen"]: Layout.polypgen,
        tiny_root_pristine: Layout.polyp_gen,
    }
    assert {root: detect(root) for root in expected} == expected
    # polyp_gen's images/ holds sequence folders, not frames: no set there, at any depth
    assert [flat.splits(sets[name]) for name in ("sunseg", "polypgen")] == [[], []]
    assert flat.splits(tiny_root_pristine) == []


def test_a_root_that_is_one_set_has_the_split_all_read_by_default(sets):
    for root in (sets["kvasir"], sets["cvc"], sets["pranet"] / "TrainDataset"):
        found = reader(root)
        assert found.splits(root) == ["all"]
        assert [found.default_split(root, purpose) for purpose in ("train", "valid", "test")] == ["all"] * 3


def test_a_parent_of_sets_offers_each_as_a_split_by_its_path(sets):
    root = sets["pranet"]
    assert reader(root / "TestDataset").splits(root / "TestDataset") == list(PRANET_TESTS)
    assert reader(root).splits(root) == [f"TestDataset/{name}" for name in PRANET_TESTS] + ["TrainDataset"]
    with pytest.raises(
        DatasetError, match=r"no valid split in this images folder \(splits: TestDataset/CVC-300, "
    ):
        reader(root).default_split(root, "valid")
    sequences, problems = scan(root, "TestDataset/CVC-300")
    assert problems == [] and [s.name for s in sequences] == ["149", "150", "151"]


def test_each_kvasir_frame_is_a_one_frame_sequence_paired_by_its_id(sets):
    root = sets["kvasir"]
    sequences, problems = scan(root, "all")
    ids = sorted(p.stem for p in (root / "images").iterdir())
    assert problems == [] and [s.name for s in sequences] == ids
    frame = sequences[0].frames[0]
    assert len(sequences[0].frames) == 1 and frame.name == ids[0]
    assert frame.image == root / "images" / f"{ids[0]}.jpg" and frame.mask == root / "masks" / f"{ids[0]}.jpg"


def test_cvc_clinicdb_reads_original_with_ground_truth_where_it_lies(sets):
    sequences, problems = scan(sets["cvc"], "all")
    assert problems == [] and [s.name for s in sequences] == ["1", "2", "3", "4", "5", "6"]
    frame = sequences[0].frames[0]
    assert frame.image.parent.name == "Original" and frame.mask.parent.name == "Ground Truth"
    assert frame.image.suffix == frame.mask.suffix == ".tif"


def test_a_frame_without_a_mask_and_a_mask_without_a_frame_are_problems(cvc):
    (cvc / "Ground Truth" / "3.tif").unlink()
    shutil.copy(cvc / "Original" / "4.tif", cvc / "Original" / "40.tif")
    (cvc / "Original" / "4.tif").unlink()
    (report,) = validate_root(cvc)
    assert [str(p) for p in report.problems] == [
        f"{cvc / 'Original' / '3.tif'}: image has no mask (expected {cvc / 'Ground Truth' / '3'}.jpg or .png)",
        f"{cvc / 'Original' / '40.tif'}: image has no mask (expected {cvc / 'Ground Truth' / '40'}.jpg or .png)",
        f"{cvc / 'Ground Truth' / '4.tif'}: mask has no image (expected {cvc / 'Original' / '4'}.jpg)",
    ]
    assert report.frames == 4


def test_a_set_without_its_masks_folder_is_one_problem(cvc):
    shutil.rmtree(cvc / "Ground Truth")
    (report,) = validate_root(cvc, layout="images")
    assert [str(p) for p in report.problems] == [
        f"{cvc / 'Ground Truth'}: split 'all' has no 'Ground Truth' folder beside Original/"
    ]


def test_sequences_csv_groups_frames_in_natural_order_and_leaves_the_rest_alone(cvc, capsys):
    write_sequences_csv(
        cvc, [("3", "clip1"), ("1", "clip1"), ("2.tif", "clip1"), ("5", "clip2"), ("4", "clip2")]
    )
    sequences, problems = scan(cvc, "all")
    assert problems == []
    assert [(s.name, [f.name for f in s.frames]) for s in sequences] == [
        ("6", ["6"]),
        ("clip1", ["1", "2", "3"]),
        ("clip2", ["4", "5"]),
    ]
    assert (
        f"{cvc / 'sequences.csv'}: 1 frames not listed, each read as a one-frame sequence"
        in capsys.readouterr().err
    )


def test_sequences_csv_header_may_order_columns_freely_and_carry_others(cvc):
    (cvc / "sequences.csv").write_text("\ufeffnote,Sequence,Frame\nfirst,a,1\n,a,2\n")
    sequences, problems = scan(cvc, "all")
    assert problems == [] and [f.name for f in sequences[-1].frames] == ["1", "2"]


def test_every_bad_csv_row_is_one_problem_naming_the_csv_and_the_row(cvc):
    table = write_sequences_csv(
        cvc, [("1", "a"), ("99", "a"), ("1", "b"), ("2", ""), ("3,a", "extra"), ("4", "5"), ("6", "b")]
    )
    sequences, problems = scan(cvc, "all")
    assert [str(p) for p in problems] == [
        f"{table}: row 3: no frame '99' in {cvc / 'Original'} (a stem or file name)",
        f"{table}: row 4: frame '1' is listed again (first at row 2)",
        f"{table}: row 5: empty sequence",
        f"{table}: row 6: 3 fields, the header has 2",
        f"{table}: row 7: sequence '5' has the name of a frame the CSV does not list",
    ]
    assert [s.name for s in sequences] == ["2", "3", "5", "a", "b"]


@pytest.mark.parametrize("header", ["", "frame\n1\n", "image,clip\n1,a\n"])
def test_a_csv_without_its_header_is_one_problem(cvc, header):
    (cvc / "sequences.csv").write_text(header)
    _, problems = scan(cvc, "all")
    assert len(problems) == 1
    assert str(problems[0]).startswith(f"{cvc / 'sequences.csv'}: row 1: the header must name the columns")


def test_a_csv_that_is_not_text_is_one_problem(cvc):
    (cvc / "sequences.csv").write_bytes(b"frame,sequence\n\xff\xfe1,a\n")
    _, problems = scan(cvc, "all")
    assert [p.message.split(" (")[0] for p in problems] == ["is not a UTF-8 CSV file"]


def test_validate_and_inspect_read_each_set_where_it_lies(sets, capsys):
    assert main(["validate", str(sets["kvasir"])]) == 0
    out = capsys.readouterr().out
    assert (
        "ok (images layout); all: 4 sequences, 4 frames, 0 empty-mask frames; 4 masks have grey values" in out
    )
    assert main(["validate", str(sets["kvasir"]), "--split", "all", "--layout", "images"]) == 0
    assert "all: 4 sequences" in capsys.readouterr().out
    assert main(["validate", str(sets["pranet"]), "--split", "TestDataset/Kvasir", "--layout", "images"]) == 0
    assert "TestDataset/Kvasir: 3 sequences, 3 frames" in capsys.readouterr().out
    assert main(["inspect", str(sets["cvc"])]) == 0
    out = capsys.readouterr().out
    assert "images layout" in out and "all/6: 1 frames 48x48 (6 .. 6)" in out


def test_folder_dataset_reads_frames_of_several_sizes_and_csv_sequences_as_clips(sets, cvc):
    kvasir = FolderDataset(sets["kvasir"], "all", clip_len=1)
    sizes = {tuple(kvasir[i].frames[0].image_CHW.shape[-2:]) for i in range(len(kvasir))}
    assert len(kvasir) == 4 and sizes == {(48, 48), (40, 40), (56, 56)}
    write_sequences_csv(cvc, [(str(n), "clip") for n in range(1, 7)])
    dataset = FolderDataset(cvc, "all", clip_len=4, stride=2)
    assert dataset.sequence_names == ["clip"] and [w.start for w in dataset.windows] == [0, 2]
    clip = dataset[1]
    assert [f.name for f in clip.frames] == ["3", "4", "5", "6"]
    expected = np.asarray(Image.open(cvc / "Ground Truth" / "3.tif").convert("L")) > 128
    assert np.array_equal(clip.frames[0].object_mask().numpy(), expected) and expected.any()


def test_folder_dataset_on_a_broken_csv_is_one_line(cvc):
    write_sequences_csv(cvc, [("nine", "a")])
    with pytest.raises(
        DatasetError, match=r"row 2: no frame 'nine' .* run `autosam2 validate .* --layout images"
    ):
        FolderDataset(cvc, "all")


def _encoded(array: np.ndarray, fmt: str, **options) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format=fmt, **options)
    return buf.getvalue()


def test_tiff_and_bmp_frames_and_masks_read_in_every_storage(tmp_path):
    """LZW, deflate and PackBits TIFFs, greyscale, RGB and 1-bit masks, BMP (CVC-ColonDB's frames)."""
    rng = np.random.default_rng(3)
    stores = {
        "lzw.tif": {"compression": "tiff_lzw"},
        "deflate.tif": {"compression": "tiff_adobe_deflate"},
        "packbits.tif": {"compression": "packbits"},
        "plain.bmp": {},
    }
    truth = {}
    for k, (name, options) in enumerate(stores.items()):
        frame, mask = frame_and_mask(rng, 32)
        stem, suffix = name.split(".")
        fmt = "TIFF" if suffix == "tif" else "BMP"
        (tmp_path / "images").mkdir(exist_ok=True)
        (tmp_path / "masks").mkdir(exist_ok=True)
        (tmp_path / "images" / name).write_bytes(_encoded(frame, fmt, **options))
        stored = [mask, np.stack([mask] * 3, axis=-1), mask > 0][k % 3]
        (tmp_path / "masks" / name).write_bytes(_encoded(stored, fmt, **options))
        truth[stem] = mask > 0
    assert main(["validate", str(tmp_path)]) == 0
    dataset = FolderDataset(tmp_path, "all")
    for stem, mask in truth.items():
        frame = dataset.load_sequence(stem).frames[0]
        assert frame.image_CHW.shape == (3, 32, 32) and np.array_equal(frame.object_mask().numpy(), mask)


def test_a_cut_tiff_is_one_problem_naming_it(cvc):
    data = (cvc / "Original" / "2.tif").read_bytes()
    (cvc / "Original" / "2.tif").write_bytes(data[: len(data) // 2])
    (report,) = validate_root(cvc)
    assert [(p.path, p.message.split(" (")[0]) for p in report.problems] == [
        (cvc / "Original" / "2.tif", "cannot decode image")
    ]


def test_an_image_set_named_with_another_layout_says_what_is_there(sets, tiny_root_pristine, capsys):
    assert main(["validate", str(tiny_root_pristine), "--layout", "images"]) == 1
    assert f"{tiny_root_pristine}: holds no images split folder" in capsys.readouterr().out
    with pytest.raises(
        DatasetError, match=r"no train split 'train' in this polyp_gen folder \(splits: none\)"
    ):
        reader(sets["kvasir"], "polyp_gen").default_split(sets["kvasir"], "train")


def test_a_hidden_or_unknown_file_is_no_frame(cvc):
    (cvc / "Original" / ".DS_Store").write_bytes(b"\0")
    (cvc / "Original" / "Thumbs.db").write_bytes(b"\0")
    save(frame_and_mask(np.random.default_rng(0), 48)[0], cvc / "Original" / "._7.tif")
    sequences, problems = scan(cvc, "all")
    assert problems == [] and len(sequences) == 6


def test_shards_build_takes_the_only_split_by_default_and_any_set_by_name(sets, cvc, tmp_path, capsys):
    out = tmp_path / "kvasir"
    assert shards(["build", str(sets["kvasir"]), "--layout", "images", "--output-dir", str(out)]) == 0
    manifest = read_manifest(out)
    assert (manifest["layout"], manifest["split"], manifest["totals"]["samples"]) == ("images", "all", 4)
    assert verify(out) == []
    out = tmp_path / "clinicdb"
    assert (
        shards(
            ["build", str(sets["pranet"]), "--split", "TestDataset/CVC-ClinicDB", "--output-dir", str(out)]
        )
        == 0
    )
    assert read_manifest(out)["totals"]["frames"] == 3 and [p.name for p in out.glob("*.tar")] == [
        "TestDataset-CVC-ClinicDB-000-00000.tar"
    ]
    write_sequences_csv(cvc, [(str(n), "clip") for n in range(1, 7)])
    out = tmp_path / "grouped"
    assert shards(["build", str(cvc), "--output-dir", str(out), "--frames-per-sample", "4"]) == 0
    assert (
        sorted(read_manifest(out)["sequences"]) == ["clip"] and read_manifest(out)["totals"]["samples"] == 2
    )
