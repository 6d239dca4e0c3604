"""`autosam2 bench data` prints one JSON object whose ratios are those of its own figures."""

import json

from autosam2.cli import main


def test_bench_data_prints_figures_and_ratios(capsys):
    args = ["bench", "data", "--size", "64", "--image-size", "64", "--sequences", "2", "--frames", "8"]
    args += [
        "--frames-per-sample",
        "8",
        "--clip-len",
        "4",
        "--batch-size",
        "1",
        "--workers",
        "0",
        "--batches",
        "3",
        "--rounds",
        "1",
    ]
    assert main(args) == 0
    report = json.loads(capsys.readouterr().out)
    fps = report["frames_per_s"]
    assert set(fps) == {
        "a_shard_stream",
        "b_folder_reader",
        "c_jpeg_decode",
        "a_shard_stream_with_cpu_augment",
    }
    assert all(v > 0 for v in fps.values())
    assert abs(report["ratios"]["a_over_c"] - fps["a_shard_stream"] / fps["c_jpeg_decode"]) < 2e-3
    assert abs(report["ratios"]["a_over_b"] - fps["a_shard_stream"] / fps["b_folder_reader"]) < 2e-3
    assert report["target"]["met"] == (fps["a_shard_stream"] / fps["c_jpeg_decode"] >= 0.9)
    assert report["config"]["workers"] == 0 and report["config"]["image_size"] == 64


def test_bench_train_compares_the_trainer_with_a_bare_step(capsys):
    assert main(["bench", "train", "--clip-len", "2", "--steps", "3", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    report = json.loads(out[out.index("\n{") + 1 :])  # the trainer prints its step lines first
    steps = report["step_s"]
    assert steps["bare_forward_backward"] > 0 and steps["full_trainer"] > 0
    assert (
        abs(report["ratio_trainer_over_bare"] - steps["full_trainer"] / steps["bare_forward_backward"]) < 0.01
    )
    assert report["target"]["met"] == (report["ratio_trainer_over_bare"] <= 1.10)


def test_bench_infer_reports_streaming_against_the_encoder(capsys):
    assert main(["bench", "infer", "--frames", "3", "--rounds", "1", "--device", "cpu"]) == 0
    report = json.loads(capsys.readouterr().out)
    fps = report["fps"]
    assert fps["streaming_inference"] > 0 and fps["bare_image_encoder"] > 0
    assert (
        abs(report["ratio_streaming_over_encoder"] - fps["streaming_inference"] / fps["bare_image_encoder"])
        < 0.02
    )
