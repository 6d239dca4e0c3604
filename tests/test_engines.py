"""The engines' own rules: gradient accumulation, parameter groups, the learning-rate schedule."""

from __future__ import annotations

import json

import pytest

from autosam2.config import load_config
from autosam2.engine.engines import DDPEngine, LRSchedule, param_groups
from tests.helpers import INFO, TinyModel, batch


def test_gradient_accumulation_steps_the_optimizer_every_k_batches(tmp_path):
    model = TinyModel()
    cfg = load_config(None, ["optim.grad_accum=3", "optim.warmup_steps=0"])
    engine = DDPEngine(model, cfg.optim, 10, INFO)
    results = []
    for _ in range(6):
        out = engine.forward(batch().images_TBCHW.float(), False)
        engine.backward(out.mask_logits_TBHW.mean())
        results.append(engine.step())
    assert [r is None for r in results] == [True, True, False, True, True, False]
    assert engine.scheduler.last_epoch == 2


def test_no_weight_decay_on_norms_biases_and_embeddings():
    model = TinyModel()
    groups = param_groups(model, 0.05)
    decayed = {id(p) for p in groups[0]["params"]}
    assert groups[0]["weight_decay"] == 0.05 and groups[1]["weight_decay"] == 0.0
    assert decayed == {id(model.conv.weight)}


def test_warmup_then_cosine():
    cfg = load_config(None, ["optim.warmup_steps=10", "optim.min_lr_ratio=0.1"])
    f = LRSchedule.of(cfg.optim, 110)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(10) == pytest.approx(1.0) and f(60) == pytest.approx(0.55) and f(110) == pytest.approx(0.1)


def test_a_stretched_schedule_goes_on_from_its_step_without_a_jump_to_its_new_end():
    schedule = LRSchedule(warmup=10, total=110, min_ratio=0.1)
    for at in (5, 10, 60, 110):
        longer = schedule.stretched(210, at)
        assert longer(at) == pytest.approx(schedule(at))  # no jump where it was stretched
        after = [longer(step) for step in range(max(at, 10), 211)]
        assert all(b <= a for a, b in zip(after, after[1:], strict=False))
        assert longer(210) == pytest.approx(0.1)
    # halfway along what was left of the cosine at step 60: where the old one was at step 85
    assert schedule.stretched(210, 60)(135) == pytest.approx(schedule(85))


@pytest.mark.parametrize(
    "overrides,unused",
    [
        (["model.freeze.memory=false"], False),
        (["model.freeze.memory=false", "model.clip_mode=frame"], True),
        (["model.freeze.memory=false", "data.train=[a, b]"], True),  # a mix's one-frame clips
        (["data.train=[a, b]"], False),  # frozen memory: nothing to leave unused
    ],
)
def test_ddp_is_told_of_parameters_a_step_may_leave_unused(monkeypatch, overrides, unused):
    import torch

    from autosam2.engine.dist import single_process_group
    from autosam2.engine.engines import build_engine

    monkeypatch.delenv("RANK", raising=False)
    cfg = load_config(None, ["train.device=cpu", "train.precision=fp32", *overrides])
    with single_process_group(torch.device("cpu")) as info:
        engine = build_engine(TinyModel(), cfg, 4, info)
        assert engine.wrapped.find_unused_parameters is unused


@pytest.mark.parametrize(
    ("overrides", "hook", "bucket_bytes"),
    [
        ([], None, 25 * 2**20),  # torch's own: no hook, 25 MiB buckets
        (["train.grad_compression=bf16", "train.bucket_mb=5"], "bf16_compress_hook", 5 * 2**20),
    ],
)
def test_ddp_sends_gradients_in_bf16_through_torchs_hook_in_buckets_of_bucket_mb(
    monkeypatch, overrides, hook, bucket_bytes
):
    import torch

    from autosam2.engine.dist import single_process_group
    from autosam2.engine.engines import build_engine

    monkeypatch.delenv("RANK", raising=False)
    cfg = load_config(None, ["train.device=cpu", "train.precision=fp32", *overrides])
    with single_process_group(torch.device("cpu")) as info:
        engine = build_engine(TinyModel(), cfg, 4, info)
        assert engine.wrapped._get_ddp_logging_data().get("comm_hook") == hook
        assert engine.wrapped.bucket_bytes_cap == bucket_bytes


def test_deepspeed_gets_the_comm_settings_merged_into_its_config_and_the_json_stays_as_shipped():
    from autosam2.engine.engines import read_deepspeed_config, with_comm_settings

    shipped = read_deepspeed_config("zero2")
    before = json.dumps(shipped, sort_keys=True)
    assert with_comm_settings(shipped, load_config(None, []).train) == shipped  # defaults: the JSON's own
    train = load_config(
        None,
        [
            "train.engine=deepspeed",
            "train.grad_compression=bf16",
            "train.bucket_mb=8",
            "train.overlap_comm=false",
        ],
    ).train
    merged = with_comm_settings(shipped, train)
    zero = merged["zero_optimization"]
    assert merged["communication_data_type"] == "bf16" and zero["overlap_comm"] is False
    assert zero["reduce_bucket_size"] == zero["allgather_bucket_size"] == 8 * 2**20 // 4  # fp32 elements
    assert zero["stage"] == 2 and json.dumps(shipped, sort_keys=True) == before
