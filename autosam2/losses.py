"""Training losses on logits, on every frame: focal + dice + IoU (L1) where the polyp is, presence BCE everywhere.

As SAM2 trains: weights 20 (focal, alpha 0.25, gamma 2) / 1 (dice) / 1 (IoU prediction) / 1 (object
score). The mask, dice and IoU terms are zero on frames without a polyp (there is no mask to match, and
the object score says "absent"); each term is averaged over all T*B frames, so polyp-free frames weigh
through the presence term alone. No min-max normalisation: the sigmoid of the logits is the probability.

Shape legend: T frames, B clips, H x W pixels.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from autosam2.config import LossWeights


def focal_loss(
    logits: torch.Tensor, target: torch.Tensor, alpha: float = 0.25, gamma: float = 2.0
) -> torch.Tensor:
    """Per-frame sigmoid focal loss (Lin et al.), mean over pixels: ``[..., H, W] -> [...]``."""
    prob = torch.sigmoid(logits)
    ce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    p_t = prob * target + (1 - prob) * (1 - target)
    loss = ce * (1 - p_t) ** gamma
    if alpha >= 0:
        loss = (alpha * target + (1 - alpha) * (1 - target)) * loss
    return loss.flatten(-2).mean(-1)


def dice_loss(logits: torch.Tensor, target: torch.Tensor, smooth: float = 1.0) -> torch.Tensor:
    """Per-frame soft dice loss on sigmoid probabilities: ``[..., H, W] -> [...]``."""
    prob = torch.sigmoid(logits).flatten(-2)
    target = target.flatten(-2)
    return 1 - (2 * (prob * target).sum(-1) + smooth) / (prob.sum(-1) + target.sum(-1) + smooth)


def mask_iou(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """IoU of the binarised prediction (logit > 0) with the target, per frame; 1 when both are empty."""
    pred = (logits > 0).flatten(-2)
    target = target.flatten(-2).bool()
    inter = (pred & target).sum(-1).float()
    union = (pred | target).sum(-1).float()
    return torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))


def clip_losses(
    mask_logits_TBHW: torch.Tensor,
    iou_TB: torch.Tensor,
    object_logits_TB: torch.Tensor,
    masks_TBHW: torch.Tensor,
    present_TB: torch.Tensor,
    weights: LossWeights | None = None,
) -> dict[str, torch.Tensor]:
    """Each weighted term and their sum ``total``, averaged over the T*B frames."""
    weights = weights or LossWeights()
    target = masks_TBHW.to(mask_logits_TBHW.dtype)
    present = present_TB.to(mask_logits_TBHW.dtype)
    frames = present.numel()
    focal = (focal_loss(mask_logits_TBHW, target) * present).sum() / frames
    dice = (dice_loss(mask_logits_TBHW, target) * present).sum() / frames
    with torch.no_grad():
        actual_iou = mask_iou(mask_logits_TBHW, target)
    iou = ((iou_TB - actual_iou).abs() * present).sum() / frames
    presence = F.binary_cross_entropy_with_logits(object_logits_TB, present, reduction="mean")
    terms = {
        "focal": weights.focal * focal,
        "dice": weights.dice * dice,
        "iou": weights.iou * iou,
        "presence": weights.presence * presence,
    }
    terms["total"] = sum(terms.values())
    return terms
