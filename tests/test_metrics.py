"""Metrics against values worked out by hand on tiny frames (derivations in the comments)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from autosam2.metrics import (
    METRICS,
    TOOLBOX_METRICS,
    MetricAccumulator,
    as_gt,
    e_measure_curve,
    frame_metrics,
    s_measure,
    sunseg_map,
    weighted_f_measure,
)


def approx(value: float) -> object:
    # The toolbox formulas add eps (2.2e-16) to denominators; nothing else is inexact here.
    return pytest.approx(value, rel=1e-9, abs=1e-12)


def grid(rows: str) -> np.ndarray:
    """A bool mask from rows of '.' and '#'."""
    return np.array([[c == "#" for c in row] for row in rows.split()])


# 4x4, a 2x2 object in the middle: 4 object pixels, N = 16.
GT4 = grid(
    """
    ....
    .##.
    .##.
    ....
    """
)
# 5x5, the same 2x2 object at rows/cols 1-2: 4 object pixels, N = 25.
GT5 = np.zeros((5, 5), bool)
GT5[1:3, 1:3] = True


# ------------------------------------------------------------------------------- binary overlap, MAE


def test_dice_iou_precision_recall_mae_4x4() -> None:
    prob = np.array(
        [
            [0.5, 0.0, 0.0, 0.0],
            [0.0, 0.9, 0.6, 0.7],
            [0.0, 0.4, 0.8, 0.0],
            [0.0, 0.0, 0.0, 0.0],
        ]
    )
    # prob >= 0.5 -> (0,0) (0.5 counts), (1,1), (1,2), (1,3), (2,2): 5 predicted pixels.
    # TP = (1,1),(1,2),(2,2) = 3; FP = (0,0),(1,3) = 2; FN = (2,1) = 1.
    m = frame_metrics(prob, GT4)
    assert m["dice"] == approx(2 * 3 / (2 * 3 + 2 + 1))  # 6/9
    assert m["iou"] == approx(3 / (3 + 2 + 1))  # 1/2
    assert m["precision"] == approx(3 / 5)
    assert m["recall"] == approx(3 / 4)
    # |prob - gt|: object 0.1 + 0.4 + 0.6 + 0.2 = 1.3; background 0.5 + 0.7 = 1.2 -> 2.5 / 16.
    assert m["mae"] == approx(2.5 / 16)
    assert set(m) == set(METRICS)


# -------------------------------------------------------------------------------- empty-gt rules


EMPTY4 = np.zeros((4, 4), bool)


def test_empty_gt_rules_ours() -> None:
    # Both empty: every 0/0 ratio is 1, and so is weighted F (same rule as Dice).
    m = frame_metrics(np.zeros((4, 4)), EMPTY4)
    for key in ("dice", "iou", "precision", "recall", "weighted_f"):
        assert m[key] == 1.0, key
    assert m["s_measure"] == approx(1.0)  # 1 - mean(pred)
    assert m["mae"] == 0.0

    # Empty gt, one false positive at 0.7: all predicted pixels are wrong, nothing was there to miss.
    prob = np.zeros((4, 4))
    prob[0, 0] = 0.7
    m = frame_metrics(prob, EMPTY4)
    assert (m["dice"], m["iou"], m["precision"], m["recall"], m["weighted_f"]) == (0.0, 0.0, 0.0, 1.0, 0.0)
    assert m["s_measure"] == approx(1 - 0.7 / 16)
    assert m["mae"] == approx(0.7 / 16)

    # Object missed entirely: no false alarm was raised (precision 1), everything was missed.
    m = frame_metrics(np.zeros((4, 4)), GT4)
    assert (m["dice"], m["iou"], m["precision"], m["recall"]) == (0.0, 0.0, 1.0, 0.0)


def test_empty_gt_rules_sunseg() -> None:
    # The toolbox scores 0 whenever nothing overlaps, empty/empty included; weighted F of an empty gt is 0.
    m = frame_metrics(np.zeros((4, 4)), EMPTY4, mode="sunseg")
    for key in ("dice", "iou", "precision", "recall", "weighted_f"):
        assert m[key] == 0.0, key
    assert m["s_measure"] == approx(1.0)
    m = frame_metrics(np.zeros((4, 4)), GT4, mode="sunseg")
    assert (m["dice"], m["iou"], m["precision"], m["recall"]) == (0.0, 0.0, 0.0, 0.0)


def test_faint_map_on_empty_gt_is_stretched_only_in_sunseg_mode() -> None:
    prob = np.zeros((4, 4))
    prob[0, :] = 0.2  # 4 faint pixels, below 0.5
    ours = frame_metrics(prob, EMPTY4)
    # ours: binarised prediction empty -> Dice rule 1; S = 1 - mean = 1 - 0.8/16; MAE = 0.8/16.
    assert ours["dice"] == 1.0 and ours["weighted_f"] == 1.0
    assert ours["s_measure"] == approx(1 - 0.8 / 16)
    assert ours["mae"] == approx(0.8 / 16)
    # sunseg: 0.2 is saved as uint8 51, read back 51/255 = 0.2, min-max stretched to 1.0. The 4 pixels now
    # pass 0.5: Dice 0; S = 1 - 4/16; MAE = 4/16.
    assert sunseg_map(prob)[0].tolist() == [1.0, 1.0, 1.0, 1.0]
    sun = frame_metrics(prob, EMPTY4, mode="sunseg")
    assert sun["dice"] == 0.0 and sun["recall"] == 0.0
    assert sun["s_measure"] == approx(0.75)
    assert sun["mae"] == approx(0.25)


def test_sunseg_map_truncates_to_8_bit_and_leaves_constant_maps() -> None:
    # 0.9 * 255 = 229.5 -> 229 (truncated, as the VPS test script saves); a constant map is not stretched.
    assert sunseg_map(np.full((2, 2), 0.9))[0, 0] == approx(229 / 255)
    # {0.1, 0.3} -> {25, 76} -> stretched to {0, 1}
    assert sunseg_map(np.array([[0.1, 0.3]])).tolist() == [[0.0, 1.0]]


# ------------------------------------------------------------------------------------- S-measure


def test_s_measure_empty_and_full_gt() -> None:
    prob = np.array([[0.0, 0.2], [0.4, 0.6]])  # mean 0.3
    assert s_measure(prob, np.zeros((2, 2), bool)) == approx(1 - 0.3)
    assert s_measure(prob, np.ones((2, 2), bool)) == approx(0.3)


def test_s_measure_perfect_is_one() -> None:
    assert s_measure(GT5.astype(float), GT5) == approx(1.0)
    assert frame_metrics(GT5.astype(float), GT5)["s_measure"] == approx(1.0)


def test_s_measure_constant_half_5x5() -> None:
    # Object score: object pixels all 0.5 -> 2*0.5/(0.25 + 1 + std 0) = 0.8; background (1 - pred) = 0.5
    # likewise 0.8; O = 4/25 * 0.8 + 21/25 * 0.8 = 0.8.
    # Region: the centroid (1.5, 1.5) rounds (half to even) to 2, +1 -> split after row/col 2:
    #   LT 3x3 (weight 9/25) holds the object: pred constant -> sigma_xy = 0, alpha = 0, beta > 0 -> 0;
    #   RT 3x2, LB 2x3, RB 2x2 (6 + 6 + 4 = 16/25) have no object and a constant pred -> alpha = beta = 0 -> 1.
    # S = 0.5 * 0.8 + 0.5 * 16/25 = 0.72
    assert s_measure(np.full((5, 5), 0.5), GT5) == approx(0.5 * 0.8 + 0.5 * 16 / 25)


def test_s_measure_one_missed_pixel_step_by_step() -> None:
    pred = GT5.astype(float)
    pred[2, 2] = 0.0  # the object's bottom-right pixel is missed
    # Object part: object pixels [1, 1, 1, 0]: mean 3/4, sample std sqrt((3 * 1/16 + 9/16) / 3) = 1/2,
    #   score 2 * 3/4 / (9/16 + 1 + 1/2) = 8/11; background (1 - pred) is all 1 -> 2/(1 + 1) = 1.
    #   O = 4/25 * 8/11 + 21/25 * 1 = 263/275.
    o = 4 / 25 * 8 / 11 + 21 / 25
    assert o == approx(263 / 275)
    # Region part, quadrants split after row/col 2 as above. LT (3x3): 3 predicted pixels, 4 object pixels.
    #   x = 1/3, y = 4/9; sigma_x = (3 * (2/3)^2 + 6 * (1/3)^2) / 8 = 1/4;
    #   sigma_y = (4 * (5/9)^2 + 5 * (4/9)^2) / 8 = 5/18;
    #   sigma_xy = (3 * (2/3)(5/9) + (-1/3)(5/9) + 5 * (-1/3)(-4/9)) / 8 = (5/3) / 8 = 5/24;
    #   alpha = 4 * x * y * sigma_xy = 10/81; beta = (x^2 + y^2)(sigma_x + sigma_y) = 25/81 * 19/36;
    #   ssim = alpha / beta = 72/95. The other quadrants (16/25) are all-background both sides -> 1.
    #   R = 9/25 * 72/95 + 16/25 = 2168/2375.
    r = 9 / 25 * 72 / 95 + 16 / 25
    assert r == approx(2168 / 2375)
    expected = 0.5 * o + 0.5 * r  # = 0.93460...
    assert s_measure(pred, GT5) == approx(expected)
    # A binary map is untouched by the sunseg storage/stretch, and nothing is degenerate: modes agree.
    assert frame_metrics(pred, GT5, mode="sunseg")["s_measure"] == approx(expected)
    assert frame_metrics(pred, GT5)["s_measure"] == approx(expected)


def test_s_measure_centroid_rounds_half_to_even() -> None:
    gt = np.zeros((5, 5), bool)
    gt[0:2, 0:2] = True  # centroid (0.5, 0.5): np.round -> 0, +1 -> split after row/col 0
    # O = 0.8 (constant 0.5, as above). Quadrants: LT = pixel (0,0), an object pixel with a constant pred:
    # alpha = beta = 0 -> 1, weight 1/25; RT, LB, RB each mix object and background under a constant pred
    # -> alpha = 0 < beta -> 0. S = 0.5 * 0.8 + 0.5 * 1/25 = 0.42.
    # (MATLAB's round half away from zero would split after row/col 1 and give 0.9.)
    assert s_measure(np.full((5, 5), 0.5), gt) == approx(0.42)


def test_s_measure_toolbox_degenerate_cases_score_zero_in_sunseg_mode() -> None:
    # On GT4 the centroid (1.5, 1.5) splits after row/col 2, leaving a 1x1 bottom-right quadrant, whose
    # sample variance is 0/0 in the toolbox; max(0, NaN) then scores the frame 0.
    pred = np.full((4, 4), 0.5)
    # ours: O = 0.8; R = 9/16 * 0 + (3 + 3 + 1)/16 * 1 = 7/16 -> S = 0.4 + 7/32.
    assert s_measure(pred, GT4) == approx(0.4 + 7 / 32)
    assert s_measure(pred, GT4, toolbox_degenerate=True) == 0.0
    # One-pixel object: ours treats its standard deviation as 0, the toolbox makes it NaN -> 0.
    gt = np.zeros((5, 5), bool)
    gt[2, 2] = True
    assert frame_metrics(gt.astype(float), gt)["s_measure"] == approx(1.0)
    assert frame_metrics(gt.astype(float), gt, mode="sunseg")["s_measure"] == 0.0


# ------------------------------------------------------------------------------------- E-measure

# Thresholds run 255, 254, ..., 0 on the 8-bit map; the last one (>= 0) makes every pixel foreground.
# The toolbox divides the enhanced-alignment sum by N - 1 = 15 on a 4x4 frame.


def test_e_measure_perfect_prediction() -> None:
    # Thresholds 255..1: prediction == gt, every pixel aligns perfectly (phi = 1) -> 16/15.
    # Threshold 0: all-foreground prediction, its demeaned value is 0 -> phi = (0 + 1)^2 / 4 = 1/4 -> 4/15.
    # So the toolbox's mean E-measure of a perfect map is not 1: about 255.25/256 on a real image.
    curve = e_measure_curve(GT4.astype(float), GT4)
    assert curve[:255] == approx(16 / 15)
    assert curve[255] == approx(4 / 15)
    expected = (255 * 16 / 15 + 4 / 15) / 256
    assert frame_metrics(GT4.astype(float), GT4)["e_measure"] == approx(expected)


def test_e_measure_empty_gt() -> None:
    # Empty gt: the enhanced sum is the number of pixels predicted background.
    # All-zero prediction: 16 at thresholds 255..1, 0 at threshold 0.
    assert frame_metrics(np.zeros((4, 4)), EMPTY4)["e_measure"] == approx(255 * 16 / 15 / 256)
    # Four false positives at 1.0: 12 background pixels at 255..1, 0 at 0.
    prob = np.zeros((4, 4))
    prob[0, :] = 1.0
    assert frame_metrics(prob, EMPTY4)["e_measure"] == approx(255 * 12 / 15 / 256)


def test_e_measure_one_missed_pixel() -> None:
    pred = GT4.astype(float)
    pred[2, 2] = 0.0
    # Thresholds 255..1: TP 3, FP 0, FN 1, TN 12. Means: pred 3/16, gt 4/16. Demeaned values in 1/16 units:
    # pred fg 13, pred bg -3, gt fg 12, gt bg -4. phi = ((2ab / (a^2 + b^2)) + 1)^2 / 4:
    #   TP (13, 12): align 312/313 -> (625/313)^2 / 4
    #   FN (-3, 12): align -8/17   -> (9/17)^2 / 4
    #   TN (-3, -4): align 24/25   -> (49/25)^2 / 4
    enhanced = 3 * (625 / 313) ** 2 / 4 + (9 / 17) ** 2 / 4 + 12 * (49 / 25) ** 2 / 4
    curve = e_measure_curve(pred, GT4)
    assert curve[0] == approx(enhanced / 15)
    expected = (255 * enhanced / 15 + 4 / 15) / 256  # threshold 0 as for the perfect map
    assert frame_metrics(pred, GT4)["e_measure"] == approx(expected)


def test_e_measure_quantises_to_8_bit_thresholds() -> None:
    # Object pixels at 0.5 -> 8-bit 127: foreground only at thresholds 127..0, i.e. curve index k >= 128.
    # k < 128: empty prediction, demeaned pred value 0 -> phi = 1/4 everywhere -> 4/15;
    # 128 <= k <= 254: perfect -> 16/15; k = 255: all foreground -> 4/15.
    pred = GT4 * 0.5
    curve = e_measure_curve(pred, GT4)
    assert curve[127] == approx(4 / 15) and curve[128] == approx(16 / 15)
    assert curve.mean() == approx((128 * 4 + 127 * 16 + 4) / 15 / 256)


# ---------------------------------------------------------------------------- weighted F-measure


def test_weighted_f_perfect_is_one() -> None:
    assert weighted_f_measure(GT4.astype(float), GT4) == approx(1.0)
    assert frame_metrics(GT5.astype(float), GT5, mode="sunseg")["weighted_f"] == approx(1.0)


def test_weighted_f_false_positive_weighted_by_distance() -> None:
    pred = GT4.astype(float)
    pred[0, 0] = 1.0  # one false positive, sqrt(2) from the nearest object pixel (1,1)
    # Object pixels have no error, so recall R = 1 and TPw = 4. The false positive weighs
    # B = 2 - 0.5^(sqrt(2)/5) (more the farther it is), so FPw = B and P = 4 / (4 + B).
    b = 2 - 0.5 ** (math.sqrt(2) / 5)
    p = 4 / (4 + b)
    assert weighted_f_measure(pred, GT4) == approx(2 * p / (1 + p))  # = 0.8716...


def test_weighted_f_gaussian_is_matlab_7x7_sigma5() -> None:
    # Full 3x3 gt, the centre pixel missed. Distances are 0 and importance 1 everywhere. The centre's error 1
    # is smoothed with fspecial('gaussian', 7, 5) and zero padding: EA(centre) = k_c, the kernel's centre
    # weight, 1 / (sum_{i=-3..3} exp(-i^2 / 50))^2; since k_c < 1 it replaces the error there.
    # R = 1 - k_c / 9; no background -> P = 1; F = 2R / (R + 1).
    k_c = 1 / (1 + 2 * (math.exp(-1 / 50) + math.exp(-4 / 50) + math.exp(-9 / 50))) ** 2
    r = 1 - k_c / 9
    pred = np.ones((3, 3))
    pred[1, 1] = 0.0
    assert weighted_f_measure(pred, np.ones((3, 3), bool)) == approx(2 * r / (r + 1))


def test_weighted_f_empty_gt_per_mode() -> None:
    faint = np.zeros((4, 4))
    faint[0, 0] = 0.3
    strong = np.zeros((4, 4))
    strong[0, 0] = 0.9
    assert weighted_f_measure(np.zeros((4, 4)), EMPTY4) == 0.0  # the toolbox definition
    assert frame_metrics(faint, EMPTY4)["weighted_f"] == 1.0  # ours: binarised prediction empty
    assert frame_metrics(strong, EMPTY4)["weighted_f"] == 0.0
    assert frame_metrics(np.zeros((4, 4)), EMPTY4, mode="sunseg")["weighted_f"] == 0.0


# ------------------------------------------------------------------------------------ accumulation


PERFECT = (GT4.astype(float), GT4)  # dice 1, mae 0
MISSED = (np.zeros((4, 4)), GT4)  # dice 0, mae 4/16


def test_mean_per_sequence_then_across_sequences() -> None:
    acc = MetricAccumulator()
    acc.add_frame("a", *PERFECT)
    probs, gts = zip(MISSED, MISSED, PERFECT, strict=True)
    acc.add_sequence("b", np.stack(probs), np.stack(gts))

    per_seq = acc.per_sequence()
    assert per_seq["a"]["dice"] == 1.0
    assert per_seq["b"]["dice"] == approx(1 / 3)
    assert per_seq["b"]["mae"] == approx((0.25 + 0.25 + 0) / 3)
    summary = acc.summary()
    # Mean of the sequence means (1 + 1/3) / 2 = 2/3; pooling the four frames would give 2/4.
    assert summary["dice"] == approx(2 / 3)
    assert summary["mae"] == approx((0 + 1 / 6) / 2)
    assert acc.frame_counts() == {"a": 1, "b": 3}
    assert set(summary) == set(METRICS)


def test_sunseg_drops_first_and_last_frame() -> None:
    frames = [MISSED, PERFECT, PERFECT, MISSED]
    probs, gts = (np.stack(x) for x in zip(*frames, strict=True))
    ours, sun = MetricAccumulator("ours"), MetricAccumulator("sunseg")
    for acc in (ours, sun):
        acc.add_sequence("v", probs, gts)
        acc.add_sequence("short", probs[:2], gts[:2])  # nothing left after dropping both ends
    assert ours.summary()["dice"] == approx((0.5 + 0.5) / 2)
    assert sun.frame_counts() == {"v": 2, "short": 0}
    assert set(sun.per_sequence()) == {"v"}
    # only the two perfect middle frames of "v" count: Dice 1 at every threshold above 0
    assert sun.summary()["maxDice"] == 1.0
    assert sun.left_out() == {"short": "2 frames, none left after dropping the first and last (sunseg)"}
    assert ours.left_out() == {}


def test_sunseg_threshold_curves() -> None:
    # Kept frames: PERFECT and MISSED (the outer two are dropped). Thresholds linspace(1, 0, 256):
    #   above 0: PERFECT has Dice 1, IoU 1, recall 1; MISSED has 0, 0, 0 -> means 0.5, 0.5, 0.5;
    #   at 0 both predict all 16 pixels: Dice 2*4/(4+16) = 0.4, IoU 4/16 = 0.25, recall 1.
    acc = MetricAccumulator("sunseg")
    for prob, gt in (PERFECT, PERFECT, MISSED, PERFECT):
        acc.add_frame("v", prob, gt)
    s = acc.summary()
    assert s["maxDice"] == approx(0.5)
    assert s["meanDice"] == approx((255 * 0.5 + 0.4) / 256)
    assert s["maxIoU"] == approx(0.5)
    assert s["meanIoU"] == approx((255 * 0.5 + 0.25) / 256)
    assert s["meanSen"] == approx((255 * 0.5 + 1) / 256)
    # E curve: PERFECT 16/15 above 0; MISSED (empty prediction) 4/15 above 0 -> max of the mean 10/15.
    assert s["maxEm"] == approx((16 / 15 + 4 / 15) / 2)
    assert list(s) == list(TOOLBOX_METRICS)  # the toolbox's names only: `dice` is ours alone


def test_sunseg_curves_are_averaged_across_sequences_before_the_max() -> None:
    # "v": object at 1.0, four background pixels at 0.4 (8-bit 102, stretch leaves it as the map spans 0..1).
    #   thresholds > 0.4: Dice 1; 0 < t <= 0.4: TP 4, FP 4 -> 8/12 = 2/3.
    # "w": object at 0.4, one background pixel at 1.0.
    #   thresholds > 0.4: TP 0 -> 0; 0 < t <= 0.4: TP 4, FP 1 -> 8/9.
    # Mean curve: 0.5 above 0.4, (2/3 + 8/9)/2 = 7/9 below -> maxDice 7/9; the mean of the per-sequence
    # maxima would be (1 + 8/9)/2.
    v = GT4.astype(float)
    v[0, :] = 0.4
    w = GT4 * 0.4
    w[0, 0] = 1.0
    acc = MetricAccumulator("sunseg", drop_first_last=False)
    acc.add_frame("v", v, GT4)
    acc.add_frame("w", w, GT4)
    assert acc.per_sequence()["v"]["maxDice"] == approx(1.0)
    assert acc.per_sequence()["w"]["maxDice"] == approx(8 / 9)
    assert acc.summary()["maxDice"] == approx(7 / 9)


@pytest.mark.parametrize("mode", ["ours", "sunseg"])
def test_merged_accumulators_give_the_summary_of_one(mode) -> None:
    # how validation joins its ranks: the merged summary is the one a single accumulator would give,
    # the sunseg curves included (averaged across sequences, then reduced)
    rng = np.random.default_rng(0)
    sequences = {name: (rng.random((4, 6, 6)), rng.random((4, 6, 6)) > 0.6) for name in ("a", "b", "c")}
    whole, first, second = (MetricAccumulator(mode) for _ in range(3))
    for name, (probs, gts) in sequences.items():
        whole.add_sequence(name, probs, gts)
        (first if name == "a" else second).add_sequence(name, probs, gts)
    first.merge(second)
    assert first.per_sequence() == whole.per_sequence() and first.summary() == whole.summary()
    again = MetricAccumulator(mode)
    again.add_sequence("a", *sequences["a"])
    with pytest.raises(ValueError, match=r"sequences \['a'\] are in both"):
        first.merge(again)
    with pytest.raises(ValueError, match="cannot merge"):
        MetricAccumulator("ours").merge(MetricAccumulator("sunseg"))


def test_summary_without_frames_raises() -> None:
    with pytest.raises(ValueError, match="no sequence"):
        MetricAccumulator().summary()


# ----------------------------------------------------------------------------------- inputs


def test_torch_inputs_match_numpy() -> None:
    rng = np.random.default_rng(0)
    prob = rng.integers(0, 257, size=(3, 6, 7)) / 256  # exact in float32 too, so results must be identical
    gt = rng.uniform(size=(3, 6, 7)) < 0.4
    for mode in ("ours", "sunseg"):
        from_np = frame_metrics(prob[0], gt[0], mode=mode)
        from_torch = frame_metrics(torch.from_numpy(prob[0]).float(), torch.from_numpy(gt[0]), mode=mode)
        assert from_torch == from_np
        acc_np, acc_t = MetricAccumulator(mode), MetricAccumulator(mode)
        acc_np.add_sequence("s", prob, gt)
        acc_t.add_sequence("s", torch.from_numpy(prob).to(torch.bfloat16), torch.from_numpy(gt))
        # k/256 needs at most 8 significant bits, which bfloat16 (a dtype numpy lacks) keeps.
        assert acc_t.summary() == acc_np.summary()


def test_bad_inputs_are_refused() -> None:
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        frame_metrics(np.full((2, 2), 1.5), np.zeros((2, 2), bool))  # logits, not probabilities
    with pytest.raises(ValueError, match="shape"):
        frame_metrics(np.zeros((2, 2)), np.zeros((2, 3), bool))
    with pytest.raises(ValueError, match="mode"):
        frame_metrics(np.zeros((2, 2)), np.zeros((2, 2), bool), mode="pooled")  # type: ignore[arg-type]


# ------------------------------------------------------------------- the toolbox's figures and the gt rule


def _band_maps(values: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """A 1x4 frame: 8-bit prediction `values` on a gt whose first two pixels are the polyp."""
    return np.array([values], np.uint8), np.array([[255, 255, 0, 0]], np.uint8)


def test_toolbox_maxima_come_from_curves_averaged_over_sequences_not_from_each_sequence() -> None:
    # Sequence a: pixels 255, 255, 153, 0 -> Dice 1 at high thresholds, 4/5 once 153 counts, 2/3 at 0.
    # Sequence b: pixels 255, 77, 0, 0    -> Dice 2/3 at high thresholds, 1 once 77 counts, 2/3 at 0.
    # Each sequence's best Dice is 1 (at different thresholds); their mean curve peaks at
    # (4/5 + 1) / 2 = 0.9, between 77 and 153: the toolbox's maxDice. IoU: a 1, 2/3, 1/2; b 1/2, 1, 1/2,
    # so maxIoU = (2/3 + 1) / 2 = 5/6. Sensitivity reaches 1 in both: maxSen = 1.
    acc = MetricAccumulator("sunseg", drop_first_last=False)
    acc.add_map("a", *_band_maps([255, 255, 153, 0]))
    acc.add_map("b", *_band_maps([255, 77, 0, 0]))
    toolbox = acc.summary()
    assert toolbox["maxDice"] == approx(0.9)
    assert toolbox["maxIoU"] == approx(5 / 6)
    assert toolbox["maxSen"] == approx(1.0)
    per_seq = acc.per_sequence()
    assert per_seq["a"]["maxDice"] == per_seq["b"]["maxDice"] == approx(1.0)  # the mean of these would be 1
    assert list(toolbox) == list(TOOLBOX_METRICS)


def test_the_toolbox_figures_of_one_frame_agree_with_pysodmetrics() -> None:
    """PySODMetrics (the toolbox's own source of S, E, F, wF, MAE) as the oracle, on 8-bit maps."""
    sod = pytest.importorskip("py_sod_metrics")
    rng = np.random.default_rng(7)
    yy, xx = np.mgrid[:48, :64]
    for trial in range(6):
        dist = np.hypot(yy - rng.uniform(10, 38), xx - rng.uniform(10, 54))
        gt = np.clip((rng.uniform(4, 15) - dist) * 60 + 128, 0, 255).astype(np.uint8)  # grey edges
        if trial == 5:
            gt[:] = 0
        pred = np.clip(1 / (1 + np.exp(dist / 3 - 2)) + rng.normal(0, 0.15, dist.shape), 0, 1)
        pred = (pred * 255 * rng.uniform(0.2, 1)).astype(np.uint8)
        acc = MetricAccumulator("sunseg", drop_first_last=False)
        acc.add_map("v", pred, gt)
        ours = acc.summary()
        oracle = {}
        for name, cls in (("sm", sod.Smeasure), ("wfm", sod.WeightedFmeasure), ("mae", sod.MAE)):
            m = cls()
            m.step(pred=pred, gt=gt)
            oracle[name] = m.get_results()[name]
        em, fm = sod.Emeasure(), sod.Fmeasure()
        em.step(pred=pred, gt=gt)
        fm.step(pred=pred, gt=gt)
        em, fm = em.get_results()["em"], fm.get_results()["fm"]
        expected = {
            "Smeasure": oracle["sm"],
            "wFmeasure": oracle["wfm"],
            "MAE": oracle["mae"],
            "adpEm": em["adp"],
            "meanEm": em["curve"].mean(),
            "maxEm": em["curve"].max(),
            "adpFm": fm["adp"],
            "meanFm": fm["curve"].mean(),
            "maxFm": fm["curve"].max(),
        }
        for name, value in expected.items():
            assert ours[name] == pytest.approx(float(value), abs=1e-12), (trial, name)


def test_specificity_is_zero_without_overlap_and_nan_without_background() -> None:
    acc = MetricAccumulator("sunseg", drop_first_last=False)
    acc.add_map("miss", np.array([[0, 0, 255, 255]], np.uint8), np.array([[255, 255, 0, 0]], np.uint8))
    assert acc.summary()["maxSpe"] == 0.0  # the toolbox scores 0 wherever nothing overlaps
    full = MetricAccumulator("sunseg", drop_first_last=False)
    full.add_map("all", np.full((2, 2), 255, np.uint8), np.full((2, 2), 255, np.uint8))
    assert math.isnan(full.summary()["meanSpe"])  # TN / (TN + FP) = 0 / 0, as in the toolbox


def test_a_grey_edged_0_255_mask_is_foreground_above_128() -> None:
    gt = np.array([[0, 100, 128, 129, 200, 255]], np.uint8)
    assert as_gt(gt).tolist() == [[False, False, False, True, True, True]]
    assert as_gt(gt.astype(float)).tolist() == [[False, False, False, True, True, True]]
    assert as_gt(np.array([[0.2, 0.6]])).tolist() == [[False, True]]
    # the mask scored against itself: its own foreground, not every non-zero pixel
    assert frame_metrics(as_gt(gt).astype(float), gt)["dice"] == 1.0
    with pytest.raises(ValueError, match="0/1 label map"):
        frame_metrics(np.zeros((1, 3)), np.array([[0, 1, 1]], np.uint8))
