"""`autosam2 bench memory-learning`: video vs per-frame mode of the same weights per kind of frame, with
bootstrap intervals over sequences that are paired, frame-weighted and seeded."""

import json

import numpy as np
import pytest

from autosam2.bench.memory_learning import bootstrap_intervals
from autosam2.cli import main
from autosam2.eval.episodes import GROUPS


def sums(frames_S, means_S):
    return np.asarray(frames_S, float) * np.asarray(means_S, float)


def test_identical_modes_differ_by_exactly_nothing():
    frames = np.array([3, 5, 2, 7])
    dice = sums(frames, [0.2, 0.9, 0.4, 0.6])
    out = bootstrap_intervals(frames, dice, dice, 500, seed=1)
    assert out["video_minus_frame"] == {"value": 0.0, "ci": [0.0, 0.0]}
    assert out["video"] == out["frame"] and out["video"]["ci"][0] < out["video"]["ci"][1]


def test_a_constant_shift_is_the_difference_and_its_interval():
    frames = np.array([3, 5, 2, 7, 4])
    frame_dice = sums(frames, [0.2, 0.5, 0.4, 0.3, 0.1])
    out = bootstrap_intervals(frames, frame_dice + 0.25 * frames, frame_dice, 500, seed=1)
    assert out["video_minus_frame"]["value"] == pytest.approx(0.25)
    assert out["video_minus_frame"]["ci"] == pytest.approx([0.25, 0.25])


def test_each_figure_is_frame_weighted_and_the_interval_is_the_percentile_one():
    # one frame scored 1, three frames scored 0: 0.25 over frames (a mean over sequences would say 0.5)
    out = bootstrap_intervals(np.array([1, 3]), np.array([1.0, 0.0]), np.zeros(2), 2000, seed=0)
    assert out["video"]["value"] == 0.25
    # resamples {a,a}: 1, {a,b}: 0.25, {b,b}: 0 -> the 2.5th and 97.5th percentiles are 0 and 1
    assert out["video"]["ci"] == [0.0, 1.0]


def test_the_interval_narrows_with_more_sequences():
    rng = np.random.default_rng(7)

    def width(n: int) -> float:
        frames = rng.integers(5, 20, n)
        video, frame = sums(frames, rng.uniform(0.3, 0.9, n)), sums(frames, rng.uniform(0.2, 0.8, n))
        lo, hi = bootstrap_intervals(frames, video, frame, 1000, seed=0)["video_minus_frame"]["ci"]
        return hi - lo

    assert width(160) < width(10) / 2  # about 1/4: the interval shrinks as 1/sqrt(sequences)


def test_the_same_seed_gives_the_same_intervals_and_another_seed_others():
    rng = np.random.default_rng(3)
    frames = rng.integers(1, 10, 12)
    video, frame = sums(frames, rng.uniform(size=12)), sums(frames, rng.uniform(size=12))
    first = bootstrap_intervals(frames, video, frame, 300, seed=5)
    assert bootstrap_intervals(frames, video, frame, 300, seed=5) == first
    assert bootstrap_intervals(frames, video, frame, 300, seed=6) != first


def test_a_group_without_frames_is_none_and_resamples_without_its_frames_are_left_out():
    assert bootstrap_intervals(np.zeros(3), np.zeros(3), np.zeros(3), 100, seed=0) is None
    out = bootstrap_intervals(np.array([0, 0, 4]), np.array([0, 0, 2.0]), np.zeros(3), 400, seed=0)
    assert out["video"] == {"value": 0.5, "ci": [0.5, 0.5]}
    # P(no draw of the third sequence in 3) = 8/27: about 120 of the 400 resamples hold none of its frames
    assert 200 < out["resamples_with_frames"] < 360


TINY = ["--size", "64", "--sequences", "4", "--frames", "4", "--bootstrap", "20", "--workers", "1", "--cpu"]
LOWERED = ["--min-sequences", "1", "--min-hidden", "0", "--min-frames-per-kind", "0"]


def test_bench_memory_learning_scores_both_modes_per_group_the_same_for_the_same_seed(capsys, weights):
    argv = ["bench", "memory-learning", "--weights", str(weights), *TINY, *LOWERED]
    assert main(argv) == 0
    captured = capsys.readouterr()
    report = json.loads(captured.out)
    groups = report["groups"]
    assert list(groups) == list(GROUPS)
    assert report["data"]["sequences"] == 4 and groups["all"]["frames"] == report["data"]["frames"] == 16
    assert any(g["frames"] == 0 for g in groups.values())  # 4-frame sequences hold no hiding episode
    for name, group in groups.items():
        if group["frames"] == 0:
            assert group["dice"] is None and group["presence_accuracy"] is None, name
            continue
        for figure in ("dice", "presence_accuracy"):
            for mode in ("video", "frame"):
                value, (lo, hi) = group[figure][mode]["value"], group[figure][mode]["ci"]
                assert 0 <= lo <= hi <= 1 and 0 <= value <= 1, (name, figure, mode)
    dice = groups["all"]["dice"]
    assert dice["video"]["value"] != dice["frame"]["value"]  # memory changes a random model's masks
    assert dice["video_minus_frame"]["value"] == pytest.approx(
        dice["video"]["value"] - dice["frame"]["value"], abs=2e-4
    )
    assert "video - frame [95% CI]" in captured.err and "\nall " in captured.err
    assert main(argv) == 0
    assert json.loads(capsys.readouterr().out)["groups"] == groups


def test_bench_memory_learning_refuses_bad_input_in_one_line(capsys, tmp_path, weights):
    bench = ["bench", "memory-learning", "--cpu"]
    assert main([*bench, "--weights", str(tmp_path / "nope.pt")]) == 1
    assert (
        capsys.readouterr().err.strip() == f"autosam2 bench: --weights {tmp_path / 'nope.pt'}: no such file"
    )
    assert main([*bench, "--weights", str(tmp_path)]) == 1
    assert capsys.readouterr().err.strip() == f"autosam2 bench: --weights {tmp_path}: not a file"
    assert main([*bench, "--weights", str(weights), "--size", "16"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("autosam2 bench: --sequences/--frames/--size: synthetic dataset needs size >= 32")
    assert "\n" not in err
    assert main([*bench, "--weights", str(weights), "--sequences", "4"]) == 1
    assert capsys.readouterr().err.strip() == (
        "autosam2 bench: --sequences 4: fewer than --min-sequences 16 (more sequences, or lower --min-sequences)"
    )
    assert main([*bench, "--weights", str(weights), "--data", str(tmp_path)]) == 1
    err = capsys.readouterr().err.strip()
    assert (
        err.startswith(f"autosam2 bench: {tmp_path / 'synth.json'}: no per-frame events") and "\n" not in err
    )
    assert main([*bench, "--weights", str(weights), *TINY, "--min-sequences", "1"]) == 1
    err = capsys.readouterr().err.strip()
    assert (
        "--seed 0's hard split (test: 4 sequences, 16 frames): 0 hidden frames, fewer than --min-hidden 300"
        in err
    )
    assert "\n" not in err
    assert main([*bench, "--weights", str(weights), *TINY, *LOWERED[:4], "--min-frames-per-kind", "1"]) == 1
    err = capsys.readouterr().err.strip()
    assert "fewer frames than --min-frames-per-kind 1 of haze 0, blur 0" in err and "\n" not in err


def test_bench_memory_learning_scores_a_split_autosam2_synth_wrote(capsys, tmp_path, weights):
    from autosam2.data.synthetic import SynthSpec, write_dataset

    root = tmp_path / "hard"
    write_dataset(root, SynthSpec(train_sequences=1, valid_sequences=3, frames=12, size=64, hard=True))
    argv = ["bench", "memory-learning", "--weights", str(weights), "--data", str(root), "--split", "valid"]
    assert main([*argv, "--bootstrap", "20", "--workers", "1", "--cpu", *LOWERED]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["data"]["root"] == str(root) and report["data"]["made"] is None
    assert report["data"]["sequences"] == 3 and report["groups"]["all"]["frames"] == 36
    assert report["data"]["hidden_frames"] == report["groups"]["hidden"]["frames"] > 0
    assert (root / "synth.json").exists() and (root / "valid").is_dir()  # the user's root stays
