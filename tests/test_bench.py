"""`autosam2 bench ...` prints one JSON object whose ratios are those of its own figures."""

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from autosam2.bench.memory import peak_bytes
from autosam2.cli import main
from autosam2.config import PromptEncoderConfig
from autosam2.model.sam2_builder import build_model

REPO = Path(__file__).resolve().parents[1]


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
        "--resume-samples",
        "40",
    ]
    assert main(args) == 0
    report = json.loads(capsys.readouterr().out)
    fps = report["frames_per_s"]
    assert set(fps) == {
        "a_shard_stream",
        "a_resampled_stream",
        "b_folder_reader",
        "c_jpeg_decode",
        "a_shard_stream_with_cpu_augment",
    }
    assert all(v > 0 for v in fps.values())
    assert abs(report["ratios"]["a_over_c"] - fps["a_shard_stream"] / fps["c_jpeg_decode"]) < 2e-3
    assert abs(report["ratios"]["a_over_b"] - fps["a_shard_stream"] / fps["b_folder_reader"]) < 2e-3
    assert report["target"]["met"] == (fps["a_shard_stream"] / fps["c_jpeg_decode"] >= 0.9)
    assert report["config"]["workers"] == 0 and report["config"]["image_size"] == 64
    for order in ("global_order", "resample_order"):
        resume = report["resume"][order]
        assert resume["epoch_samples"] == 40 and resume["first_batch_s_at_90pct"] > 0
        ratio = resume["first_batch_s_at_90pct"] / resume["first_batch_s_at_10pct"]
        assert abs(resume["ratio_90_over_10"] - ratio) < 0.05


def test_bench_train_compares_the_trainer_with_a_bare_step(capsys):
    assert (
        main(["bench", "train", "--image-size", "128", "--clip-len", "2", "--steps", "3", "--device", "cpu"])
        == 0
    )
    captured = capsys.readouterr()
    report = json.loads(captured.out)  # the figures alone: the trainer's step lines go to stderr
    assert "step 3/3" in captured.err
    steps = report["step_s"]
    assert steps["bare_forward_backward"] > 0 and steps["full_trainer"] > 0
    assert (
        abs(report["ratio_trainer_over_bare"] - steps["full_trainer"] / steps["bare_forward_backward"]) < 0.01
    )
    assert report["target"]["met"] == (report["ratio_trainer_over_bare"] <= 1.10)
    cache = report["feature_cache"]
    through, cached = cache["step_s"]["through_encoder"], cache["step_s"]["cached"]
    assert 0 < cached < through  # hiera-t's encoder is most of a CPU step
    assert abs(cache["ratio_encoder_over_cached"] - through / cached) < 0.01


def test_bench_features_reports_bytes_and_hit_rates_per_storage_and_tier(capsys, tmp_path):
    args = [
        "bench",
        "features",
        "--image-size",
        "64",
        "--frames",
        "3",
        "--passes",
        "2",
        "--memory-frames",
        "1",
    ]
    assert main([*args, "--dir", str(tmp_path), "--device", "cpu"]) == 0
    report = json.loads(capsys.readouterr().out)
    fp32, bf16, disk32, disk16 = (report["settings"][k] for k in ("fp32", "bf16", "fp32+disk", "bf16+disk"))
    assert report["ratio_bytes_fp32_over_bf16"] == 2.0 == fp32["bytes_per_frame"] / bf16["bytes_per_frame"]
    # memory holds one fp32 frame or two bf16 ones; the disk tier takes the rest
    assert (fp32["frames_in_memory"], bf16["frames_in_memory"]) == (1, 2)
    assert (fp32["hit_rate"], bf16["hit_rate"], disk32["hit_rate"]) == (0.3333, 0.6667, 1.0)
    assert (disk32["frames_on_disk"], disk16["frames_on_disk"], disk32["disk_hit_rate"]) == (2, 1, 0.6667)
    assert disk32["disk_bytes"] > 2 * fp32["bytes_per_frame"] and disk32["lookup_ms"]["disk"] > 0
    assert (
        fp32["max_abs_diff"] == disk32["max_abs_diff"] == 0.0 < bf16["max_abs_diff"] == disk16["max_abs_diff"]
    )
    assert list(tmp_path.iterdir()) == []  # the disk tier's folders are gone


def test_bench_infer_reports_streaming_against_the_encoder_and_evaluate_against_streaming(capsys):
    args = ["bench", "infer", "--frames", "5", "--encode-batch", "2", "--rounds", "1", "--device", "cpu"]
    assert main(args) == 0
    report = json.loads(capsys.readouterr().out)
    fps = report["fps"]
    assert fps["streaming_inference"] > 0 and fps["bare_image_encoder"] > 0 and fps["evaluate_pipeline"] > 0
    assert (
        abs(report["ratio_streaming_over_encoder"] - fps["streaming_inference"] / fps["bare_image_encoder"])
        < 0.02
    )
    ratio = fps["evaluate_pipeline"] / fps["streaming_inference"]
    assert abs(report["ratio_evaluate_over_streaming"] - ratio) < 0.02
    assert report["target"]["met"] == (report["ratio_evaluate_over_streaming"] >= 0.9)
    assert report["config"]["encode_batch"] == 2 and report["config"]["frames"] == 5


def test_bench_longvideo_measures_each_command_in_its_own_process(capsys, tmp_path):
    args = ["bench", "longvideo", "--lengths", "3,9", "--size", "64", "--image-size", "64", "--cpu"]
    assert main([*args, "--commands", "evaluate,predict", "--keep", str(tmp_path)]) == 0
    report = json.loads(capsys.readouterr().out)
    table = report["peak_rss"]
    assert set(table) == {"evaluate", "predict"} and all(set(t) == {"3", "9"} for t in table.values())
    for command, rows in table.items():
        rss = [r["peak_rss_mb"] for r in rows.values()]
        assert min(rss) > 50  # a process that imported torch, not the bench's own child bookkeeping
        assert abs(report["ratio_highest_over_lowest"][command] - max(rss) / min(rss)) < 2e-3
    # the commands really ran over every frame: their outputs are there
    assert len(list((tmp_path / "evaluate-9" / "masks" / "long9").glob("*.png"))) == 9
    assert len(list((tmp_path / "predict-3" / "masks").rglob("*.png"))) == 3


def test_peak_bytes_agrees_with_torchs_memtracker():
    # MemTracker counts op outputs; on ops without workspaces (linear layers) the allocator's peak is theirs
    from torch.distributed._tools.mem_tracker import MemTracker

    def fresh():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(64, 256), nn.GELU(), nn.Linear(256, 32))
        return model, torch.optim.AdamW(model.parameters())

    def steps(model, optimizer, after_step=lambda: None):
        for _ in range(2):
            model(torch.randn(128, 64)).square().mean().backward()
            optimizer.step()
            optimizer.zero_grad()
            after_step()

    model, optimizer = fresh()
    tracker = MemTracker()
    tracker.track_external(model, optimizer)
    with tracker:  # its module statistics are per iteration; the peak is kept
        steps(model, optimizer, tracker.reset_mod_stats)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    expected = tracker.get_tracker_snapshot("peak")[torch.device("cpu")]["Total"] - weights
    model, optimizer = fresh()
    assert expected > 0 and peak_bytes(lambda: steps(model, optimizer), torch.device("cpu")) == expected


def test_peak_bytes_counts_what_lives_at_once_and_not_what_came_before():
    before = torch.empty(1 << 20)  # 4 MiB, made before: never counted, not even when freed inside

    def run():
        nonlocal before
        a = torch.empty(1 << 18)  # 1 MiB
        view = a[10:]
        del a, view
        b = torch.empty(1 << 19)  # 2 MiB
        doubled = before.clone()  # 4 MiB
        before = None
        del b, doubled

    assert peak_bytes(run, torch.device("cpu")) == (1 << 21) + (1 << 22)


def test_bench_memory_reports_a_configs_training_step(capsys, tmp_path):
    args = ["bench", "memory", "--ranks", "4", "--device", "cpu", "model.image_size=128", "data.clip_len=2"]
    assert main(args) == 0
    report = json.loads(capsys.readouterr().out)
    peak, n = report["peak_MiB"], report["parameters"]
    model = build_model("hiera_t", 128)
    model.attach_prompt_encoder(PromptEncoderConfig())
    mib = 2**20
    weights = sum(t.numel() * 4 for t in [*model.parameters(), *model.buffers()])
    assert peak["weights"] == round(weights / mib, 1)
    assert n["trainable"] + n["frozen"] == sum(p.numel() for p in model.parameters())
    assert peak["gradients"] == round(4 * n["trainable"] / mib, 1)
    trainable_tensors = sum(1 for name, _ in model.named_parameters() if name.startswith("prompt_encoder."))
    # AdamW: two fp32 moments per parameter and one scalar step per tensor
    assert peak["optimizer_states"] == round((8 * n["trainable"] + 4 * trainable_tensors) / mib, 1)
    assert peak["activations_and_temporaries"] > 0
    assert report["engine_extra_MiB"] == {"ddp_gradient_buckets": peak["gradients"]}
    assert abs(report["estimate_per_gpu_GiB"] - (peak["total"] + peak["gradients"]) / 1024) <= 0.01

    for stage, gradient_ranks in ((1, 1), (2, 4)):  # ZeRO-1 shards Adam states, ZeRO-2 gradients too
        ds = ["train.engine=deepspeed", f"train.deepspeed_config=zero{stage}"]
        assert main([*args, *ds]) == 0
        extra = json.loads(capsys.readouterr().out)["engine_extra_MiB"]
        assert extra["zero_adam_states"] == round(8 * n["trainable"] / 4 / mib, 1)
        assert extra["zero_reduced_gradients"] == round(4 * n["trainable"] / gradient_ranks / mib, 1)


def test_bench_memory_compares_peaks_with_and_without_activation_checkpointing(capsys):
    whole = [
        "model.freeze.image_encoder=false",
        "model.freeze.memory=false",
        "model.freeze.mask_decoder=false",
    ]
    # 256 px: the activations outgrow the optimizer step, whose peak would hide them at smaller sizes
    args = ["bench", "memory", "--cpu", "--compare-checkpointing", "model.image_size=256", "data.clip_len=2"]
    assert main([*args, *whole]) == 0
    report = json.loads(capsys.readouterr().out)
    figures = report["checkpointing"]
    assert report["config"]["activation_checkpointing"] is False  # the config's own setting first
    assert figures["without"]["total_MiB"] == report["peak_MiB"]["total"]
    with_, without = (figures[k]["activations_and_temporaries_MiB"] for k in ("with", "without"))
    assert 0 < with_ < without and figures["with"]["total_MiB"] < figures["without"]["total_MiB"]
    assert figures["activation_ratio"] == round(with_ / without, 3)


def test_bench_memory_names_a_bad_config_file_in_one_line(capsys, tmp_path):
    assert main(["bench", "memory", "--config", str(tmp_path / "nope.yaml")]) == 1
    assert capsys.readouterr().err.strip() == (
        f"autosam2 bench: {tmp_path / 'nope.yaml'}: no such file, nor a shipped run config (shipped: "
        "cpu_demo, cpu_demo_video, cpu_memory, gpu_hiera_bplus_1024_deepspeed, gpu_hiera_bplus_1024_full, gpu_hiera_t_1024)"
    )
    broken = tmp_path / "zero.json"
    broken.write_text("{ not json")
    args = ["bench", "memory", "train.engine=deepspeed", f"train.deepspeed_config={broken}"]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert (
        err.startswith(f"autosam2 bench: {broken}: cannot read the DeepSpeed config")
        and "Traceback" not in err
    )


def test_bench_checkpoint_times_both_ways_of_saving(capsys, tmp_path):
    args = [
        "bench",
        "checkpoint",
        "--sizes",
        "hiera_t_decoder_prompt",
        "--repeats",
        "1",
        "--image-size",
        "64",
    ]
    assert main([*args, "--device", "cpu", "--out", str(tmp_path)]) == 0
    report = json.loads(capsys.readouterr().out)
    size = report["sizes"]["hiera_t_decoder_prompt"]
    assert size["sync"]["stall_s"] > 0 and size["async"]["stall_s"] > 0
    assert size["ratio_sync_stall_over_async_stall"] == round(
        size["sync"]["stall_s"] / size["async"]["stall_s"], 2
    )
    # both ways wrote the same state: a full checkpoint (AdamW's moments included) of the trainable set
    assert size["sync"]["MB"] == size["async"]["MB"] > 3 * 4 * size["trainable_parameters"] / 1e6
    kept = sorted(p.name for p in (tmp_path / "hiera_t_decoder_prompt" / "checkpoints").glob("step_*"))
    assert kept == ["step_00000001", "step_00000002"]


def test_bench_tracking_stalls_nothing_and_delivers_everything(capsys):
    args = [
        "bench",
        "tracking",
        "--phase-s",
        "2",
        "--step-s",
        "0.02",
        "--artifact-every",
        "10",
        "--max-backoff-s",
        "1",
    ]
    assert main(args) == 0
    report = json.loads(capsys.readouterr().out)
    assert set(report["step_stall_s"]) == {"up", "hung", "up_again", "dead", "back"}
    assert report["longest_step_stall_s"] == max(p["longest_s"] for p in report["step_stall_s"].values())
    delivered = report["delivered"]
    assert (
        delivered["every_step_and_artifact_once"] and delivered["steps_in_run"] == delivered["steps_logged"]
    )
    assert delivered["artifacts_in_run"] == delivered["artifacts_logged"] > 0
    assert report["target"]["met"] == (report["longest_step_stall_s"] <= 1.0)


def test_bench_comm_refuses_more_ranks_than_the_host_has_before_starting_any(capsys, monkeypatch):
    """One process per rank: past the host's cores (CPU) or GPUs, one line and no rank started."""
    import os

    from autosam2.bench import comm

    cores = len(os.sched_getaffinity(0))
    started = []
    monkeypatch.setattr(torch.multiprocessing, "start_processes", lambda *a, **k: started.append(a))
    assert main(["bench", "comm", "--ranks", str(cores + 1), "--cpu"]) == 1
    assert capsys.readouterr().err == (
        f"autosam2 bench: --ranks {cores + 1}: this host has {cores} cores this process may run on\n"
    )
    assert not started
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)  # no GPU here: the count is what is checked
    comm._check_ranks(2, "cuda")
    with pytest.raises(ValueError, match=r"^--ranks 3: this host has 2 GPUs \(one per rank\)$"):
        comm._check_ranks(3, "cuda")


@pytest.mark.slow
@pytest.mark.parametrize(("engine", "hook"), [("ddp", "bf16_compress_hook"), ("deepspeed", None)])
def test_bench_comm_halves_the_gradient_bytes_and_the_weights_stay_close(capfd, engine, hook):
    """Two ranks (gloo), two steps each way: bf16 communication hands the reductions half the bytes,
    moves the weights (it is not ignored) and keeps them within a small part of what the steps moved.
    stdout, the ranks' included, holds the figures alone."""
    assert main(["bench", "comm", "--ranks", "2", "--steps", "2", "--cpu", f"train.engine={engine}"]) == 0
    report = json.loads(capfd.readouterr().out)
    sent = report["gradient_bytes_per_step"]
    assert sent["none"] >= 4 * report["trainable_parameters"]  # every fp32 gradient, once per step
    assert report["ratio"] == round(sent["bf16"] / sent["none"], 4) and 0.49 <= report["ratio"] <= 0.51
    assert report["comm_hook"]["bf16"] == hook
    weights = report["weights"]
    assert 0 < weights["max_abs_difference"] <= 2 * weights["max_abs_update"]  # Adam's step bounds it
    assert 0 < weights["update_difference_norm_ratio"] < 0.05


@pytest.mark.parametrize("flag", ["--memory-frames=-1", "--frames=0", "--passes=0"])
def test_bench_features_refuses_a_negative_budget_or_no_frames_in_one_line(capsys, flag):
    from autosam2.cli import main

    with pytest.raises(SystemExit) as refused:
        main(["bench", "features", "--cpu", flag])
    assert refused.value.code == 2
    assert (
        capsys.readouterr()
        .err.strip()
        .splitlines()[-1]
        .startswith("autosam2 bench features: error: argument")
    )


@pytest.mark.parametrize(
    "kind",
    [
        ["features", "--frames", "1", "--passes", "1"],
        ["infer", "--frames", "2", "--rounds", "1"],
        ["longvideo", "--lengths", "2"],
    ],
)
def test_bench_refuses_an_image_size_the_model_cannot_take_in_one_line(capsys, kind):
    assert main(["bench", *kind, "--cpu", "--image-size", "63"]) == 1
    assert capsys.readouterr().err.strip() == (
        "autosam2 bench: invalid config: model.image_size must be a multiple of 32 and >= 64, got 63"
    )
