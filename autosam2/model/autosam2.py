"""AutoSAM2: SAM2Base with a learned prompt for every frame, trained and run through SAM2's memory.

We subclass SAM2Base and leave its code untouched. Two forward hooks connect our parts to it:
- on ``sam_prompt_encoder``: the learned prompt of the current frame is added to SAM2's prompt-less
  embedding (dense) and appended to its tokens (sparse), wherever SAM2 calls its prompt encoder;
- on ``sam_mask_decoder``: its raw outputs are kept, because ``_forward_sam_heads`` replaces the mask
  logits by -1024 where the object score is <= 0, which cuts the gradient: losses use the raw logits.

Shape legend: T frames, B clips, S image size, N = T*B images, HW/h w the feature grid (S/16).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from sam2.modeling.sam2_base import SAM2Base
from torch import nn

from autosam2.config import FreezeConfig, PromptEncoderConfig
from autosam2.model.prompt_encoder import PromptOutput, build_prompt_encoder


@dataclass
class ClipOutput:
    """Per frame of a clip: raw mask logits at image size, predicted IoU, object-score logits."""

    mask_logits_TBHW: torch.Tensor
    iou_TB: torch.Tensor
    object_logits_TB: torch.Tensor


@dataclass
class FrameOutput:
    """One frame of streaming inference; probabilities are zero where the polyp is judged absent."""

    frame_index: int
    mask_logits_BHW: torch.Tensor
    probs_BHW: torch.Tensor
    presence_B: torch.Tensor
    object_logits_B: torch.Tensor
    iou_B: torch.Tensor


def _chunks(items: Iterable[torch.Tensor], size: int) -> Iterator[list[torch.Tensor]]:
    chunk: list[torch.Tensor] = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


class CompileWarning(UserWarning):
    """torch.compile failed; the module runs eagerly instead."""


class CompiledOrEager:
    """A module's forward through torch.compile, and eager from the first call whose compiled run fails
    (no compiler on the node, an op the backend does not take): one CompileWarning, then eager for good.
    Safe to retry because a forward changes nothing outside its outputs; an error that eager raises too
    is the model's own and propagates."""

    def __init__(self, eager: Callable[..., Any], backend: str | Callable[..., Any], name: str):
        self.eager, self.name = eager, name
        self.compiled: Callable[..., Any] | None = torch.compile(eager, backend=backend, dynamic=False)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.compiled is not None:
            try:
                return self.compiled(*args, **kwargs)
            except Exception as err:  # compilers raise many types; eager below tells whose error it is
                failure = err
            out = self.eager(*args, **kwargs)
            reason = " ".join(line.strip() for line in str(failure).splitlines() if line.strip())
            warnings.warn(
                f"torch.compile of the {self.name} failed ({type(failure).__name__}: {reason[:300]}); "
                "it runs eagerly from now on",
                CompileWarning,
                stacklevel=2,
            )
            self.compiled = None
            return out
        return self.eager(*args, **kwargs)

    @property
    def active(self) -> bool:
        return self.compiled is not None


class Recomputed:
    """A module's forward whose activations are recomputed in the backward pass instead of kept
    (torch.utils.checkpoint, non-reentrant: any inputs and outputs, and the RNG state restored, so
    dropout and drop-path draw the same); a plain call where no gradient is recorded."""

    def __init__(self, forward: Callable[..., Any]):
        self.forward = forward

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if not torch.is_grad_enabled():
            return self.forward(*args, **kwargs)
        return torch.utils.checkpoint.checkpoint(self.forward, *args, use_reentrant=False, **kwargs)


def _empty_memory() -> dict[str, dict[int, dict[str, Any]]]:
    return {"cond_frame_outputs": {}, "non_cond_frame_outputs": {}}


class AutoSAM2(SAM2Base):
    """SAM2 whose prompts come from a learned prompt encoder, one prompt per frame."""

    def __init__(self, **sam2_kwargs: Any):
        super().__init__(**sam2_kwargs)
        self.prompt_encoder: nn.Module | None = None
        self.frozen: FreezeConfig = FreezeConfig(
            image_encoder=False, mask_decoder=False, memory=False, prompt_encoder=False
        )
        self._frame_prompt: PromptOutput | None = None
        self._decoder_out: tuple[torch.Tensor, ...] | None = None
        self.sam_prompt_encoder.register_forward_hook(self._inject_prompt)
        self.sam_mask_decoder.register_forward_hook(self._keep_decoder_outputs)

    # set-up -----------------------------------------------------------------------------------------
    @property
    def fpn_channels(self) -> list[int]:
        """Channels of the three FPN levels as `encode_images` returns them."""
        if self.use_high_res_features_in_sam:
            return [
                self.sam_mask_decoder.conv_s0.out_channels,
                self.sam_mask_decoder.conv_s1.out_channels,
                self.hidden_dim,
            ]
        return [self.hidden_dim] * 3

    def attach_prompt_encoder(self, cfg: PromptEncoderConfig) -> None:
        self.prompt_encoder = build_prompt_encoder(cfg, self.fpn_channels, self.sam_prompt_embed_dim).to(
            self.no_mem_embed.device
        )

    def compile_image_encoder(self, backend: str | Callable[..., Any] = "inductor") -> CompiledOrEager:
        """torch.compile the image encoder (most of a frame's work), for training and inference alike;
        the weights and state_dict keys are unchanged. Falls back to eager with one warning."""
        eager = self.image_encoder.forward
        if isinstance(eager, CompiledOrEager):
            eager = eager.eager
        guarded = CompiledOrEager(eager, backend, "image encoder")
        self.image_encoder.forward = guarded
        return guarded

    def checkpointed_modules(self) -> list[str]:
        """The modules whose activations `checkpoint_activations` recomputes: each block of the Hiera
        trunk (the image encoder's work and most of its activations, for every frame of a clip), each
        memory-attention layer (each frame's tokens attending to its memories) and the memory encoder
        (each frame's mask and features fused at the feature grid). The FPN neck, the mask decoder and
        the prompt encoders are light and run as they are."""
        blocks = [f"image_encoder.trunk.blocks.{i}" for i in range(len(self.image_encoder.trunk.blocks))]
        layers = [f"memory_attention.layers.{i}" for i in range(len(self.memory_attention.layers))]
        return [*blocks, *layers, "memory_encoder"]

    def checkpoint_activations(self) -> list[str]:
        """Recompute the activations of `checkpointed_modules` in the backward pass instead of keeping
        them: less memory for one more forward of those modules; the same gradients (to fp32 rounding).
        Weights and state_dict keys are unchanged. Returns the modules' names."""
        names = self.checkpointed_modules()
        for name in names:
            module = self.get_submodule(name)
            if not isinstance(module.forward, Recomputed):
                module.forward = Recomputed(module.forward)
        return names

    def layer_lr_scales(self, decay: float) -> dict[str, float]:
        """Layer-wise lr decay of the image encoder's trunk, as SAM2's own training applies it: with N
        blocks, block i learns at lr x decay^(N - i), the patch embedding (the deepest layer) at
        decay^(N + 1); the trunk's position embeddings and every other parameter at the full lr.
        Returns the scale of each parameter below 1, by name."""
        trunk = self.image_encoder.trunk
        n = len(trunk.blocks)
        scales = {}
        for name, _ in trunk.named_parameters():
            if name.startswith("blocks."):
                scales[f"image_encoder.trunk.{name}"] = decay ** (n - int(name.split(".")[1]))
            elif name.startswith("patch_embed."):
                scales[f"image_encoder.trunk.{name}"] = decay ** (n + 1)
        return {name: scale for name, scale in scales.items() if scale < 1}

    def groups(self) -> dict[str, list[nn.Module | nn.Parameter]]:
        """Modules and loose parameters of each freezable part."""
        memory: list[nn.Module | nn.Parameter] = [
            self.memory_attention,
            self.memory_encoder,
            self.obj_ptr_proj,
            self.obj_ptr_tpos_proj,
        ]
        memory += [self.maskmem_tpos_enc, self.no_mem_embed, self.no_mem_pos_enc]
        for name in ("mask_downsample", "no_obj_ptr", "no_obj_embed_spatial"):
            part = getattr(self, name, None)
            if part is not None:
                memory.append(part)
        return {
            "image_encoder": [self.image_encoder],
            "mask_decoder": [self.sam_mask_decoder],
            "memory": memory,
            "prompt_encoder": [self.prompt_encoder] if self.prompt_encoder is not None else [],
        }

    def freeze(self, cfg: FreezeConfig) -> None:
        """Set requires_grad per part; SAM2's own click/box prompt encoder is always frozen."""
        self.frozen = cfg
        for name, parts in self.groups().items():
            for part in parts:
                params = [part] if isinstance(part, nn.Parameter) else list(part.parameters())
                for p in params:
                    p.requires_grad_(not getattr(cfg, name))
        self.sam_prompt_encoder.requires_grad_(False)
        for part in self.unreached():
            part.requires_grad_(False)
        self.train(self.training)

    def unreached(self) -> list[nn.Module | nn.Parameter]:
        """Parts our forward does not reach in every step, kept frozen (DDP needs every trainable
        parameter in every step): the mask-prompt downsampler (reached only where a ground-truth
        conditioning mask makes its object pointer: `forward_clip`'s cond_mask_BHW) and, where SAM2
        adds its no-memory embedding to the features directly (SAM2.1's configs), the position encoding
        of that token."""
        parts: list[nn.Module | nn.Parameter] = [self.mask_downsample]
        if self.directly_add_no_mem_embed:
            parts.append(self.no_mem_pos_enc)
        return parts

    def train(self, mode: bool = True) -> AutoSAM2:
        """Frozen parts stay in eval mode (no dropout, fixed norms) while the rest trains."""
        super().train(mode)
        self.sam_prompt_encoder.eval()
        for name, parts in self.groups().items():
            if getattr(self.frozen, name, False):
                for part in parts:
                    if isinstance(part, nn.Module):
                        part.eval()
        return self

    # hooks ------------------------------------------------------------------------------------------
    def _inject_prompt(
        self, module: nn.Module, inputs: Any, output: tuple[torch.Tensor, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if self._frame_prompt is None:
            return output
        sparse, dense = output
        dense = dense + self._frame_prompt.dense_NChw.to(dense.dtype)
        if self._frame_prompt.sparse_NKC is not None:
            sparse = torch.cat([sparse, self._frame_prompt.sparse_NKC.to(sparse.dtype)], dim=1)
        return sparse, dense

    def _keep_decoder_outputs(self, module: nn.Module, inputs: Any, output: tuple[torch.Tensor, ...]) -> None:
        self._decoder_out = output

    # forward ----------------------------------------------------------------------------------------
    def encode_images(
        self, images_NCHW: torch.Tensor, image_features: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        """Image encoder (under no_grad when frozen), then the decoder's high-res projections, as
        SAM2Base.forward_image does; split so a frozen encoder does not stop a trainable decoder.
        `image_features`: the frozen encoder's output for these images, already computed (a
        FeatureCache's), so the encoder does not run."""
        if image_features is not None:
            backbone_out = dict(image_features)
        else:
            with torch.set_grad_enabled(torch.is_grad_enabled() and not self.frozen.image_encoder):
                backbone_out = self.image_encoder(images_NCHW)
        if self.use_high_res_features_in_sam:
            fpn = backbone_out["backbone_fpn"]
            backbone_out["backbone_fpn"] = [
                self.sam_mask_decoder.conv_s0(fpn[0]),
                self.sam_mask_decoder.conv_s1(fpn[1]),
                *fpn[2:],
            ]
        return backbone_out

    def _prompt(self, images_NCHW: torch.Tensor, backbone_out: dict[str, Any]) -> PromptOutput:
        if self.prompt_encoder is None:
            raise RuntimeError("no prompt encoder attached: call attach_prompt_encoder first")
        return self.prompt_encoder(images_NCHW, backbone_out["backbone_fpn"])

    def _step(
        self,
        t: int,
        is_cond: bool,
        rows: slice,
        backbone: tuple[list, list, list],
        prompt: PromptOutput,
        memory: dict,
        num_frames: int,
        run_mem_encoder: bool,
        mask_input: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict]:
        """One frame (`rows` of the encoded batch) through SAM2's track_step with its learned prompt;
        raw logits at image size. `mask_input` ([B,1,S,S], a conditioning frame's ground truth): SAM2
        takes it as the frame's output (its -10/+10 logits), the decoder makes only its object pointer."""
        feats, pos, sizes = backbone
        self._frame_prompt = PromptOutput(
            prompt.dense_NChw[rows], None if prompt.sparse_NKC is None else prompt.sparse_NKC[rows]
        )
        try:
            out = self.track_step(
                frame_idx=t,
                is_init_cond_frame=is_cond,
                current_vision_feats=[f[:, rows] for f in feats],
                current_vision_pos_embeds=[p[:, rows] for p in pos],
                feat_sizes=sizes,
                point_inputs=None,
                mask_inputs=mask_input,
                output_dict=memory,
                num_frames=num_frames,
                run_mem_encoder=run_mem_encoder,
            )
            low_res, ious, _, object_logits = self._decoder_out
            if mask_input is not None:  # the decoder ran for the object pointer; the output is the input
                low_res = out["pred_masks"]
                object_logits = mask_input.flatten(1).any(1, keepdim=True).float() * 20 - 10  # as SAM2's
                ious = torch.ones_like(ious[:, :1])
        finally:
            self._frame_prompt = None
            self._decoder_out = None
        memory["cond_frame_outputs" if is_cond else "non_cond_frame_outputs"][t] = out
        if low_res.shape[1] > 1:  # multimask: the mask SAM2 itself picks, by predicted IoU
            pick = ious.argmax(dim=1)
            batch = torch.arange(low_res.shape[0], device=low_res.device)
            low_res, ious = low_res[batch, pick][:, None], ious[batch, pick][:, None]
        logits = F.interpolate(
            low_res.float(), size=(self.image_size, self.image_size), mode="bilinear", align_corners=False
        )
        return logits[:, 0], ious[:, 0].float(), object_logits[:, 0].float(), out

    def forward(
        self,
        images_TBCHW: torch.Tensor,
        per_frame: bool = False,
        image_features: dict[str, Any] | None = None,
        cond_mask_BHW: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The clip forward as a tuple, for DDP / DeepSpeed wrappers (they call `forward`)."""
        out = self.forward_clip(images_TBCHW, per_frame, image_features, cond_mask_BHW)
        return out.mask_logits_TBHW, out.iou_TB, out.object_logits_TB

    def forward_clip(
        self,
        images_TBCHW: torch.Tensor,
        per_frame: bool = False,
        image_features: dict[str, Any] | None = None,
        cond_mask_BHW: torch.Tensor | None = None,
    ) -> ClipOutput:
        """Training forward: frame 0 is the conditioning frame, frames 1..T-1 attend to memory; every
        frame gets its own learned prompt. ``per_frame``: every frame conditioning, no memory.
        `image_features`: the frozen encoder's output for the T*B images (time-major), if known.
        `cond_mask_BHW`: frame 0's ground-truth mask, taken as its output in place of its prompt's (as in
        SAM2's training), so memory starts from a correct mask (video mode only)."""
        if cond_mask_BHW is not None and (per_frame or not self.use_mask_input_as_output_without_sam):
            raise ValueError(
                "a conditioning mask needs video mode and SAM2's use_mask_input_as_output_without_sam"
            )
        t_len, b = images_TBCHW.shape[:2]
        flat = images_TBCHW.flatten(0, 1)
        backbone_out = self.encode_images(flat, image_features)
        _, feats, pos, sizes = self._prepare_backbone_features(backbone_out)
        prompt = self._prompt(flat, backbone_out)
        memory = _empty_memory()
        logits, ious, objects = [], [], []
        for t in range(t_len):
            rows = slice(t * b, (t + 1) * b)  # images were flattened time-major
            if per_frame:
                memory = _empty_memory()
            step = self._step(
                t,
                per_frame or t == 0,
                rows,
                (feats, pos, sizes),
                prompt,
                memory,
                t_len,
                run_mem_encoder=not per_frame and t < t_len - 1,
                mask_input=cond_mask_BHW[:, None].float() if cond_mask_BHW is not None and t == 0 else None,
            )
            logits.append(step[0])
            ious.append(step[1])
            objects.append(step[2])
        if cond_mask_BHW is not None:
            # frame 0 skipped the no-memory embedding that every other step uses: in the graph at zero
            # weight, so DDP finds a gradient for every trainable parameter in every step
            logits[0] = logits[0] + 0 * self.no_mem_embed.sum()
        return ClipOutput(torch.stack(logits), torch.stack(ious), torch.stack(objects))

    # inference --------------------------------------------------------------------------------------
    @torch.no_grad()
    def stream(
        self,
        frames: Iterable[torch.Tensor],
        num_frames: int | None = None,
        per_frame: bool = False,
        encode_batch: int = 1,
        memory: dict | None = None,
    ) -> Iterator[FrameOutput]:
        """Streaming inference over frames ``[B,3,S,S]`` of any number, one pass, bounded memory.

        `num_frames` is the sequence length when known (SAM2 scales its object-pointer positions by
        it); unknown means long. `encode_batch` frames go through the image encoder together (the
        memory steps stay one frame at a time). Memories SAM2 can no longer read are dropped as the
        stream goes on. `memory` may be passed in (empty) to watch the memory bank.
        """
        horizon = num_frames or self.max_obj_ptrs_in_encoder
        stride = 1 if self.training else self.memory_temporal_stride_for_eval
        keep_memory = (self.num_maskmem - 1) * stride + stride  # frames back whose memory features are read
        keep_pointer = self.max_obj_ptrs_in_encoder  # frames back whose object pointers are read
        memory = {} if memory is None else memory
        memory.update(_empty_memory())
        t = 0
        for chunk in _chunks(frames, encode_batch):
            b = chunk[0].shape[0]
            images = torch.cat(chunk)
            backbone_out = self.encode_images(images)
            _, feats, pos, sizes = self._prepare_backbone_features(backbone_out)
            prompt = self._prompt(images, backbone_out)
            for i in range(len(chunk)):
                rows = slice(i * b, (i + 1) * b)
                if per_frame:
                    memory.update(_empty_memory())
                logits, iou, object_logits, out = self._step(
                    t,
                    per_frame or t == 0,
                    rows,
                    (feats, pos, sizes),
                    prompt,
                    memory,
                    horizon,
                    run_mem_encoder=not per_frame,
                )
                out.pop("pred_masks_high_res", None)  # never read again; the largest tensor of a step
                out.pop("pred_masks", None)
                self._forget(memory["non_cond_frame_outputs"], t, keep_memory, keep_pointer)
                present = object_logits > 0
                probs = torch.sigmoid(logits) * present[:, None, None]
                yield FrameOutput(t, logits, probs, torch.sigmoid(object_logits), object_logits, iou)
                t += 1

    @staticmethod
    def _forget(outputs: dict[int, dict[str, Any]], t: int, keep_memory: int, keep_pointer: int) -> None:
        for k in list(outputs):
            if k < t - keep_pointer:
                del outputs[k]
            elif k < t - keep_memory and outputs[k].get("maskmem_features") is not None:
                outputs[k]["maskmem_features"] = None
                outputs[k]["maskmem_pos_enc"] = None
