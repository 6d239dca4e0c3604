"""`autosam2 synth`: deterministic, polyp-like, moving, with polyp-free, occluded and hard frames."""

import dataclasses
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFilter

from autosam2.cli import main
from autosam2.data import synthetic
from autosam2.data.folder import FolderDataset, validate_root
from autosam2.data.synthetic import BLIND, HIDING, SynthSpec, generate_sequence, write_dataset
from tests.helpers import TINY


def digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_same_seed_gives_byte_identical_files(tiny_root_pristine, tmp_path):
    again = tmp_path / "again"
    write_dataset(again, TINY)
    assert digest(again) == digest(tiny_root_pristine)
    other = tmp_path / "other"
    write_dataset(other, SynthSpec(**{**TINY.__dict__, "seed": TINY.seed + 1}))
    a, b = digest(other), digest(tiny_root_pristine)
    assert a.keys() == b.keys()
    assert sum(a[k] != b[k] for k in a) > len(a) // 2


def test_layout_lists_and_validation(tiny_root_pristine):
    root = tiny_root_pristine
    assert (root / "train" / "train_list.txt").read_text() == "seq1\nseq2\n"
    assert (root / "valid" / "val_list.txt").read_text() == "seq3\n"
    for split, seq in (("train", "seq1"), ("valid", "seq3")):
        assert len(list((root / split / "images" / seq).glob("frame*.jpg"))) == 12
        assert len(list((root / split / "masks" / seq).glob("frame*.jpg"))) == 12
    reports = validate_root(root)
    assert [r.problems for r in reports] == [[], []]


def test_a_test_split_leaves_train_and_valid_byte_identical(tiny_root_pristine, tmp_path):
    root = tmp_path / "with_test"
    summary = write_dataset(root, SynthSpec(**{**TINY.__dict__, "test_sequences": 2}))
    assert not (tiny_root_pristine / "test").exists()
    for split in ("train", "valid"):
        assert digest(root / split) == digest(tiny_root_pristine / split)
    assert (root / "test" / "test_list.txt").read_text() == "seq4\nseq5\n"
    assert summary["splits"] == {"train": ["seq1", "seq2"], "valid": ["seq3"], "test": ["seq4", "seq5"]}
    written = json.loads((root / "synth.json").read_text())
    assert written["splits"]["test"] == ["seq4", "seq5"] and written["spec"]["test_sequences"] == 2
    assert [len(written["events"][name]) for name in ("seq4", "seq5")] == [12, 12]
    assert {r.split: r.problems for r in validate_root(root)} == {"test": [], "train": [], "valid": []}
    # a stream of its own: the first test sequence is not the first valid sequence again
    test_frame = np.asarray(Image.open(root / "test" / "images" / "seq4" / "frame1.jpg"))
    valid_frame = np.asarray(Image.open(root / "valid" / "images" / "seq3" / "frame1.jpg"))
    assert np.abs(test_frame.astype(int) - valid_frame.astype(int)).mean() > 5


def _centroid(mask: np.ndarray) -> np.ndarray:
    ys, xs = np.nonzero(mask)
    return np.array([xs.mean(), ys.mean()])


@pytest.mark.parametrize("index", range(4))
def test_polyp_moves_scales_and_leaves_the_view(index):
    spec = SynthSpec(frames=24, size=128, seed=11)
    seq = generate_sequence(f"s{index}", "train", index, spec)
    assert len(seq.frames) == 24 and seq.frames[0].shape == (128, 128, 3) and seq.frames[0].dtype == np.uint8
    present = [m.any() for m in seq.masks]
    assert 0.1 <= 1 - np.mean(present) <= 0.5
    visible = [m for m in seq.masks if m.any()]
    areas = np.array([m.sum() for m in visible])
    # a polyp of plausible size that scales
    assert 0.002 < areas.mean() / 128**2 < 0.2
    assert areas.max() > 1.2 * areas.min()
    # and moves: centroids spread over several pixels
    centroids = np.stack([_centroid(m) for m in visible])
    assert np.linalg.norm(centroids.std(axis=0)) > 2.0
    # textured, not flat: frames differ from one another and have local contrast
    assert np.abs(seq.frames[0].astype(int) - seq.frames[-1].astype(int)).mean() > 2
    assert seq.frames[0].std() > 5


def test_polyp_differs_from_its_background():
    seq = generate_sequence("s", "train", 0, SynthSpec(frames=12, size=128, seed=5))
    for frame, mask in zip(seq.frames, seq.masks, strict=True):
        if mask.sum() > 50:
            inside = frame[mask].astype(float).mean(axis=0)
            outside = frame[~mask].astype(float).mean(axis=0)
            assert np.abs(inside - outside).sum() > 10
            return
    pytest.fail("no frame with a visible polyp")


def test_default_set_has_occlusion_hard_frames_and_enough_polyp_free_frames(tmp_path):
    # the default spec's content, at a smaller size to keep the test fast
    spec = SynthSpec(size=96)
    summary = write_dataset(tmp_path / "d", spec)
    assert summary["frames"] == (8 + 4) * 24
    assert summary["empty_frames"] >= 0.1 * summary["frames"]
    valid = FolderDataset(tmp_path / "d", "valid")
    assert len(valid.sequence_names) == 4
    events = [e for seq in summary["events"].values() for e in seq]
    assert any(0.05 < e["occluded"] < 0.95 and e["visible"] for e in events), "no partial occlusion"
    assert any(e["episode"] == "blur" and e["blur_sigma"] > 0.9 and e["visible"] for e in events), (
        "no blurred polyp"
    )
    assert any(e["episode"] == "haze" and e["haze"] > 0.5 and e["visible"] for e in events), "no hazy polyp"
    # every valid sequence has a hard-to-see stretch where memory should help
    for name in valid.sequence_names:
        assert any(e["episode"] and e["visible"] for e in summary["events"][name]), name


def test_existing_output_is_refused_and_overwrite_replaces(tmp_path, capsys):
    out = tmp_path / "pg"
    args = ["synth", "--out", str(out), "--sequences", "2", "--frames", "4", "--size", "64"]
    assert main(args) == 0
    assert "2 train + 1 valid + 1 test sequences, 16 frames of 64x64" in capsys.readouterr().out
    before = (out / "train" / "train_list.txt").read_text()
    assert main(args) == 1
    assert "already holds a synthetic dataset; pass --overwrite" in capsys.readouterr().err
    (out / "marker").write_text("x")  # not the command's: --overwrite leaves the folder alone
    assert main([*args, "--overwrite"]) == 1
    assert "holds marker beside a synthetic dataset" in capsys.readouterr().err
    (out / "marker").unlink()
    assert main([*args, "--seed", "4", "--overwrite"]) == 0
    assert (out / "train" / "train_list.txt").read_text() == before
    assert [p.name for p in tmp_path.iterdir()] == ["pg"]


def test_synth_sizes_its_test_split_or_leaves_it_out(tmp_path, capsys):
    args = ["synth", "--frames", "2", "--size", "32", "--sequences", "4"]
    assert main([*args, "--out", str(tmp_path / "half"), "--valid-sequences", "1"]) == 0
    assert "4 train + 1 valid + 2 test sequences, 14 frames" in capsys.readouterr().out
    assert main([*args, "--out", str(tmp_path / "none"), "--test-sequences", "0"]) == 0
    assert "4 train + 2 valid sequences, 12 frames" in capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "none").iterdir()) == ["synth.json", "train", "valid"]
    for bad in (["--test-sequences", "-1"], ["--valid-sequences", "0"]):
        assert main([*args, "--out", str(tmp_path / "bad"), *bad]) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "test sequences >= 0" in err[0] and "Traceback" not in err[0], err
    assert not (tmp_path / "bad").exists()


def test_a_failure_half_way_leaves_nothing_behind(tmp_path, monkeypatch):
    calls = []
    real = synthetic.generate_sequence

    def flaky(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("disk on fire")
        return real(*args, **kwargs)

    monkeypatch.setattr(synthetic, "generate_sequence", flaky)
    with pytest.raises(RuntimeError, match="disk on fire"):
        write_dataset(tmp_path / "pg", SynthSpec(train_sequences=2, valid_sequences=1, frames=3, size=64))
    assert list(tmp_path.iterdir()) == []


def test_the_dataset_is_the_same_whatever_the_number_of_workers(tmp_path):
    spec = SynthSpec(train_sequences=3, valid_sequences=1, frames=4, size=64, seed=2)
    one = write_dataset(tmp_path / "one", spec)
    two = write_dataset(tmp_path / "two", spec, workers=2)
    assert one == two
    files = sorted(p.relative_to(tmp_path / "one") for p in (tmp_path / "one").rglob("*") if p.is_file())
    assert files and files == sorted(
        p.relative_to(tmp_path / "two") for p in (tmp_path / "two").rglob("*") if p.is_file()
    )
    assert all((tmp_path / "one" / f).read_bytes() == (tmp_path / "two" / f).read_bytes() for f in files)


def _contrast(frame: np.ndarray, mask: np.ndarray) -> float:
    """How far the polyp stands out: its mean colour against a ring of tissue around it."""
    grown = Image.fromarray(mask.astype(np.uint8) * 255).filter(ImageFilter.MaxFilter(13))
    ring = (np.asarray(grown) > 128) & ~mask
    return float(np.abs(frame[mask].astype(float).mean(0) - frame[ring].astype(float).mean(0)).sum())


def test_the_hard_split_hides_a_present_polyp_in_labelled_episodes(tmp_path):
    spec = SynthSpec(size=128, hard=True)
    hidden, clear, kinds = [], [], set()
    for index in range(6):
        seq = generate_sequence("s", "valid", index, spec)
        labels = [synthetic.frame_kind(e) for e in seq.events]
        assert set(labels) <= set(synthetic.FRAME_KINDS)
        assert "absent" in labels and not any(
            seq.masks[i].any() for i, k in enumerate(labels) if k == "absent"
        )
        for i, kind in enumerate(labels):
            if kind in HIDING or kind in BLIND:
                kinds.add(kind)
                assert seq.masks[i].sum() > 20, (index, i, kind)  # present, the mask unchanged
                if kind in HIDING:
                    hidden.append(_contrast(seq.frames[i], seq.masks[i]))
                if labels[i - 1] != kind:  # an episode starts after two frames in view
                    assert labels[i - 1] != "absent" and labels[i - 2] != "absent", (index, labels)
            elif kind == "clear" and seq.masks[i].sum() > 20:
                clear.append(_contrast(seq.frames[i], seq.masks[i]))
    assert kinds == {*HIDING, *BLIND}  # a few sequences take every kind in turn
    assert np.median(hidden) < 0.5 * np.median(clear), (np.median(hidden), np.median(clear))
    again = generate_sequence("s", "valid", 0, spec)
    first = generate_sequence("s", "valid", 0, spec)
    assert all(np.array_equal(a, b) for a, b in zip(again.frames, first.frames, strict=True))
    default = generate_sequence("s", "valid", 0, SynthSpec(size=128))
    assert not np.array_equal(default.frames[0], first.frames[0])  # its own draws, the default set untouched


def test_synth_writes_the_hard_split_with_its_labels(tmp_path, capsys):
    assert main(["synth", "--out", str(tmp_path / "h"), "--sequences", "2", "--size", "64", "--hard"]) == 0
    written = json.loads((tmp_path / "h" / "synth.json").read_text())
    assert written["spec"]["hard"] is True
    assert written["splits"] == {"train": ["seq1", "seq2"], "valid": ["seq3"], "test": ["seq4"]}
    for names in written["splits"].values():  # every split's frames labelled, the test split's too
        labels = {synthetic.frame_kind(e) for name in names for e in written["events"][name]}
        assert labels & set(HIDING) and labels & set(BLIND) and "absent" in labels, (names, labels)


def test_sixteen_hard_sequences_hold_every_kind_of_episode():
    spec = SynthSpec(size=64, hard=True)
    episodes: dict[str, int] = {}
    for index in range(16):
        rng = np.random.default_rng((spec.seed, synthetic.SPLIT_CODES["test"], index, 1))
        kinds = synthetic._scene(rng, spec, index).episode
        for i, kind in enumerate(kinds):
            if kind and kind != kinds[i - 1]:
                episodes[kind] = episodes.get(kind, 0) + 1
    assert set(episodes) == {*HIDING, *BLIND} and min(episodes.values()) >= 2, episodes
    assert 16 * 24 // 10 * 0.75 <= sum(episodes.values()) <= 16 * 24 // 10, (
        episodes
    )  # about one per 10 frames


def test_a_dropped_or_flash_frame_says_about_as_little_whether_the_polyp_is_there():
    """Hard split: dropped and flash frames come where no polyp is too (decoys, labelled absent), about
    as often as over a hidden polyp, so a blank frame gives its presence away no more than its place."""
    spec = SynthSpec(size=64, hard=True)
    blank = {True: 0, False: 0}
    levels = set()
    for index in range(16):
        seq = generate_sequence(f"s{index}", "test", index, spec)
        for frame, mask, event in zip(seq.frames, seq.masks, seq.events, strict=True):
            if frame.std() < 4 and (frame.mean() < 3 or frame.mean() > 248):
                blank[bool(mask.any())] += 1
                present = synthetic.frame_kind(event) in BLIND
                assert present == bool(mask.any()), event  # a decoy is labelled absent
                levels.add((round(frame.mean() / 255), present))
    assert levels == {(0, True), (1, True), (0, False), (1, False)}, levels
    assert 0.35 <= blank[True] / (blank[True] + blank[False]) <= 0.65, blank


def test_a_blind_frame_is_what_the_same_tissue_shows_without_the_polyp():
    """A covered, dropped or flash frame is byte for byte the frame rendered from the same canvas with
    no polyp on it and an empty mask (the same draws): nothing in it tells whether or where the polyp is."""
    spec = SynthSpec(size=96, hard=True)
    kinds, decoys, differ = set(), 0, 0
    for index in range(4):
        rng = np.random.default_rng((spec.seed, synthetic.SPLIT_CODES["valid"], index, 1))
        scene = synthetic._scene(rng, spec, index)
        no_polyp = Image.new("L", scene.mask.size, 0)
        bare = dataclasses.replace(scene, canvas=scene.plain, mask=no_polyp)
        written = generate_sequence("s", "valid", index, spec)
        for i in range(spec.frames):
            state = rng.bit_generator.state
            frame, mask, event = synthetic._render_frame(rng, scene, i)
            assert np.array_equal(frame, written.frames[i])  # the frames the split holds
            after = rng.bit_generator.state
            rng.bit_generator.state = state
            without = synthetic._render_frame(rng, bare, i)[0]
            assert rng.bit_generator.state == after
            kind = synthetic.frame_kind(event)
            ys, xs = np.nonzero(mask)
            if kind in BLIND:
                kinds.add(kind)
                assert mask.sum() > 20 and np.array_equal(frame, without), (index, i, kind)
            else:
                differ += kind == "clear" and not np.array_equal(frame, without)
            if kind == "covered":  # fully opaque over every pixel of the polyp
                instrument = scene.instruments[i]
                assert synthetic._shaft(instrument, xs, ys)[0].max() <= instrument.half_width - 0.5
            elif i in scene.instruments:  # a decoy: the same instrument, clear of any polyp in view
                decoys += 1
                assert not scene.episode[i] and kind != "occluded"
                instrument = scene.instruments[i]
                assert not mask.any() or synthetic._shaft(instrument, xs, ys)[0].min() > instrument.half_width
            if kind == "dropped":
                assert frame.mean() < 2 and frame.max() < 16
            if kind == "flash":
                assert frame.mean() > 250 and frame.min() > 235
    assert kinds == set(BLIND) and decoys >= 2 and differ > 10, (kinds, decoys, differ)


def test_synth_cuts_a_window_into_every_episode_of_the_train_split(tmp_path, capsys):
    """--episode-windows 6: train_episodes holds, for each hidden episode of the train sequences with six
    frames from two before it, those frames copied byte for byte and labelled; the other splits unchanged."""
    args = ["synth", "--sequences", "3", "--size", "64", "--hard"]
    assert main([*args, "--out", str(tmp_path / "plain")]) == 0
    assert main([*args, "--out", str(tmp_path / "w"), "--episode-windows", "6"]) == 0
    assert "train_episodes" in capsys.readouterr().out
    root = tmp_path / "w"
    written = json.loads((root / "synth.json").read_text())
    windows = written["splits"].pop("train_episodes")
    assert (root / "train_episodes" / "train_episodes_list.txt").read_text().split() == windows
    plain = json.loads((tmp_path / "plain" / "synth.json").read_text())
    assert written["splits"] == plain["splits"]
    assert digest(root / "train") == digest(tmp_path / "plain" / "train")
    expected = []
    for seq in written["splits"]["train"]:
        episodes = [e["episode"] for e in written["events"][seq]]
        for i, kind in enumerate(episodes):
            if kind and kind != episodes[i - 1] and i + 4 <= len(episodes):
                expected.append(f"{seq}w{i - 1}")
    assert windows == expected and len(windows) >= 3, (windows, expected)
    for name in windows:
        seq, first = name.split("w")
        start = int(first) - 1
        events = written["events"][name]
        assert events == written["events"][seq][start : start + 6]
        assert events[0]["visible"] and events[1]["visible"] and not events[1]["episode"]
        assert synthetic.frame_kind(events[2]) in {*HIDING, *BLIND}
        for part in ("images", "masks"):
            frames = sorted((root / "train_episodes" / part / name).iterdir())
            assert [f.name for f in frames] == sorted(f"frame{j + 1}.jpg" for j in range(6))
            for j in range(6):
                copied = (root / "train_episodes" / part / name / f"frame{j + 1}.jpg").read_bytes()
                assert copied == (root / "train" / part / seq / f"frame{start + j + 1}.jpg").read_bytes()
    assert [r.problems for r in validate_root(root, ["train_episodes"])] == [[]]


@pytest.mark.parametrize(
    "extra, problem",
    [
        (["--episode-windows", "6"], "needs --hard"),
        (["--hard", "--episode-windows", "2"], "needs --hard and 3 to --frames (24)"),
        (["--hard", "--episode-windows", "25"], "needs --hard and 3 to --frames (24)"),
        (["--hard", "--frames", "4", "--episode-windows", "4"], "no window of 4 frames fits"),
    ],
)
def test_synth_refuses_episode_windows_it_cannot_cut(tmp_path, capsys, extra, problem):
    out = tmp_path / "w"
    assert main(["synth", "--out", str(out), "--sequences", "2", "--size", "64", *extra]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--episode-windows" in err[0] and problem in err[0], err
    assert not out.exists()
