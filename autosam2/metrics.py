"""Evaluation metrics: per frame, then the mean per sequence, then the mean across sequences.

Per frame, from a probability map ``prob`` ``[H,W]`` in [0, 1] (already gated by presence) and a boolean
ground truth ``gt`` ``[H,W]`` (numpy arrays or torch tensors):

* ``dice``, ``iou``, ``precision``, ``recall`` of the binarised prediction ``prob >= 0.5``;
* the SUN-SEG set: ``s_measure`` (structure measure, alpha 0.5; Fan et al., ICCV 2017), ``e_measure`` (the
  *mean* enhanced-alignment measure: the E-measure of Fan et al., IJCAI 2018 averaged over the toolbox's 256
  thresholds, its ``meanEm``, which is what the SUN-SEG benchmark reports as E_phi^mn), ``weighted_f``
  (weighted F-measure, beta^2 = 1; Margolin et al., CVPR 2014) and ``mae``.

``MetricAccumulator`` averages the frames of each sequence, then averages those per-sequence means, so
every sequence weighs the same however long it is; nothing is pooled over pixels or frames.

The ground truth rule (the one place it is written)
---------------------------------------------------
A gt mask is foreground where it is *above 128* on the 0..255 scale, as the SUN-SEG toolbox reads masks
(``gt > 128``) and as our readers binarise JPEG masks, whose compression leaves grey edges. In the API: a
bool array is taken as it is; an integer array is a 0..255 mask (``> 128``), and a 0/1 integer map is
refused with an error that says so (thresholded at 128 it would be empty); a float array is a 0..1 map
(``> 0.5``), or a 0..255 one (``> 128``) when any value is above 1.

Frames whose ground truth is empty, and the two modes
-----------------------------------------------------
``mode="ours"`` (our headline figures). The probability map is scored as it is. Dice, IoU, precision and
recall are ratios of pixel counts, and a ratio whose denominator is empty (0/0) counts as 1: nothing was there
to get wrong. That single rule gives:

* gt empty, prediction empty: dice = iou = precision = recall = 1;
* gt empty, prediction not:   dice = iou = precision = 0, recall = 1 (nothing to find, nothing missed);
* gt not empty, prediction empty: dice = iou = recall = 0, precision = 1 (no false alarm was raised).

Precision and recall must therefore be read together: a model that never predicts gets precision 1 and
recall 0. ``weighted_f`` of an empty gt follows the Dice rule (1 when the binarised prediction is empty,
otherwise 0): Margolin's weighted precision has no true positives to weigh there, so the toolbox scores
every empty-gt frame 0, which would make a correct "no polyp" a total failure. S-measure, E-measure and MAE
keep the toolbox definitions, which already reward an empty prediction on an empty gt (S = 1 - mean(prob),
E = share of pixels predicted background, MAE = mean(prob)).

``mode="sunseg"`` reproduces the SUN-SEG evaluation toolbox (GewelsJI/VPS, ``eval/metrics.py`` and
``eval/vps_evaluator.py``, itself derived from lartpang/PySODMetrics ``py_sod_metrics/sod_metrics.py``):

* the map is stored as an 8-bit PNG the way VPS ``scripts/my_test.py`` does (``(prob * 255).astype(uint8)``),
  read back as ``/ 255`` and min-max stretched to [0, 1] unless constant (``_prepare_data``), so a faint map
  is stretched to full scale before any threshold;
* Dice, IoU, precision and recall are 0 whenever the intersection is empty, empty/empty included (the
  ``Medical`` class); ``weighted_f`` is 0 for an empty gt (``WeightedFmeasure.step``);
* ``MetricAccumulator`` drops the first and the last frame of every sequence (``vps_evaluator.py``, after
  DAVSOD) and reports the toolbox's 17 figures under its own names (``TOOLBOX_METRICS``): the
  threshold-swept ones (Dice, IoU, Sen, Spe at the 256 thresholds ``np.linspace(1, 0, 256)``, the E- and
  F-measure curves) averaged over frames, then sequences, then reduced by max or mean (``maxDice``,
  ``meanDice``). The per-frame ``dice`` etc. of ``frame_metrics(mode="sunseg")`` (at the fixed threshold
  0.5) are building blocks, never reported.

What is reported, under which names
-----------------------------------
A reported name means one rule wherever it appears (``REPORTED``): training's validation, ``evaluate``,
``score``, metrics.json, metrics.csv and MLflow. ``dice``, ``iou``, ``precision``, ``recall`` follow our
rule (every frame; 0/0 counts 1, so an empty prediction on a polyp-free frame scores 1) and come only from
the ours mode, the mode of training's validation (``valid/dice``) and of ``evaluate``'s default
(``eval/dice``). ``meanDice``, ``maxDice`` and the rest of ``TOOLBOX_METRICS`` follow the toolbox's (0
wherever nothing overlaps, an empty prediction on a polyp-free frame included; each sequence's first and
last frame dropped) and come only from the sunseg mode. A model that never predicts a polyp thus scores
``dice`` = the share of polyp-free frames and ``meanDice`` near 0 (only the sweep's last threshold, 0,
marks every pixel a polyp) on the same frames. A figure the toolbox's arithmetic leaves undefined
(specificity without background: ``UNDEFINED``) is NaN, which metrics.json writes as null.

Shared by both modes, as in the toolbox: the E-measure divides by H*W - 1 (as the original MATLAB code does) and its
threshold sweep ends at 0, an all-foreground map, so a perfect prediction scores about 255.25/256 = 0.997 on
a real image rather than 1; the S-measure centroid is rounded half to even (``np.round``). Where the
toolbox's S-measure arithmetic makes a NaN (a one-pixel object or background, a centroid quadrant of 0 or 1
pixels; rare on real frames) its ``max(0, NaN)`` scores the frame 0: the sunseg mode reproduces that 0, the
ours mode computes a real score (a one-pixel standard deviation is 0, as MATLAB's ``std`` of a scalar, and
an empty quadrant, whose weight is 0, adds nothing).
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
from scipy import ndimage

Mode = Literal["ours", "sunseg"]
MODES: tuple[str, ...] = ("ours", "sunseg")

METRICS: tuple[str, ...] = (
    "dice",
    "iou",
    "precision",
    "recall",
    "s_measure",
    "e_measure",
    "weighted_f",
    "mae",
)
BINARY_THRESHOLD = 0.5
S_ALPHA = 0.5
F_BETA2 = 0.3  # the F-measure's beta^2, as in the saliency and polyp toolboxes
GT_THRESHOLD_8BIT = 128  # a 0..255 mask is foreground above this, as the toolbox reads masks (gt > 128)
_EPS = float(np.spacing(1))  # MATLAB's eps, which the toolbox formulas add to their denominators
# Rows of a frame's sunseg curves [8, 256]: swept over thresholds; the adaptive figures repeated 256 times,
# as the toolbox itself spreads its scalars before it averages.
_CURVE_ROWS = (
    "dice",
    "iou",
    "recall",
    "e_measure",
    "specificity",
    "f_measure",
    "adp_e_measure",
    "adp_f_measure",
)
_ROW = {name: i for i, name in enumerate(_CURVE_ROWS)}
# The SUN-SEG/VPS toolbox's figures, under its own names and in its table's order (``eval/vps_evaluator.py``).
TOOLBOX_METRICS: tuple[str, ...] = (
    "Smeasure",
    "wFmeasure",
    "MAE",
    "adpEm",
    "meanEm",
    "maxEm",
    "adpFm",
    "meanFm",
    "maxFm",
    "meanSen",
    "maxSen",
    "meanSpe",
    "maxSpe",
    "meanDice",
    "maxDice",
    "meanIoU",
    "maxIoU",
)
_SUNSEG_THRESHOLDS = np.linspace(1, 0, 256)

# What each mode's accumulator reports (``summary``, ``per_sequence``), and so what metrics.json, the CSV and
# MLflow (``valid/<name>``, ``eval/<name>``) hold: our names under our rules, the toolbox's under its own.
REPORTED: dict[str, tuple[str, ...]] = {"ours": METRICS, "sunseg": TOOLBOX_METRICS}
# Why a reported figure can be undefined (NaN; null in metrics.json), by name.
UNDEFINED: dict[str, str] = {
    "meanSpe": "a frame whose ground truth is all polyp has no background, so its specificity "
    "TN / (TN + FP) is 0 / 0 (the toolbox gives NaN too)",
    "maxSpe": "a frame whose ground truth is all polyp has no background, so its specificity "
    "TN / (TN + FP) is 0 / 0 (the toolbox gives NaN too)",
}
# The Dice rules of the two modes in a user's words, for the commands' --help.
DICE_RULES = """\
Dice, one rule per metric mode (the same in training's validation, evaluate, score and MLflow):
  ours    dice (valid/dice, eval/dice): every frame; 0/0 counts 1, so an empty prediction on a
          polyp-free frame scores 1 (and any prediction there 0); iou, precision, recall alike.
  sunseg  meanDice, maxDice (eval/meanDice, eval/maxDice): the SUN-SEG toolbox's rule, each
          sequence's first and last frame dropped; a frame where prediction and ground truth do
          not overlap scores 0, an empty prediction on a polyp-free frame included.
A model that never predicts a polyp scores dice = its share of polyp-free frames (averaged per
sequence) and meanDice near 0 (only the toolbox's last threshold, 0, marks a polyp: every pixel).
"""


# --------------------------------------------------------------------------------------------- inputs


def _as_numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):  # a torch tensor; duck-typed so this module never imports torch
        x = x.detach().cpu()
        x = (x.double() if x.is_floating_point() else x).numpy()  # numpy has no bfloat16
    return np.asarray(x)


def as_frame(prob: Any, gt: Any) -> tuple[np.ndarray, np.ndarray]:
    """``(prob float64 [H,W] in [0,1], gt bool [H,W])`` from numpy arrays or torch tensors.

    The gt follows the rule of the module docstring (bool as it is; 0..255 above 128; 0..1 floats above
    0.5; a 0/1 integer map is refused). Probabilities outside [0, 1] are refused: they are logits or a bug.
    """
    prob_HW = _as_numpy(prob).astype(np.float64)
    gt_HW = as_gt(_as_numpy(gt))
    if prob_HW.ndim != 2 or prob_HW.shape != gt_HW.shape:
        raise ValueError(
            f"prob and gt must both be [H,W] of one shape, got {prob_HW.shape} and {gt_HW.shape}"
        )
    if prob_HW.size == 0:
        raise ValueError("empty frame")
    if not np.isfinite(prob_HW).all() or prob_HW.min() < 0.0 or prob_HW.max() > 1.0:
        raise ValueError(
            f"prob must be probabilities in [0, 1], got range [{np.nanmin(prob_HW)}, {np.nanmax(prob_HW)}]"
        )
    return prob_HW, gt_HW


def as_gt(gt: np.ndarray) -> np.ndarray:
    """A boolean gt from a mask of any of the usual kinds (see the module docstring's gt rule)."""
    gt = np.asarray(gt)
    if gt.dtype == bool:
        return gt
    if np.issubdtype(gt.dtype, np.integer):
        if gt.size and gt.max() == 1:
            raise ValueError(
                "gt is a 0/1 label map (integers, at most 1): masks are 0..255 with foreground above "
                f"{GT_THRESHOLD_8BIT}; pass gt.astype(bool) or gt * 255"
            )
        return gt > GT_THRESHOLD_8BIT
    return gt > (GT_THRESHOLD_8BIT if gt.size and gt.max() > 1 else 0.5)


def sunseg_map(prob_HW: np.ndarray) -> np.ndarray:
    """The map the SUN-SEG toolbox actually scores: saved as 8-bit PNG, read back, min-max stretched."""
    # Truncation, not rounding: VPS scripts/my_test.py saves (res * 255).astype(np.uint8).
    stored = (np.clip(prob_HW, 0.0, 1.0) * 255).astype(np.uint8)
    pred = stored / 255
    lo, hi = pred.min(), pred.max()
    if hi != lo:  # VPS eval/metrics.py _prepare_data; a constant map is left alone
        pred = (pred - lo) / (hi - lo)
    return pred


# ---------------------------------------------------------------------------------- binary overlap


def overlap_scores(pred_HW: np.ndarray, gt_HW: np.ndarray, mode: Mode = "ours") -> dict[str, float]:
    """Dice, IoU, precision and recall of a boolean prediction, with the empty rules of ``mode``."""
    tp = int(np.count_nonzero(pred_HW & gt_HW))
    fp = int(np.count_nonzero(pred_HW & ~gt_HW))
    fn = int(np.count_nonzero(~pred_HW & gt_HW))
    pairs = {
        "dice": (2 * tp, 2 * tp + fp + fn),
        "iou": (tp, tp + fp + fn),
        "precision": (tp, tp + fp),
        "recall": (tp, tp + fn),
    }
    if mode == "ours":
        return {name: num / den if den else 1.0 for name, (num, den) in pairs.items()}
    _check_mode(mode)
    # The toolbox scores every ratio 0 when nothing overlaps, whatever the denominators.
    return {name: num / den if tp else 0.0 for name, (num, den) in pairs.items()}


# --------------------------------------------------------------------------------------- S-measure


def _object_similarity(values: np.ndarray) -> float:
    mean = float(values.mean())
    # MATLAB's std of a single value is 0; numpy's ddof=1 would give NaN for a one-pixel object.
    std = float(values.std(ddof=1)) if values.size > 1 else 0.0
    return 2 * mean / (mean * mean + 1 + std + _EPS)


def _ssim(pred: np.ndarray, gt: np.ndarray) -> float:
    n = pred.size
    if n == 0:
        return 0.0  # an empty quadrant has weight 0; scoring it 0 avoids the toolbox's NaN
    x, y = pred.mean(), gt.mean()
    dx, dy = pred - x, gt - y
    denom = max(n - 1, 1)  # a one-pixel quadrant has zero sums anyway
    sigma_x, sigma_y, sigma_xy = (dx * dx).sum() / denom, (dy * dy).sum() / denom, (dx * dy).sum() / denom
    alpha = 4 * x * y * sigma_xy
    beta = (x * x + y * y) * (sigma_x + sigma_y)
    if alpha != 0:
        return float(alpha / (beta + _EPS))
    return 1.0 if beta == 0 else 0.0


def s_measure(
    pred_HW: np.ndarray, gt_HW: np.ndarray, alpha: float = S_ALPHA, toolbox_degenerate: bool = False
) -> float:
    """Structure measure (Fan et al., ICCV 2017): alpha * object-aware + (1 - alpha) * region-aware.

    ``toolbox_degenerate`` scores 0 where the toolbox's arithmetic makes a NaN, which its final
    ``max(0, score)`` turns into 0: a one-pixel object or background (``std(ddof=1)``), or a centroid
    quadrant of 0 or 1 pixels. Otherwise those cases are guarded (std 0, empty quadrant adds nothing).
    """
    fg_share = float(gt_HW.mean())
    if fg_share == 0:
        return 1.0 - float(pred_HW.mean())
    if fg_share == 1:
        return float(pred_HW.mean())
    gt = gt_HW.astype(np.float64)

    object_score = fg_share * _object_similarity(pred_HW[gt_HW]) + (1 - fg_share) * _object_similarity(
        1.0 - pred_HW[~gt_HW]
    )

    # Split both maps at the gt centroid into four quadrants weighted by area. The toolbox rounds the
    # 0-based centroid half to even and adds 1, so the centroid row and column go to the top-left side.
    h, w = gt_HW.shape
    rows, cols = np.nonzero(gt_HW)
    cy, cx = int(np.round(rows.mean())) + 1, int(np.round(cols.mean())) + 1
    area = h * w
    w_lt, w_rt, w_lb = cx * cy / area, cy * (w - cx) / area, (h - cy) * cx / area
    weights = (w_lt, w_rt, w_lb, 1 - w_lt - w_rt - w_lb)
    quadrants = (
        (slice(0, cy), slice(0, cx)),
        (slice(0, cy), slice(cx, w)),
        (slice(cy, h), slice(0, cx)),
        (slice(cy, h), slice(cx, w)),
    )
    if toolbox_degenerate and (
        min(rows.size, gt_HW.size - rows.size) == 1 or min(pred_HW[q].size for q in quadrants) <= 1
    ):
        return 0.0
    region_score = sum(wq * _ssim(pred_HW[q], gt[q]) for wq, q in zip(weights, quadrants, strict=True))

    return max(0.0, alpha * object_score + (1 - alpha) * region_score)


# --------------------------------------------------------------------------------------- E-measure


def _e_measure_from_counts(fg_in_gt: Any, fg_in_bg: Any, n: int, n_gt: int) -> Any:
    """E-measure of binary predictions given by their counts: predicted foreground inside and outside the
    gt (scalars, or arrays of one value per threshold)."""
    fg_in_gt = np.asarray(fg_in_gt, dtype=np.float64)
    fg_in_bg = np.asarray(fg_in_bg, dtype=np.float64)
    pred_fg = fg_in_gt + fg_in_bg
    pred_bg = n - pred_fg
    if n_gt == 0:
        # The alignment matrix degenerates to "1 where predicted background, 0 elsewhere".
        enhanced_sum = pred_bg
    elif n_gt == n:
        enhanced_sum = pred_fg
    else:
        # Only four (prediction, gt) value pairs occur in a binary map, so the enhanced alignment matrix
        # takes four values; weigh each by its pixel count instead of building the matrix.
        mean_pred, mean_gt = pred_fg / n, n_gt / n
        parts = (
            (fg_in_gt, 1 - mean_pred, 1 - mean_gt),  # predicted fg on gt fg
            (fg_in_bg, 1 - mean_pred, -mean_gt),  # predicted fg on gt bg
            (n_gt - fg_in_gt, -mean_pred, 1 - mean_gt),  # predicted bg on gt fg
            (pred_bg - (n_gt - fg_in_gt), -mean_pred, -mean_gt),  # predicted bg on gt bg
        )
        enhanced_sum = np.zeros_like(pred_fg)
        for count, a, b in parts:
            align = 2 * a * b / (a * a + b * b + _EPS)
            enhanced_sum = enhanced_sum + count * (align + 1) ** 2 / 4
    return enhanced_sum / (n - 1 + _EPS)


def _level_counts(pred_HW: np.ndarray, gt_HW: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Pixels with ``pred >= t`` inside / outside the gt, for the 8-bit thresholds t = 255, 254, ..., 0
    (cumulative histograms of ``(pred * 255).astype(uint8)``, as PySODMetrics counts them)."""
    levels = (pred_HW * 255).astype(np.uint8)
    fg_in_gt = np.cumsum(np.bincount(levels[gt_HW], minlength=256)[::-1])
    fg_in_bg = np.cumsum(np.bincount(levels[~gt_HW], minlength=256)[::-1])
    return fg_in_gt, fg_in_bg


def e_measure_curve(pred_HW: np.ndarray, gt_HW: np.ndarray) -> np.ndarray:
    """E-measure (Fan et al., IJCAI 2018) of ``pred >= t`` for the 8-bit thresholds t = 255, 254, ..., 0.

    All 256 values at once from cumulative histograms, as PySODMetrics does; the mean is ``meanEm``.
    """
    fg_in_gt, fg_in_bg = _level_counts(pred_HW, gt_HW)
    return _e_measure_from_counts(fg_in_gt, fg_in_bg, gt_HW.size, int(np.count_nonzero(gt_HW)))


def f_measure_curve(pred_HW: np.ndarray, gt_HW: np.ndarray, beta2: float = F_BETA2) -> np.ndarray:
    """F-measure (beta^2 = 0.3) of ``pred >= t`` at the 8-bit thresholds t = 255, ..., 0 (``meanFm`` /
    ``maxFm``); a threshold with no predicted pixel has precision 0, an empty gt recall 0."""
    tp, fp = _level_counts(pred_HW, gt_HW)
    predicted = tp + fp
    precision = tp / np.where(predicted == 0, 1, predicted)
    recall = tp / max(int(np.count_nonzero(gt_HW)), 1)
    numerator = (1 + beta2) * precision * recall
    return numerator / np.where(numerator == 0, 1, beta2 * precision + recall)


def adaptive_threshold(pred_HW: np.ndarray) -> float:
    """Twice the map's mean, at most 1: the threshold of the toolbox's ``adpEm`` and ``adpFm``."""
    return min(2 * float(pred_HW.mean()), 1.0)


def adaptive_measures(pred_HW: np.ndarray, gt_HW: np.ndarray, beta2: float = F_BETA2) -> tuple[float, float]:
    """``(adpEm, adpFm)`` of one frame: E- and F-measure of ``pred >= adaptive_threshold(pred)``; the
    F-measure is 0 when nothing overlaps."""
    binary = pred_HW >= adaptive_threshold(pred_HW)
    tp = int(np.count_nonzero(binary & gt_HW))
    fp = int(np.count_nonzero(binary & ~gt_HW))
    n_gt = int(np.count_nonzero(gt_HW))
    em = float(_e_measure_from_counts(tp, fp, gt_HW.size, n_gt))
    if tp == 0:
        return em, 0.0
    precision, recall = tp / (tp + fp), tp / n_gt
    return em, (1 + beta2) * precision * recall / (beta2 * precision + recall)


# -------------------------------------------------------------------------------- weighted F-measure


def weighted_f_measure(pred_HW: np.ndarray, gt_HW: np.ndarray, beta2: float = 1.0) -> float:
    """Weighted F-measure (Margolin et al., CVPR 2014, their WFb.m); 0 for an empty gt, as in the toolbox."""
    if not gt_HW.any():
        return 0.0
    gt = gt_HW.astype(np.float64)
    err = np.abs(pred_HW - gt)
    # Distance from every pixel to the nearest gt pixel, and that pixel (MATLAB's [Dst, IDXT] = bwdist(GT)).
    dist, (iy, ix) = ndimage.distance_transform_edt(~gt_HW, return_indices=True)
    # Pixel dependency: a background pixel carries the error of its nearest object pixel, then errors are
    # smoothed with MATLAB's fspecial('gaussian', 7, 5): sigma 5, radius 3, zero padding as imfilter does.
    err_t = err[iy, ix]
    err_a = ndimage.gaussian_filter(err_t, sigma=5.0, radius=3, mode="constant", cval=0.0)
    min_err = np.where(gt_HW & (err_a < err), err_a, err)
    # Pixel importance: false positives far from the object cost more, up to twice.
    importance = np.where(gt_HW, 1.0, 2.0 - np.exp(np.log(0.5) / 5.0 * dist))
    err_w = min_err * importance

    tp_w = gt.sum() - err_w[gt_HW].sum()
    fp_w = err_w[~gt_HW].sum()
    recall = 1.0 - err_w[gt_HW].mean()
    precision = tp_w / (tp_w + fp_w + _EPS)
    return float((1 + beta2) * recall * precision / (recall + beta2 * precision + _EPS))


# ------------------------------------------------------------------------------------------- a frame


def too_short_for_the_drop(frames: int) -> str:
    """Why a sequence of `frames` frames is not scored when each sequence's first and last are dropped."""
    return f"{frames} frame{'s' if frames != 1 else ''}, none left after dropping the first and last (sunseg)"


def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")


def _score(
    prob_HW: np.ndarray, gt_HW: np.ndarray, mode: Mode, curves: bool, stored: bool = False
) -> tuple[dict[str, float], np.ndarray | None]:
    """Metrics of a validated frame and, when asked, its sunseg curves ``[8,256]`` (rows ``_CURVE_ROWS``).
    ``stored``: `prob_HW` is already the map the mode scores (an 8-bit file, prepared by `from_8bit`)."""
    pred = sunseg_map(prob_HW) if mode == "sunseg" and not stored else prob_HW
    binary = pred >= BINARY_THRESHOLD
    em_curve = e_measure_curve(pred, gt_HW)

    out = overlap_scores(binary, gt_HW, mode)
    out["s_measure"] = s_measure(pred, gt_HW, toolbox_degenerate=mode == "sunseg")
    out["e_measure"] = float(em_curve.mean())
    if gt_HW.any() or mode == "sunseg":
        out["weighted_f"] = weighted_f_measure(pred, gt_HW)
    else:
        out["weighted_f"] = 0.0 if binary.any() else 1.0
    out["mae"] = float(np.abs(pred - gt_HW).mean())
    return out, (_sunseg_rows(pred, gt_HW, em_curve) if curves else None)


def frame_metrics(prob: Any, gt: Any, mode: Mode = "ours") -> dict[str, float]:
    """All of ``METRICS`` for one frame; see the module docstring for the empty-gt rules of each mode."""
    _check_mode(mode)
    return _score(*as_frame(prob, gt), mode, curves=False)[0]


def _threshold_overlaps(pred_HW: np.ndarray, gt_HW: np.ndarray) -> tuple[np.ndarray, ...]:
    """Dice, IoU, recall and specificity of ``pred >= t`` at ``np.linspace(1, 0, 256)`` (VPS ``Medical``):
    each 0 wherever nothing overlaps; specificity is NaN where the gt has no background, as there."""
    # Counts of pred >= t for every threshold at once: sort once, then binary-search the thresholds.
    in_gt, in_bg = np.sort(pred_HW[gt_HW]), np.sort(pred_HW[~gt_HW])
    tp = in_gt.size - np.searchsorted(in_gt, _SUNSEG_THRESHOLDS, side="left")
    fp = in_bg.size - np.searchsorted(in_bg, _SUNSEG_THRESHOLDS, side="left")
    n_gt, n_bg = in_gt.size, in_bg.size
    hit = tp > 0  # the toolbox answers 0 wherever nothing overlaps
    dice = np.divide(2 * tp, n_gt + tp + fp, out=np.zeros(tp.shape), where=hit)
    iou = np.divide(tp, n_gt + fp, out=np.zeros(tp.shape), where=hit)
    recall = np.divide(tp, n_gt, out=np.zeros(tp.shape), where=hit)
    with np.errstate(invalid="ignore"):
        specificity = np.where(hit, (n_bg - fp) / n_bg if n_bg else np.nan, 0.0)
    return dice, iou, recall, specificity


def _sunseg_rows(pred_HW: np.ndarray, gt_HW: np.ndarray, em_curve: np.ndarray) -> np.ndarray:
    dice, iou, recall, specificity = _threshold_overlaps(pred_HW, gt_HW)
    adp_em, adp_fm = adaptive_measures(pred_HW, gt_HW)
    rows = (dice, iou, recall, em_curve, specificity, f_measure_curve(pred_HW, gt_HW))
    return np.stack([*rows, np.full(256, adp_em), np.full(256, adp_fm)])


def from_8bit(pred_u8: np.ndarray, gt_u8: np.ndarray, mode: Mode = "sunseg") -> tuple[np.ndarray, np.ndarray]:
    """``(pred, gt)`` as a mode scores two 8-bit grayscale files (a saved prediction, a mask): gt is
    foreground above ``GT_THRESHOLD_8BIT``; pred is ``/ 255``, in the sunseg mode also min-max stretched
    unless constant (VPS ``_prepare_data``)."""
    pred_u8, gt_u8 = np.asarray(pred_u8), np.asarray(gt_u8)
    if pred_u8.dtype != np.uint8 or gt_u8.dtype != np.uint8:
        raise ValueError(f"expected 8-bit maps, got {pred_u8.dtype} and {gt_u8.dtype}")
    pred = pred_u8 / 255
    if mode == "sunseg" and pred.max() != pred.min():
        pred = (pred - pred.min()) / (pred.max() - pred.min())
    return pred, gt_u8 > GT_THRESHOLD_8BIT


def _toolbox_figures(scalars: dict[str, float], curves: np.ndarray) -> dict[str, float]:
    """The toolbox's 17 figures from per-frame means (``scalars``) and curves averaged the same way:
    ``mean*`` is the mean over thresholds, ``max*`` the maximum, ``adp*`` the adaptive value."""
    c = {name: curves[i] for name, i in _ROW.items()}
    out = {"Smeasure": scalars["s_measure"], "wFmeasure": scalars["weighted_f"], "MAE": scalars["mae"]}
    out["adpEm"], out["adpFm"] = float(c["adp_e_measure"].mean()), float(c["adp_f_measure"].mean())
    for prefix, row in (
        ("Em", "e_measure"),
        ("Fm", "f_measure"),
        ("Sen", "recall"),
        ("Spe", "specificity"),
        ("Dice", "dice"),
        ("IoU", "iou"),
    ):
        out[f"mean{prefix}"], out[f"max{prefix}"] = float(c[row].mean()), float(c[row].max())
    return {name: out[name] for name in TOOLBOX_METRICS}


# ------------------------------------------------------------------------------------- accumulation


class _SequenceSums:
    """One sequence's running sums: per-frame metrics and sunseg curves added up as frames arrive, so an
    accumulator's memory does not grow with a sequence's length. With `drop_last` the newest frame is held
    back until the next one arrives (the last frame of a sequence never counts)."""

    def __init__(self, drop_first: bool, drop_last: bool) -> None:
        self.seen = 0
        self.count = 0
        self.metrics: dict[str, float] = dict.fromkeys(METRICS, 0.0)
        self.curves: np.ndarray | None = None
        self._drop_first, self._drop_last = drop_first, drop_last
        self._held: tuple[dict[str, float], np.ndarray | None] | None = None

    def add(self, metrics: dict[str, float], curves: np.ndarray | None) -> None:
        self.seen += 1
        if self._drop_first and self.seen == 1:
            return
        if self._drop_last:
            held, self._held = self._held, (metrics, curves)
            if held is None:
                return
            metrics, curves = held
        self.count += 1
        for k in METRICS:
            self.metrics[k] += metrics[k]
        if curves is not None:
            self.curves = curves.copy() if self.curves is None else self.curves + curves

    def means(self) -> dict[str, float]:
        return {k: self.metrics[k] / self.count for k in METRICS}

    def mean_curves(self) -> np.ndarray | None:
        return None if self.curves is None else self.curves / self.count


class MetricAccumulator:
    """Per-frame metrics gathered by sequence; ``per_sequence`` means, and ``summary`` = mean of those.

    Frames of a sequence must be added in temporal order: the sunseg mode drops each sequence's first and
    last frame (``drop_first_last``, default on in that mode only). A sequence left with no frame is shown
    in ``frame_counts`` with 0, named with the reason by ``left_out`` and left out of the means (the
    toolbox would turn the whole result into NaN). ``summary`` and ``per_sequence`` report the mode's
    figures under its names (``REPORTED``). Only running sums are kept per sequence, so a long video costs
    no more memory than a short one.
    """

    def __init__(self, mode: Mode = "ours", drop_first_last: bool | None = None) -> None:
        _check_mode(mode)
        self.mode: Mode = mode
        self.drop_first_last = (mode == "sunseg") if drop_first_last is None else drop_first_last
        self._sequences: dict[str, _SequenceSums] = {}

    def _file(self, sequence: str, metrics: dict[str, float], curves: np.ndarray | None) -> None:
        sums = self._sequences.get(sequence)
        if sums is None:
            sums = self._sequences[sequence] = _SequenceSums(self.drop_first_last, self.drop_first_last)
        sums.add(metrics, curves)

    def add_frame(self, sequence: str, prob: Any, gt: Any) -> dict[str, float]:
        """Score one frame, file it under ``sequence`` and return its metrics."""
        metrics, curves = _score(*as_frame(prob, gt), self.mode, curves=self.mode == "sunseg")
        self._file(sequence, metrics, curves)
        return metrics

    def add_map(self, sequence: str, pred_u8: Any, gt_u8: Any) -> dict[str, float]:
        """Score one frame read from 8-bit files (a method's saved map, its mask), as `from_8bit`
        prepares them, and file it under ``sequence``."""
        pred, gt = from_8bit(pred_u8, gt_u8, self.mode)
        if pred.shape != gt.shape or pred.ndim != 2:
            raise ValueError(f"pred and gt must both be [H,W] of one shape, got {pred.shape} and {gt.shape}")
        metrics, curves = _score(pred, gt, self.mode, curves=self.mode == "sunseg", stored=True)
        self._file(sequence, metrics, curves)
        return metrics

    def add_sequence(self, name: str, probs_THW: Any, gts_THW: Any) -> None:
        """Score a whole sequence ``[T,H,W]`` in frame order; the name must be new."""
        if name in self._sequences:
            raise ValueError(f"sequence {name!r} was already added")
        probs, gts = _as_numpy(probs_THW), _as_numpy(gts_THW)
        if probs.ndim != 3 or probs.shape[0] != gts.shape[0]:
            raise ValueError(f"expected [T,H,W] stacks of equal T, got {probs.shape} and {gts.shape}")
        for prob, gt in zip(probs, gts, strict=True):
            self.add_frame(name, prob, gt)

    def discard(self, sequence: str) -> None:
        """Forget a sequence (one that could not be read to its end)."""
        self._sequences.pop(sequence, None)

    def state(self, sequence: str) -> dict[str, Any]:
        """A finished sequence's running sums as JSON values (`json` keeps every float exactly), for
        `add_state` in another process."""
        sums = self._sequences[sequence]
        curves = None if sums.curves is None else sums.curves.tolist()
        return {"seen": sums.seen, "count": sums.count, "metrics": dict(sums.metrics), "curves": curves}

    def add_state(self, sequence: str, state: dict[str, Any]) -> None:
        """File a finished sequence as `state` recorded it; the name must be new. The figures are those
        of the accumulator the state was taken from, to the bit."""
        if sequence in self._sequences:
            raise ValueError(f"sequence {sequence!r} was already added")
        sums = self._sequences[sequence] = _SequenceSums(self.drop_first_last, self.drop_first_last)
        sums.seen, sums.count = int(state["seen"]), int(state["count"])
        sums.metrics = {k: float(state["metrics"][k]) for k in METRICS}
        sums.curves = None if state["curves"] is None else np.asarray(state["curves"], dtype=np.float64)

    def merge(self, other: MetricAccumulator) -> None:
        """Take in another accumulator's sequences (another rank's, say); names must not repeat and the
        modes must agree, so the merged summary is the one a single accumulator would give."""
        if (other.mode, other.drop_first_last) != (self.mode, self.drop_first_last):
            raise ValueError(
                f"cannot merge a {other.mode!r} accumulator into a {self.mode!r} one (or their frame dropping differs)"
            )
        repeated = sorted(set(self._sequences) & set(other._sequences))
        if repeated:
            raise ValueError(f"sequences {repeated} are in both accumulators")
        self._sequences.update(other._sequences)

    def frame_counts(self) -> dict[str, int]:
        """Frames that count towards each sequence's mean (after dropping, in the sunseg mode)."""
        return {name: sums.count for name, sums in self._sequences.items()}

    def left_out(self) -> dict[str, str]:
        """Why each sequence with no frame left is not scored (the sunseg mode's first/last drop)."""
        return {
            name: too_short_for_the_drop(sums.seen)
            for name, sums in sorted(self._sequences.items())
            if not sums.count
        }

    def _means(self) -> dict[str, tuple[dict[str, float], np.ndarray | None]]:
        """Per sequence with a frame left: its metric means and its mean sunseg curves. In name order, so
        sums over sequences do not depend on which rank scored which sequence first."""
        return {
            name: (sums.means(), sums.mean_curves())
            for name, sums in sorted(self._sequences.items())
            if sums.count
        }

    def per_sequence(self) -> dict[str, dict[str, float]]:
        """The figures of each sequence with a frame left, under the mode's names (``REPORTED``)."""
        means = self._means()
        if self.mode == "sunseg":
            return {name: _toolbox_figures(m, c) for name, (m, c) in means.items()}
        return {name: m for name, (m, _) in means.items()}

    def summary(self) -> dict[str, float]:
        """The mean over sequences of the per-sequence means, under the mode's names (``REPORTED``). The
        sunseg mode averages the curves the same way and reduces them (max / mean over thresholds) only
        then, as ``eval/vps_evaluator.py`` does."""
        means = self._means()
        if not means:
            raise ValueError("no sequence has a frame to score")
        scalars = {k: float(np.mean([m[k] for m, _ in means.values()])) for k in METRICS}
        if self.mode == "sunseg":
            return _toolbox_figures(scalars, np.mean([c for _, c in means.values()], axis=0))
        return scalars
