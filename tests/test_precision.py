"""bf16 training: both engines autocast a fp32 model (SAM2 does not run cast to bf16).

On the GPU this is `train.precision=bf16`; here the engines are asked for autocast on the CPU, which
runs the same code path with CPU autocast.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from autosam2.config import load_config
from autosam2.engine.dist import DistInfo
from autosam2.engine.engines import DDPEngine, build_engine
from autosam2.model.sam2_builder import build_autosam2
from tests.helpers import free_port

REPO = Path(__file__).resolve().parents[1]
INFO = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
S = 128


def small_model(cfg):
    torch.manual_seed(0)
    return build_autosam2(cfg.model)


def config(*overrides: str):
    return load_config(
        None, [f"model.image_size={S}", "data.clip_len=2", "model.freeze.mask_decoder=false", *overrides]
    )


def bf16_valued(x: torch.Tensor) -> bool:
    return torch.equal(x, x.bfloat16().to(x.dtype))


def test_sam2_cast_to_bf16_does_not_run_which_is_why_the_engines_autocast():
    cfg = config()
    model = small_model(cfg).to(torch.bfloat16)
    with pytest.raises(RuntimeError, match="should be the same|same dtype"):
        model.forward_clip(torch.randn(2, 1, 3, S, S, dtype=torch.bfloat16))


def test_ddp_engine_autocasts_a_fp32_model():
    cfg = config()
    model = small_model(cfg)
    engine = DDPEngine(model, cfg.optim, 2, INFO, autocast=True)
    out = engine.forward(torch.randn(2, 1, 3, S, S), per_frame=False)
    assert bf16_valued(out.iou_TB)  # the decoder's IoU head ran in bf16 (outputs are stacked in fp32)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    engine.backward(out.mask_logits_TBHW.float().sigmoid().mean())
    assert engine.step() is not None
    after = dict(model.named_parameters())
    assert all(after[n].dtype == torch.float32 for n in before)
    assert any(not torch.equal(before[n], after[n]) for n in before)
    fp32 = build_engine(small_model(cfg), cfg, 2, INFO)
    assert not fp32.autocast  # the CPU default
    assert not bf16_valued(fp32.forward(torch.randn(2, 1, 3, S, S), per_frame=False).iou_TB)


DEEPSPEED_STEP = """
import json, sys, torch, torch.distributed as dist
from autosam2.config import load_config
from autosam2.engine.dist import DistInfo
from autosam2.engine.engines import build_engine
from autosam2.model.sam2_builder import build_autosam2

dist.init_process_group("gloo")
cfg = load_config(None, ["train.engine=deepspeed", "train.deepspeed_config=" + sys.argv[1],
                         "model.image_size=" + sys.argv[2], "data.clip_len=2", "model.freeze.mask_decoder=false"])
torch.manual_seed(0)
S = int(sys.argv[2])
model = build_autosam2(cfg.model)
engine = build_engine(model, cfg, 2, DistInfo(0, 1, 0, torch.device("cpu")), autocast=True)
before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
out = engine.forward(torch.randn(2, 1, 3, S, S), False)
engine.backward(out.mask_logits_TBHW.float().sigmoid().mean())
norm = engine.step()
print(json.dumps({
    "iou_bf16": torch.equal(out.iou_TB, out.iou_TB.bfloat16().float()),
    "params": sorted({str(p.dtype) for p in model.parameters()}),
    "changed": sum(not torch.equal(before[n], p) for n, p in model.named_parameters() if n in before),
    "norm": norm,
}))
"""


@pytest.mark.slow
def test_deepspeed_engine_autocasts_a_fp32_model(tmp_path):
    env = {
        **os.environ,
        "RANK": "0",
        "WORLD_SIZE": "1",
        "LOCAL_RANK": "0",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port()),
        "OMP_NUM_THREADS": "1",
    }
    result = subprocess.run(
        [sys.executable, "-c", DEEPSPEED_STEP, "zero2", str(S)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["iou_bf16"]
    assert report["params"] == ["torch.float32"]
    assert report["changed"] > 0 and report["norm"] > 0


def test_a_deepspeed_config_that_casts_the_model_is_refused(tmp_path):
    path = tmp_path / "zero2_bf16.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 2}, "bf16": {"enabled": True}}))
    cfg = config("train.engine=deepspeed", f"train.deepspeed_config={path}")
    with pytest.raises(ValueError, match=r"zero2_bf16\.json: 'bf16' casts SAM2"):
        build_engine(small_model(cfg), cfg, 2, INFO)
