"""AutoSAM2 on CPU at 256 px, hiera-t, random init: shapes, gradients, learning, streaming, checkpoints."""

from pathlib import Path

import pytest
import torch
import torchvision

from autosam2.config import FreezeConfig, ModelConfig, PromptEncoderConfig
from autosam2.data.synthetic import SynthSpec, generate_sequence
from autosam2.data.transforms import SAM2_MEAN, SAM2_STD
from autosam2.errors import CheckpointError
from autosam2.losses import clip_losses
from autosam2.model.autosam2 import AutoSAM2, CompileWarning
from autosam2.model.prompt_encoder import PromptOutput
from autosam2.model.sam2_builder import (
    build_autosam2,
    build_model,
    load_sam2_checkpoint,
    save_sam2_checkpoint,
)

S = 256


def make_model(
    freeze: FreezeConfig | None = None, prompt: PromptEncoderConfig | None = None, seed: int = 0
) -> AutoSAM2:
    torch.manual_seed(seed)
    cfg = ModelConfig(image_size=S, prompt=prompt or PromptEncoderConfig(), freeze=freeze or FreezeConfig())
    return build_autosam2(cfg)


def synthetic_clip(frames: int = 3, start: int = 4) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    seq = generate_sequence("s", "train", 1, SynthSpec(frames=24, size=S, seed=0))
    rgb = (
        torch.stack(
            [torch.from_numpy(seq.frames[i].copy()).permute(2, 0, 1) for i in range(start, start + frames)]
        ).float()
        / 255
    )
    images = (rgb - torch.tensor(SAM2_MEAN)[:, None, None]) / torch.tensor(SAM2_STD)[:, None, None]
    masks = torch.stack([torch.from_numpy(seq.masks[i]) for i in range(start, start + frames)])
    return images[:, None], masks[:, None], masks[:, None].flatten(2).any(2)


def test_shapes_of_the_clip_forward():
    model = make_model().train()
    out = model.forward_clip(torch.randn(3, 2, 3, S, S))
    assert out.mask_logits_TBHW.shape == (3, 2, S, S)
    assert out.iou_TB.shape == (3, 2) and out.object_logits_TB.shape == (3, 2)
    dense = model.prompt_encoder(
        torch.randn(2, 3, S, S), model.encode_images(torch.randn(2, 3, S, S))["backbone_fpn"]
    )
    assert dense.dense_NChw.shape == (2, 256, S // 16, S // 16) and dense.sparse_NKC is None


def test_sparse_tokens_have_the_prompt_token_shape():
    model = make_model(prompt=PromptEncoderConfig(num_sparse=4))
    images = torch.randn(2, 3, S, S)
    out = model.prompt_encoder(images, model.encode_images(images)["backbone_fpn"])
    assert out.sparse_NKC.shape == (2, 4, 256)
    assert model.forward_clip(images[:, None].expand(2, 1, 3, S, S).contiguous()).mask_logits_TBHW.shape == (
        2,
        1,
        S,
        S,
    )


class ZeroPrompt(torch.nn.Module):
    """An explicit zero residual: SAM2's own prompt-less embedding."""

    def forward(self, images, fpn):
        return PromptOutput(torch.zeros(images.shape[0], 256, S // 16, S // 16), None)


def test_untrained_prompt_is_exactly_sam2s_promptless_input():
    model = make_model().eval()
    images = torch.randn(2, 1, 3, S, S)
    with torch.no_grad():
        learned = model.forward_clip(images)
        head = model.prompt_encoder
        model.prompt_encoder = ZeroPrompt()
        promptless = model.forward_clip(images)
        model.prompt_encoder = head
        torch.nn.init.normal_(head.dense.weight, std=0.05)
        moved = model.forward_clip(images)
    assert torch.equal(learned.mask_logits_TBHW, promptless.mask_logits_TBHW)
    assert not torch.allclose(moved.mask_logits_TBHW, promptless.mask_logits_TBHW)


def _grads(model: torch.nn.Module, prefix: str) -> float:
    return sum(
        float(p.grad.abs().sum())
        for n, p in model.named_parameters()
        if n.startswith(prefix) and p.grad is not None
    )


def test_gradients_reach_the_prompt_encoder_and_not_the_frozen_parts():
    model = make_model().train()
    images, masks, present = synthetic_clip()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    for _ in range(2):  # the zero-initialised last layer passes gradient on from the second step
        optimizer.zero_grad()
        out = model.forward_clip(images)
        clip_losses(out.mask_logits_TBHW, out.iou_TB, out.object_logits_TB, masks, present)[
            "total"
        ].backward()
        optimizer.step()
    assert _grads(model, "prompt_encoder.dense") > 0
    assert _grads(model, "prompt_encoder.fuse") > 0 and _grads(model, "prompt_encoder.lateral") > 0
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trained and all(n.startswith("prompt_encoder.") for n in trained)
    assert all(p.grad is None for n, p in model.named_parameters() if not n.startswith("prompt_encoder."))
    assert (
        not model.image_encoder.training
        and not model.memory_attention.training
        and model.prompt_encoder.training
    )


def test_freezing_is_configurable_per_part():
    model = make_model(FreezeConfig(mask_decoder=False, memory=False)).train()
    images, masks, present = synthetic_clip(frames=2)
    out = model.forward_clip(images)
    clip_losses(out.mask_logits_TBHW, out.iou_TB, out.object_logits_TB, masks, present)["total"].backward()
    assert _grads(model, "sam_mask_decoder.") > 0 and _grads(model, "sam_mask_decoder.conv_s0") > 0
    assert _grads(model, "memory_attention.") > 0
    assert _grads(model, "image_encoder.") == 0 and all(
        p.grad is None for p in model.image_encoder.parameters()
    )
    assert model.sam_mask_decoder.training and not model.image_encoder.training
    # what DDP needs without find_unused_parameters: every trainable parameter takes part in a video step
    assert [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None] == []
    assert not model.no_mem_pos_enc.requires_grad and not model.mask_downsample.weight.requires_grad


@pytest.mark.slow
def test_loss_falls_when_overfitting_one_synthetic_clip():
    model = make_model(FreezeConfig(mask_decoder=False)).train()
    images, masks, present = synthetic_clip()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    history = []
    for _ in range(30):  # at most 30 steps: it stops once both losses are below half their first value
        out = model.forward_clip(images)
        losses = clip_losses(out.mask_logits_TBHW, out.iou_TB, out.object_logits_TB, masks, present)
        optimizer.zero_grad()
        losses["total"].backward()
        optimizer.step()
        history.append({k: float(v.detach()) for k, v in losses.items()})
        if all(history[-1][k] < 0.5 * history[0][k] for k in ("total", "dice")):
            break
    assert history[-1]["total"] < 0.5 * history[0]["total"]
    assert history[-1]["dice"] < 0.5 * history[0]["dice"]


def test_streaming_equals_the_clip_forward_frame_by_frame():
    model = make_model(seed=1).eval()
    torch.nn.init.normal_(model.prompt_encoder.dense.weight, std=0.02)  # a prompt that is not zero
    images = torch.randn(5, 2, 3, S, S)
    with torch.no_grad():
        clip = model.forward_clip(images)
    frames = list(model.stream((images[t] for t in range(5)), num_frames=5))
    assert [f.frame_index for f in frames] == list(range(5))
    for t, frame in enumerate(frames):
        torch.testing.assert_close(frame.mask_logits_BHW, clip.mask_logits_TBHW[t], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(frame.object_logits_B, clip.object_logits_TB[t], rtol=1e-5, atol=1e-5)
        gate = (frame.object_logits_B > 0)[:, None, None]
        torch.testing.assert_close(frame.probs_BHW, torch.sigmoid(frame.mask_logits_BHW) * gate)
    # frames encoded three at a time give the same stream
    batched = list(model.stream((images[t] for t in range(5)), num_frames=5, encode_batch=3))
    for one, three in zip(frames, batched, strict=True):
        torch.testing.assert_close(three.mask_logits_BHW, one.mask_logits_BHW, rtol=1e-4, atol=1e-4)


def test_memory_matters_and_per_frame_mode_uses_none():
    model = make_model(seed=2).eval()
    images = torch.randn(3, 1, 3, S, S)
    with torch.no_grad():
        video = model.forward_clip(images)
        single = model.forward_clip(images, per_frame=True)
    streamed = list(model.stream((images[t] for t in range(3)), per_frame=True))
    assert torch.equal(video.mask_logits_TBHW[0], single.mask_logits_TBHW[0])  # frame 0 conditions both
    assert not torch.allclose(video.mask_logits_TBHW[1:], single.mask_logits_TBHW[1:])
    for t in range(3):
        torch.testing.assert_close(
            streamed[t].mask_logits_BHW, single.mask_logits_TBHW[t], rtol=1e-5, atol=1e-5
        )


def test_streaming_memory_stays_bounded():
    model = make_model().eval()
    memory: dict = {}
    frames = (torch.randn(1, 3, 64 * 4, 64 * 4) for _ in range(24))
    last = -1
    for out in model.stream(frames, memory=memory):
        last = out.frame_index
        kept = memory["non_cond_frame_outputs"]
        assert len(kept) <= model.max_obj_ptrs_in_encoder + 1
        with_features = [k for k, v in kept.items() if v["maskmem_features"] is not None]
        assert len(with_features) <= model.num_maskmem + 1
        assert all("pred_masks_high_res" not in v for v in kept.values())
    assert last == 23 and min(kept) == 23 - model.max_obj_ptrs_in_encoder
    assert list(memory["cond_frame_outputs"]) == [0]


def test_checkpoint_round_trip_through_the_official_format(tmp_path: Path):
    model = make_model(seed=3)
    path = tmp_path / "sam2.1_hiera_tiny.pt"
    save_sam2_checkpoint(model, path)
    payload = torch.load(path, weights_only=True)
    assert set(payload) == {"model"} and not any(k.startswith("prompt_encoder.") for k in payload["model"])
    torch.manual_seed(99)
    loaded = build_model("hiera_t", S, checkpoint=path)
    for key, value in model.state_dict().items():
        if not key.startswith("prompt_encoder."):
            assert torch.equal(value, loaded.state_dict()[key]), key
    # our prompt encoder is allowed to be missing from Meta's files, nothing else is
    fresh = make_model(seed=4)
    load_sam2_checkpoint(fresh, path)
    assert torch.equal(fresh.no_mem_embed, model.no_mem_embed)


def test_bad_checkpoints_give_one_error_listing_the_keys(tmp_path: Path):
    model = make_model()
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("prompt_encoder.")}
    broken = dict(state)
    del broken["no_mem_embed"], broken["sam_mask_decoder.iou_token.weight"]
    broken["extra.weight"] = torch.zeros(1)
    torch.save({"model": broken}, tmp_path / "broken.pt")
    with pytest.raises(CheckpointError) as err:
        load_sam2_checkpoint(model, tmp_path / "broken.pt")
    message = str(err.value)
    assert (
        "broken.pt" in message and "missing keys: no_mem_embed, sam_mask_decoder.iou_token.weight" in message
    )
    assert "unexpected keys: extra.weight" in message
    torch.save(state, tmp_path / "bare.pt")
    with pytest.raises(
        CheckpointError, match=r"bare\.pt: not a SAM2 checkpoint: SAM2 weights without Meta's"
    ):
        load_sam2_checkpoint(model, tmp_path / "bare.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match=r"junk\.pt: not a SAM2 checkpoint: a text file"):
        load_sam2_checkpoint(model, tmp_path / "junk.pt")
    with pytest.raises(CheckpointError, match="not found"):
        load_sam2_checkpoint(model, tmp_path / "absent.pt")
    small = {k: v for k, v in build_model("hiera_s", S).state_dict().items()}
    torch.save({"model": small}, tmp_path / "small.pt")
    with pytest.raises(
        CheckpointError, match=r"small\.pt: holds hiera_s \(SAM2\.1\), which does not fit this"
    ):
        load_sam2_checkpoint(model, tmp_path / "small.pt")


def test_unknown_variant_and_bad_size_are_refused():
    with pytest.raises(ValueError, match="unknown SAM2 variant"):
        build_model("hiera_xxl", S)
    with pytest.raises(ValueError, match="multiple of 32"):
        build_model("hiera_t", 250)


def test_cnn_prompt_encoder_loads_local_backbone_weights(tmp_path: Path):
    net = torchvision.models.resnet18(weights=None)
    torch.nn.init.constant_(net.conv1.weight, 0.01)
    torch.save(net.state_dict(), tmp_path / "resnet18.pth")
    model = make_model(
        prompt=PromptEncoderConfig(
            kind="cnn", backbone="resnet18", backbone_weights=str(tmp_path / "resnet18.pth")
        )
    )
    assert torch.all(model.prompt_encoder.stem[0].weight == 0.01)
    images = torch.randn(2, 1, 3, S, S)
    out = model.train().forward_clip(images)
    assert out.mask_logits_TBHW.shape == (2, 1, S, S)
    torch.save({"something": torch.zeros(1)}, tmp_path / "wrong.pth")
    with pytest.raises(RuntimeError, match=r"wrong\.pth: backbone weights do not fit"):
        make_model(
            prompt=PromptEncoderConfig(
                kind="cnn", backbone="resnet18", backbone_weights=str(tmp_path / "wrong.pth")
            )
        )


def test_the_untrained_cnn_prompt_is_also_promptless():
    model = make_model(prompt=PromptEncoderConfig(kind="cnn", backbone="resnet18")).eval()
    images = torch.randn(1, 3, S, S)
    with torch.no_grad():
        out = model.prompt_encoder(images, model.encode_images(images)["backbone_fpn"])
    assert out.dense_NChw.shape == (1, 256, S // 16, S // 16) and torch.count_nonzero(out.dense_NChw) == 0


def test_a_compiled_image_encoder_gives_the_eager_outputs_and_keeps_the_weights_names():
    torch.manual_seed(0)
    eager = build_autosam2(ModelConfig(image_size=64)).eval()
    torch.manual_seed(0)
    compiled = build_autosam2(ModelConfig(image_size=64, compile=True, compile_backend="aot_eager")).eval()
    assert list(eager.state_dict()) == list(compiled.state_dict())
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        a, b = eager.image_encoder(x), compiled.image_encoder(x)
    assert compiled.image_encoder.forward.active  # it really ran compiled
    assert torch.allclose(a["vision_features"], b["vision_features"], atol=1e-5)


def test_a_failed_compile_warns_once_and_runs_eagerly():
    def no_compiler(graph, example_inputs):
        raise RuntimeError("no C++ compiler on this node")

    torch.manual_seed(0)
    model = build_autosam2(ModelConfig(image_size=64)).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        expected = model.image_encoder(x)["vision_features"]
        guarded = model.compile_image_encoder(no_compiler)
        with pytest.warns(CompileWarning, match="no C\\+\\+ compiler on this node") as caught:
            first = model.image_encoder(x)["vision_features"]
            second = model.image_encoder(x)["vision_features"]
    assert len([w for w in caught if w.category is CompileWarning]) == 1 and not guarded.active
    assert torch.equal(first, expected) and torch.equal(second, expected)
    with (
        pytest.raises(RuntimeError),
        torch.no_grad(),
    ):  # the model's own error is not taken for a compile failure
        model.compile_image_encoder(no_compiler)
        model.image_encoder(torch.randn(1, 2, 64, 64))


def test_a_one_frame_clip_in_video_mode_is_a_frame_mode_step_and_leaves_memory_unused():
    """A mix's one-frame clips (single frames) train in video mode as in frame mode: frame 0 is the
    conditioning frame, nothing is written to memory; trainable memory modules take no part (so a mix
    builds DDP with find_unused_parameters, `engines.build_engine`)."""
    model = make_model(FreezeConfig(mask_decoder=False, memory=False)).train()
    images, masks, present = synthetic_clip(frames=1)
    video, frame = model.forward_clip(images), model.forward_clip(images, per_frame=True)
    assert torch.equal(video.mask_logits_TBHW, frame.mask_logits_TBHW)
    assert torch.equal(video.object_logits_TB, frame.object_logits_TB)
    clip_losses(video.mask_logits_TBHW, video.iou_TB, video.object_logits_TB, masks, present)[
        "total"
    ].backward()
    assert _grads(model, "sam_mask_decoder.") > 0 and _grads(model, "memory_attention.") == 0


def test_a_ground_truth_conditioning_mask_is_frame_0s_output_and_what_memory_carries():
    model = make_model(FreezeConfig(mask_decoder=False, memory=False), seed=3).train()
    images, masks, present = synthetic_clip(frames=3)
    assert present[0].all()
    cond = masks[0]
    out = model.forward_clip(images, cond_mask_BHW=cond)
    # frame 0: SAM2's -10/+10 logits of the mask, blurred only at its edges by the low-res round trip
    inside, outside = out.mask_logits_TBHW[0][cond], out.mask_logits_TBHW[0][~cond]
    assert inside.median() > 9 and outside.median() < -9
    assert torch.equal(out.object_logits_TB[0], torch.full_like(out.object_logits_TB[0], 10.0))
    # the frames after it read a memory made from that mask: not the one the prompt's own mask makes
    own = model.forward_clip(images)
    assert not torch.allclose(out.mask_logits_TBHW[1:], own.mask_logits_TBHW[1:])
    loss = clip_losses(
        out.mask_logits_TBHW[1:], out.iou_TB[1:], out.object_logits_TB[1:], masks[1:], present[1:]
    )
    loss["total"].backward()
    assert _grads(model, "memory_encoder") > 0 and _grads(model, "memory_attention") > 0
    assert _grads(model, "sam_mask_decoder") > 0  # frame 0's object pointer and the frames after it
    assert all(p.grad is None for p in model.mask_downsample.parameters())  # reached, kept frozen
    with pytest.raises(ValueError, match="video mode"):
        model.forward_clip(images, per_frame=True, cond_mask_BHW=cond)


def test_steps_with_and_without_a_conditioning_mask_give_ddp_a_gradient_for_every_trainable_parameter():
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    model = make_model(FreezeConfig(mask_decoder=False, memory=False), seed=4).train()
    images, masks, present = synthetic_clip(frames=2)
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        ddp = DistributedDataParallel(model)
        for cond in (masks[0], masks[0], None):  # DDP checks the last step's gradients in the next step
            logits, ious, objects = ddp(images, cond_mask_BHW=cond)
            clip_losses(logits[1:], ious[1:], objects[1:], masks[1:], present[1:])["total"].backward()
        assert model.no_mem_embed.grad is not None
    finally:
        dist.destroy_process_group()
