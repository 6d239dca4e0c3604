"""`python -m shards build | merge`: the shard set, its manifest, job-array parts, atomic output."""

import hashlib
import io
import json
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from autosam2.data.sample_format import FORMAT, UNLABELLED_VERSION
from autosam2.errors import DatasetError, OutputRefused
from shards.__main__ import main
from shards.writer import build, build_part, merge
from tests.helpers import noisy_empty_jpeg

REPO = Path(__file__).resolve().parents[1]


def tar_members(path: Path) -> dict[str, bytes]:
    with tarfile.open(path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}


def test_manifest_describes_every_shard(tiny_shards_pristine, tiny_root_pristine):
    out = tiny_shards_pristine["train"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["format"] == FORMAT and manifest["format_version"] == UNLABELLED_VERSION  # no labels
    assert manifest["split"] == "train" and manifest["frames_per_sample"] == 5
    assert manifest["layout"] == "polyp_gen"
    assert manifest["source"]["root"] == str(tiny_root_pristine.resolve())
    assert manifest["source"]["layout"] == "polyp_gen" and manifest["source"]["split"] == "train"
    assert manifest["source"]["frames"] == 24 and manifest["source"]["sequences"] == 2
    assert manifest["totals"] == {
        "shards": 1,
        "samples": 6,
        "frames": 24,
        "bytes": manifest["shards"][0]["bytes"],
        "sequences": 2,
    }
    for shard in manifest["shards"]:
        data = (out / shard["name"]).read_bytes()
        assert shard["bytes"] == len(data) and shard["sha256"] == hashlib.sha256(data).hexdigest()
    assert manifest["shards"][0]["samples"] == [f"{s}__{c:05d}" for s in ("seq1", "seq2") for c in range(3)]
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "train-000-00000.tar"]


def test_samples_hold_original_jpeg_bytes_binary_png_masks_and_a_record(
    tiny_shards_pristine, tiny_root_pristine
):
    members = tar_members(tiny_shards_pristine["train"] / "train-000-00000.tar")
    record = json.loads(members["seq2__00002.json"])
    assert record["sequence"] == "seq2" and record["split"] == "train"
    assert record["frames"] == ["frame11", "frame12"]  # the last chunk is shorter
    assert (
        record["start"] == 10
        and record["chunk"] == 2
        and record["num_chunks"] == 3
        and record["size"] == [64, 64]
    )
    source = tiny_root_pristine / "train" / "images" / "seq2" / "frame11.jpg"
    assert members["seq2__00002.f0000.jpg"] == source.read_bytes()  # never re-encoded
    mask = Image.open(io.BytesIO(members["seq2__00002.m0000.png"]))
    assert mask.format == "PNG" and mask.mode == "1"
    expected = np.asarray(Image.open(tiny_root_pristine / "train" / "masks" / "seq2" / "frame11.jpg")) > 128
    assert np.array_equal(np.asarray(mask), expected)


def test_a_sequence_never_spans_two_shards_and_size_limits_split_the_set(tiny_root_pristine, tmp_path):
    manifest = build(tiny_root_pristine, "train", tmp_path / "small", frames_per_sample=4, max_shard_mb=0.001)
    assert manifest["totals"]["shards"] == 2
    for shard in manifest["shards"]:
        assert len({k.split("__")[0] for k in shard["samples"]}) == 1
    assert manifest["totals"]["samples"] == 6  # 12 frames / 4 per sample, two sequences


def test_existing_output_is_refused_and_a_bad_root_leaves_nothing(
    tiny_root, tmp_path, tiny_shards_pristine, capsys
):
    out = tiny_shards_pristine["train"]
    assert main(["build", str(tiny_root), "--split", "train", "--out", str(out)]) == 1
    assert "already holds a shard set; pass --overwrite" in capsys.readouterr().err
    (tiny_root / "train" / "masks" / "seq2" / "frame3.jpg").unlink()
    target = tmp_path / "new"
    assert main(["build", str(tiny_root), "--split", "train", "--out", str(target)]) == 1
    assert "seq2/frame3.jpg: image has no mask" in capsys.readouterr().err
    assert not target.exists() and not any(p.name.startswith(".new") for p in tmp_path.iterdir())


def test_an_undecodable_mask_stops_the_build_naming_the_file(tiny_root, tmp_path):
    (tiny_root / "valid" / "masks" / "seq3" / "frame5.jpg").write_bytes(b"broken")
    with pytest.raises(DatasetError, match=r"seq3/frame5\.jpg: cannot decode mask"):
        build(tiny_root, "valid", tmp_path / "out" / "v")
    assert not (tmp_path / "out").exists()  # nor the parent made for it


def test_overwrite_replaces(tiny_root_pristine, tmp_path):
    out = tmp_path / "s"
    build(tiny_root_pristine, "valid", out, frames_per_sample=6)
    manifest = build(tiny_root_pristine, "valid", out, frames_per_sample=12, overwrite=True)
    assert manifest["totals"]["samples"] == 1
    assert json.loads((out / "manifest.json").read_text())["frames_per_sample"] == 12


def test_job_array_parts_are_disjoint_and_merge_into_the_same_set(tiny_root_pristine, tmp_path):
    single = build(tiny_root_pristine, "train", tmp_path / "single", frames_per_sample=5)
    out = tmp_path / "array"
    parts = [build_part(tiny_root_pristine, "train", out, i, 2, frames_per_sample=5) for i in (1, 0)]
    keys = [{k for s in p["shards"] for k in s["samples"]} for p in parts]
    assert keys[0] and keys[1] and not keys[0] & keys[1]
    merged = merge(out)
    assert sorted(k for s in merged["shards"] for k in s["samples"]) == sorted(
        k for s in single["shards"] for k in s["samples"]
    )
    assert merged["totals"]["frames"] == single["totals"]["frames"] == 24
    assert [s["name"] for s in merged["shards"]] == ["train-000-00000.tar", "train-001-00000.tar"]
    assert not (out / "parts").exists()


def test_merge_refuses_a_missing_part(tiny_root_pristine, tmp_path, capsys):
    out = tmp_path / "array"
    build_part(tiny_root_pristine, "train", out, 0, 3, frames_per_sample=5)
    build_part(tiny_root_pristine, "train", out, 2, 3, frames_per_sample=5)
    assert main(["merge", str(out)]) == 1
    assert "parts [1] of 3 are missing" in capsys.readouterr().err
    assert not (out / "manifest.json").exists()
    with pytest.raises(OutputRefused, match="part already written"):
        build_part(tiny_root_pristine, "train", out, 2, 3, frames_per_sample=5)


def test_parallel_workers_write_the_same_samples(tiny_root_pristine, tmp_path):
    one = build(
        tiny_root_pristine, "train", tmp_path / "one", frames_per_sample=3, max_shard_mb=0.001, workers=1
    )
    two = build(
        tiny_root_pristine, "train", tmp_path / "two", frames_per_sample=3, max_shard_mb=0.001, workers=2
    )
    assert [s["samples"] for s in one["shards"]] == [s["samples"] for s in two["shards"]]
    for a, b in zip(one["shards"], two["shards"], strict=True):
        ma, mb = tar_members(tmp_path / "one" / a["name"]), tar_members(tmp_path / "two" / b["name"])
        assert ma == mb


def test_module_command_end_to_end(tiny_root_pristine, tmp_path):
    out = tmp_path / "cli"
    built = subprocess.run(
        [
            sys.executable,
            "-m",
            "shards",
            "build",
            str(tiny_root_pristine),
            "--split",
            "valid",
            "--out",
            str(out),
            "--frames-per-sample",
            "4",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert built.returncode == 0, built.stderr
    assert "1 shards, 3 samples, 12 frames" in built.stdout
    checked = subprocess.run(
        [sys.executable, "-m", "shards", "verify", str(out)], cwd=REPO, capture_output=True, text=True
    )
    assert checked.returncode == 0 and checked.stdout.strip() == f"{out}: ok"


# validate and build agree -------------------------------------------------------------------------------


@pytest.mark.parametrize("case", __import__("tests.test_validate", fromlist=["CASES"]).CASES)
def test_build_refuses_whatever_validate_rejects_and_writes_nothing(tiny_root, tmp_path, capsys, case):
    from tests.test_validate import _damage

    expected = _damage(tiny_root, case)
    split = "valid" if expected.startswith("valid") else "train"
    out = tmp_path / "out"
    assert main(["build", str(tiny_root), "--split", split, "--out", str(out)]) == 1
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and str(tiny_root) in error[0], error
    assert expected.split(":")[0] in error[0]
    assert not out.exists() and not list(tmp_path.glob(".out*"))


def _rename_sequence(root: Path, old: str, new: str) -> None:
    for kind in ("images", "masks"):
        (root / "train" / kind / old).rename(root / "train" / kind / new)
    lst = root / "train" / "train_list.txt"
    lst.write_text(lst.read_text().replace(old, new))


def test_sequence_names_with_dots_round_trip_through_the_shards(tiny_root, tmp_path, capsys):
    from autosam2.cli import main as cli
    from autosam2.config import DataConfig
    from autosam2.data.stream import ClipStream
    from shards.verify import verify

    _rename_sequence(tiny_root, "seq1", "seq.1")
    _rename_sequence(tiny_root, "seq2", "100%.v2")
    assert cli(["validate", str(tiny_root), "--split", "train"]) == 0
    build(tiny_root, "train", tmp_path / "s", frames_per_sample=5)
    manifest = json.loads((tmp_path / "s" / "manifest.json").read_text())
    assert sorted(manifest["sequences"]) == ["100%.v2", "seq.1"]
    assert "seq%2E1__00000" in manifest["shards"][0]["samples"]
    assert "100%25%2Ev2__00002" in manifest["shards"][0]["samples"]
    names = [
        video.video_id for video in ClipStream(tmp_path / "s", "eval", DataConfig(), None, seed=0).sequences()
    ]
    assert names == ["seq.1", "100%.v2"]
    assert verify(tmp_path / "s") == []


def _png16(path: Path, values: np.ndarray) -> None:
    Image.fromarray(values.astype(np.uint16)).save(path)
    assert Image.open(path).mode.startswith("I;16")


def test_a_16bit_mask_and_a_cmyk_frame_read_the_same_everywhere(tiny_root, tmp_path):
    """Pixel values, not just "no error": the folder reader, validate, the shards and the stream agree."""
    from autosam2.config import DataConfig
    from autosam2.data.folder import FolderDataset, validate_split
    from autosam2.data.stream import ClipStream

    frames = tiny_root / "train" / "images" / "seq1"
    masks = tiny_root / "train" / "masks" / "seq1"
    wide = np.zeros((64, 64), np.uint16)
    wide[10:20, 10:20] = 65535  # polyp
    wide[30:40, 30:40] = 40000  # 61 % grey: polyp
    wide[50:60, 50:60] = 1000  # 1.5 % grey: background, though above 128 if read as 8-bit
    (masks / "frame1.jpg").unlink()
    _png16(masks / "frame1.png", wide)
    expected_mask = wide >= 32768
    Image.new("CMYK", (64, 64), (0, 255, 255, 0)).save(frames / "frame2.jpg", quality=100)  # red

    report = validate_split(tiny_root, "train")
    assert report.problems == []
    folder = FolderDataset(tiny_root, "train")
    assert np.array_equal(folder.load_frame("seq1", 0).object_mask().numpy(), expected_mask)
    red = folder.load_frame("seq1", 1).image_CHW
    assert red.shape == (3, 64, 64) and red[0].min() >= 250 and red[1:].max() <= 5
    build(tiny_root, "train", tmp_path / "s", frames_per_sample=5)
    video = next(
        v
        for v in ClipStream(tmp_path / "s", "eval", DataConfig(), 256, seed=0).sequences()
        if v.video_id == "seq1"
    )
    assert np.array_equal(video.frames[0].object_mask().numpy(), expected_mask)
    assert bool((video.frames[1].image_CHW == red).all())


def _label_map(path: Path, kind: str) -> str:
    """Write a 0/1 label map as `kind` at `path` (a .png); return what the problem line calls it."""
    labels = np.zeros((64, 64), np.uint8)
    labels[5:9, 5:9] = 1
    if kind == "16-bit":
        _png16(path, labels)
        return "16-bit values 0 and 1"
    if kind == "palette":  # index 1 drawn dark green: grey 59, below the threshold
        image = Image.fromarray(labels, mode="L").convert("P")
        image.putpalette([0, 0, 0, 0, 100, 0] + [0] * 762)
        image.save(path)
        return "palette indices 0 and 1"
    Image.fromarray(labels).save(path)
    return "8-bit greyscale values 0 and 1"


@pytest.mark.parametrize("kind", ["8-bit", "16-bit", "palette"])
def test_a_label_map_is_rejected_by_both(tiny_root, tmp_path, capsys, kind):
    from autosam2.cli import main as cli

    masks = tiny_root / "train" / "masks" / "seq2"
    (masks / "frame3.jpg").unlink()
    what = _label_map(masks / "frame3.png", kind)
    assert cli(["validate", str(tiny_root), "--split", "train"]) == 1
    expected = f"frame3.png: mask is a 0/1 label map ({what}"
    assert expected in capsys.readouterr().out
    with pytest.raises(DatasetError, match=rf"seq2/{re.escape(expected)}.*masks must be greyscale 0/255"):
        build(tiny_root, "train", tmp_path / "s")


def test_a_palette_mask_that_draws_the_polyp_light_is_a_mask_everywhere(tiny_root, tmp_path):
    from autosam2.config import DataConfig
    from autosam2.data.folder import FolderDataset, validate_split
    from autosam2.data.stream import ClipStream

    masks = tiny_root / "train" / "masks" / "seq2"
    (masks / "frame3.jpg").unlink()
    indices = np.zeros((64, 64), np.uint8)
    indices[5:29, 8:40] = 1
    image = Image.fromarray(indices, mode="L").convert("P")
    image.putpalette([0, 0, 0, 255, 255, 255] + [0] * 762)
    image.save(masks / "frame3.png")
    assert validate_split(tiny_root, "train").problems == []
    folder = FolderDataset(tiny_root, "train").load_frame("seq2", 2).object_mask()
    build(tiny_root, "train", tmp_path / "s", frames_per_sample=5)
    seq2 = next(
        v
        for v in ClipStream(tmp_path / "s", "eval", DataConfig(), None, seed=0).sequences()
        if v.video_id == "seq2"
    )
    for mask in (folder, seq2.frames[2].object_mask()):
        assert np.array_equal(mask.numpy(), indices == 1)


def test_jpeg_masks_with_compression_noise_are_built_as_empty_and_counted(tiny_root, tmp_path, capsys):
    from autosam2.cli import main as cli
    from autosam2.config import DataConfig
    from autosam2.data.stream import ClipStream

    masks = tiny_root / "train" / "masks"
    peaks = [noisy_empty_jpeg(masks / "seq1" / f"frame{i}.jpg", q) for i, q in [(2, 30), (6, 60), (11, 90)]]
    assert all(1 < peak < 128 for peak in peaks), peaks
    count = f"3 masks are empty with compression noise (max {max(peaks)})"
    assert cli(["validate", str(tiny_root), "--split", "train"]) == 0
    assert capsys.readouterr().out.strip().endswith(count)
    out = tmp_path / "s"
    assert (
        main(["build", str(tiny_root), "--split", "train", "--out", str(out), "--frames-per-sample", "5"])
        == 0
    )
    assert capsys.readouterr().out.strip().endswith(f"MB; {count}")
    seq1 = next(
        v for v in ClipStream(out, "eval", DataConfig(), None, seed=0).sequences() if v.video_id == "seq1"
    )
    assert not any(seq1.frames[i - 1].object_mask().any() for i in (2, 6, 11))  # frame2 is index 1
    (shard,) = json.loads((out / "manifest.json").read_text())["shards"]
    assert shard["empty_with_noise"] == {"masks": 3, "peak": max(peaks)}
    parts = ["--shard-index", "0", "--num-shards", "1"]
    assert main(["build", str(tiny_root), "--split", "train", "--out", str(tmp_path / "a"), *parts]) == 0
    assert capsys.readouterr().out.strip().endswith(f"1 shards, 24 frames; {count}")
    assert main(["merge", str(tmp_path / "a")]) == 0
    assert capsys.readouterr().out.strip().endswith(f"24 frames; {count}")
