"""The learned (AutoSAM) prompt encoder: each frame -> dense prompt embeddings (and optional sparse tokens).

Both designs output a *residual* added to SAM2's own no-mask embedding, through a zero-initialised last
layer, so an untrained prompt is exactly SAM2's prompt-less input and a pretrained SAM2 behaves as
before at step 0. Sparse tokens (K > 0) are appended after SAM2's padding point; they start at zero but,
unlike the dense residual, zero tokens still take part in attention, so K > 0 changes step 0 slightly.

Shape legend: N images (frames x clips), C channels, h x w = S/16 x S/16 the embedding grid, K tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from autosam2.config import PromptBackbone, PromptEncoderConfig, PromptKind
from autosam2.errors import CheckpointError


class PromptOutput(NamedTuple):
    dense_NChw: torch.Tensor  # residual on SAM2's no-mask embedding
    sparse_NKC: torch.Tensor | None  # extra prompt tokens, or None


def _zero(layer: nn.Module) -> nn.Module:
    nn.init.zeros_(layer.weight)
    nn.init.zeros_(layer.bias)
    return layer


class _SparseTokens(nn.Module):
    """K prompt tokens from globally pooled features; zero at initialisation."""

    def __init__(self, hidden: int, embed_dim: int, num_tokens: int):
        super().__init__()
        self.num_tokens, self.embed_dim = num_tokens, embed_dim
        self.proj = _zero(nn.Linear(hidden, num_tokens * embed_dim))

    def forward(self, x_NChw: torch.Tensor) -> torch.Tensor:
        return self.proj(x_NChw.mean(dim=(2, 3))).view(-1, self.num_tokens, self.embed_dim)


class FeaturePromptHead(nn.Module):
    """(a) A light trainable head over SAM2's own multi-scale image features (already computed)."""

    def __init__(
        self, in_channels: Sequence[int], embed_dim: int = 256, hidden: int = 128, num_sparse: int = 0
    ):
        super().__init__()
        self.lateral = nn.ModuleList(nn.Conv2d(c, hidden, 1) for c in in_channels)
        self.fuse = nn.Sequential(
            nn.Conv2d(hidden * len(in_channels), hidden, 3, padding=1),
            nn.GroupNorm(8, hidden),
            nn.GELU(),
            nn.Conv2d(hidden, hidden, 3, padding=1),
            nn.GroupNorm(8, hidden),
            nn.GELU(),
        )
        self.dense = _zero(nn.Conv2d(hidden, embed_dim, 1))
        self.sparse = _SparseTokens(hidden, embed_dim, num_sparse) if num_sparse else None

    def forward(self, images_NCHW: torch.Tensor, features: Sequence[torch.Tensor]) -> PromptOutput:
        grid = features[-1].shape[-2:]
        # finer levels are pooled down to the embedding grid: the prompt lives there
        x = torch.cat(
            [F.adaptive_avg_pool2d(lat(f), grid) for lat, f in zip(self.lateral, features, strict=True)],
            dim=1,
        )
        x = self.fuse(x)
        return PromptOutput(self.dense(x), self.sparse(x) if self.sparse else None)


# output channels of layer1..layer3 (strides 4, 8, 16)
_RESNET_CHANNELS = {
    PromptBackbone.resnet18: (64, 128, 256),
    PromptBackbone.resnet34: (64, 128, 256),
    PromptBackbone.resnet50: (256, 512, 1024),
    PromptBackbone.resnet101: (256, 512, 1024),
}


class CNNPromptEncoder(nn.Module):
    """(b) AutoSAM's design: its own CNN encoder on the image; stride-16 and stride-8 features merged,
    then stride 4, to `embed_dim` channels, tanh, resized to the embedding grid.

    AutoSAM used HarDNet-85, which torchvision lacks; a torchvision ResNet stands in, its weights read
    from a local file (`backbone_weights`, a torchvision state_dict) since nothing is downloaded.
    """

    def __init__(
        self,
        backbone: PromptBackbone = PromptBackbone.resnet34,
        weights: str | Path | None = None,
        embed_dim: int = 256,
        hidden: int = 128,
        num_sparse: int = 0,
    ):
        super().__init__()
        backbone = PromptBackbone(backbone)
        net = getattr(torchvision.models, backbone.value)(weights=None)
        if weights is not None:
            _load_backbone_weights(net, Path(weights))
        self.stem = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool)
        self.layer1, self.layer2, self.layer3 = net.layer1, net.layer2, net.layer3
        c4, c8, c16 = _RESNET_CHANNELS[backbone]
        self.lat16, self.lat8, self.lat4 = (
            nn.Conv2d(c16, hidden, 1),
            nn.Conv2d(c8, hidden, 1),
            nn.Conv2d(c4, hidden, 1),
        )
        self.merge8 = nn.Sequential(
            nn.Conv2d(hidden, hidden, 3, padding=1), nn.BatchNorm2d(hidden), nn.ReLU(inplace=True)
        )
        self.merge4 = nn.Sequential(
            nn.Conv2d(hidden, hidden, 3, padding=1), nn.BatchNorm2d(hidden), nn.ReLU(inplace=True)
        )
        self.to_embed = nn.Conv2d(hidden, embed_dim, 1)
        self.dense = _zero(nn.Conv2d(embed_dim, embed_dim, 1))
        self.sparse = _SparseTokens(embed_dim, embed_dim, num_sparse) if num_sparse else None

    def forward(self, images_NCHW: torch.Tensor, features: Sequence[torch.Tensor]) -> PromptOutput:
        grid = features[-1].shape[-2:]
        s4 = self.layer1(self.stem(images_NCHW))
        s8 = self.layer2(s4)
        s16 = self.layer3(s8)
        x = self.merge8(
            F.interpolate(self.lat16(s16), size=s8.shape[-2:], mode="bilinear", align_corners=False)
            + self.lat8(s8)
        )
        x = self.merge4(
            F.interpolate(x, size=s4.shape[-2:], mode="bilinear", align_corners=False) + self.lat4(s4)
        )
        x = torch.tanh(self.to_embed(x))
        x = F.adaptive_avg_pool2d(x, grid)
        return PromptOutput(self.dense(x), self.sparse(x) if self.sparse else None)


def _load_backbone_weights(net: nn.Module, path: Path) -> None:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError as err:
        raise CheckpointError(f"{path}: prompt-encoder backbone weights not found") from err
    except Exception as err:  # torch.load raises many types for a damaged or foreign file
        raise CheckpointError(f"{path}: not loadable backbone weights ({type(err).__name__}: {err})") from err
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    result = net.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not k.startswith("fc.")]
    unexpected = [k for k in result.unexpected_keys if not k.startswith("fc.")]
    if missing or unexpected:
        raise CheckpointError(
            f"{path}: backbone weights do not fit: missing {missing[:10]}, unexpected {unexpected[:10]}"
        )


def build_prompt_encoder(
    cfg: PromptEncoderConfig, fpn_channels: Sequence[int], embed_dim: int = 256
) -> nn.Module:
    if PromptKind(cfg.kind) is PromptKind.features:
        return FeaturePromptHead(fpn_channels, embed_dim, cfg.hidden, cfg.num_sparse)
    return CNNPromptEncoder(cfg.backbone, cfg.backbone_weights, embed_dim, cfg.hidden, cfg.num_sparse)
