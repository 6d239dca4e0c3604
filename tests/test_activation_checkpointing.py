"""Training the whole model: activation checkpointing changes no gradient (DDP and DeepSpeed), layer-wise
lr decay gives each image-encoder layer its lr, and the config that trains all of hiera-b+ holds."""

from __future__ import annotations

import pytest
import torch

from autosam2.config import ConfigError, load_config
from autosam2.engine.dist import single_process_group
from autosam2.engine.engines import DDPEngine, build_engine
from autosam2.model.autosam2 import Recomputed
from autosam2.model.sam2_builder import build_autosam2
from tests.helpers import INFO

S = 64
WHOLE = [
    f"model.image_size={S}",
    "data.clip_len=2",
    "model.freeze.image_encoder=false",
    "model.freeze.mask_decoder=false",
    "model.freeze.memory=false",
    "train.precision=fp32",
    "optim.warmup_steps=0",
]


def _clip() -> torch.Tensor:
    return torch.randn(2, 1, 3, S, S, generator=torch.Generator().manual_seed(1))


def _loss(out) -> torch.Tensor:
    return out.mask_logits_TBHW.sigmoid().mean() + out.iou_TB.mean() + out.object_logits_TB.mean()


def _gradients(
    info, checkpointing: bool, engine_kind: str, *extra: str
) -> tuple[dict[str, torch.Tensor], list[float], int]:
    """One forward and backward of the whole hiera-t model through the engine, in the process group of
    one that `info` describes: the gradients (DDP) or the weights after one step and the gradients' norm
    (DeepSpeed keeps its reduced gradients in its own partitions), each group's lr, and how often trunk block 0's attention
    ran."""
    cfg = load_config(
        None,
        [*WHOLE, f"model.activation_checkpointing={checkpointing}", f"train.engine={engine_kind}", *extra],
    )
    torch.manual_seed(0)
    model = build_autosam2(cfg.model).train()
    calls = []
    model.image_encoder.trunk.blocks[0].attn.register_forward_hook(lambda *_: calls.append(1))
    engine = build_engine(model, cfg, 4, info)
    torch.manual_seed(2)  # dropout and drop-path draw the same in both runs
    engine.backward(_loss(engine.forward(_clip(), per_frame=False)))
    if engine_kind == "ddp":
        found = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    else:  # the weights after the step, and the norm of the gradients it took
        norm = engine.step()
        found = {n: p.detach().clone() for n, p in model.named_parameters()}
        found["gradient norm"] = torch.tensor(norm, dtype=torch.float64)
    return found, [group["lr"] for group in engine.optimizer.param_groups], len(calls)


def test_checkpointing_wraps_the_trunk_blocks_memory_attention_and_memory_encoder():
    cfg = load_config(None, [*WHOLE, "model.activation_checkpointing=true"])
    model = build_autosam2(cfg.model)
    names = model.checkpointed_modules()
    assert len(names) == len(model.image_encoder.trunk.blocks) + len(model.memory_attention.layers) + 1
    assert all(isinstance(model.get_submodule(n).forward, Recomputed) for n in names)
    assert model.checkpoint_activations() == names  # a second call wraps nothing twice
    assert not isinstance(model.get_submodule(names[0]).forward.forward, Recomputed)
    plain = build_autosam2(load_config(None, WHOLE).model)
    assert set(plain.state_dict()) == set(model.state_dict())  # the same weights and keys
    assert not isinstance(plain.memory_encoder.forward, Recomputed)  # off by default


def test_checkpointing_leaves_the_gradients_unchanged_under_ddp(monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    with single_process_group(torch.device("cpu")) as info:
        plain, _, plain_calls = _gradients(info, False, "ddp")
        recomputed, _, calls = _gradients(info, True, "ddp")
    assert calls == 2 * plain_calls  # the block ran again in the backward pass
    assert plain.keys() == recomputed.keys() and any(n.startswith("image_encoder.trunk") for n in plain)
    # the recomputation runs the same fp32 operations on the same values: equal to the bit
    for name, grad in plain.items():
        assert torch.equal(grad, recomputed[name]), name


@pytest.mark.slow
def test_checkpointing_leaves_a_deepspeed_step_unchanged_and_layer_decay_reaches_its_groups(monkeypatch):
    pytest.importorskip("deepspeed")
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    decay = ("optim.layer_decay=0.5", "optim.lr=0.001")
    with single_process_group(torch.device("cpu")) as info:  # one group: DeepSpeed keeps its first
        plain, _, plain_calls = _gradients(info, False, "deepspeed", *decay)
        stepped, lrs, calls = _gradients(info, True, "deepspeed", *decay)
    assert calls == 2 * plain_calls
    n = 12  # hiera-t's trunk blocks: each its own lr, the patch embedding the lowest
    # after the step, the schedule's factor times each group's scale of the first group's lr
    assert {round(lr / lrs[0], 12) for lr in lrs} == {round(0.5**k, 12) for k in range(n + 2)}
    assert min(lrs) == pytest.approx(lrs[0] * 0.5 ** (n + 1), rel=1e-12)
    for name, weight in plain.items():
        assert torch.equal(weight, stepped[name]), name


def test_layer_decay_gives_each_trunk_layer_its_lr():
    cfg = load_config(None, [*WHOLE, "optim.layer_decay=0.5", "optim.lr=0.001"])
    model = build_autosam2(cfg.model)
    engine = DDPEngine(model, cfg.optim, 10, INFO)
    lr_of = {id(p): g["lr"] for g in engine.optimizer.param_groups for p in g["params"]}
    n = len(model.image_encoder.trunk.blocks)
    assert engine.lr == 0.001  # the first group learns at the full lr
    trained = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    assert len(lr_of) == len(trained)
    for name, p in trained:
        if name.startswith("image_encoder.trunk.blocks."):
            expected = 0.001 * 0.5 ** (n - int(name.split(".")[3]))
        elif name.startswith("image_encoder.trunk.patch_embed."):
            expected = 0.001 * 0.5 ** (n + 1)  # the deepest layer
        else:  # the trunk's position embeddings, the neck and the rest of SAM2
            expected = 0.001
        assert lr_of[id(p)] == pytest.approx(expected, rel=1e-12), name
    # a retuned run keeps the scales, at its new peak
    retuned = load_config(None, [*WHOLE, "optim.layer_decay=0.5", "optim.lr=0.002"])
    engine.retune(retuned.optim, engine.scheduler.lr_lambdas[0])
    block = model.image_encoder.trunk.blocks[n - 1].mlp.layers[0].weight
    retuned_lr = {id(p): g["lr"] for g in engine.optimizer.param_groups for p in g["params"]}
    assert retuned_lr[id(block)] == pytest.approx(0.002 * 0.5) and engine.lr == pytest.approx(0.002)
    off = DDPEngine(build_autosam2(load_config(None, WHOLE).model), cfg.optim.__class__(), 10, INFO)
    assert len(off.optimizer.param_groups) == 2  # decay 1: the two weight-decay groups only


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["optim.layer_decay=0"], "optim.layer_decay must be in (0, 1] (1: off), got 0.0"),
        (["optim.layer_decay=1.5"], "optim.layer_decay must be in (0, 1] (1: off), got 1.5"),
        (
            ["optim.layer_decay=0.9"],
            "optim.layer_decay=0.9 decays the image encoder's lr: it needs model.freeze.image_encoder=false",
        ),
        (
            ["model.activation_checkpointing=maybe"],
            "model.activation_checkpointing: Value 'maybe' is not a valid bool (type str)",
        ),
    ],
)
def test_bad_values_are_one_line(overrides, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_the_whole_model_config_trains_all_of_hiera_bplus_with_checkpointing_and_layer_decay():
    cfg = load_config("gpu_hiera_bplus_1024_full")
    assert (cfg.model.variant, cfg.model.image_size, cfg.data.clip_len) == ("hiera_b+", 1024, 8)
    assert not any(vars(cfg.model.freeze).values())
    assert cfg.model.activation_checkpointing and cfg.optim.layer_decay == 0.9
    assert (cfg.train.engine, cfg.train.deepspeed_config, cfg.train.precision) == (
        "deepspeed",
        "zero2",
        "bf16",
    )
    with pytest.raises(ConfigError, match="needs model.freeze.image_encoder=true"):
        load_config("gpu_hiera_bplus_1024_full", ["data.feature_cache=memory", "data.augment.enabled=false"])
