"""RES, GRES, multi-round and tokenizer-reconstruction metrics against hand-computed values."""

import math

import numpy as np
import pytest
import torch

from samtok.core.errors import SamtokError
from samtok.eval.metrics import GRESMetric, MaskReconstructionMetric, MultiRoundMetric, RESMetric

H, W = 10, 10


def box(y0, y1, x0, x1, h=H, w=W):
    m = torch.zeros(h, w, dtype=torch.bool)
    m[y0:y1, x0:x1] = True
    return m


EMPTY = torch.zeros(H, W, dtype=torch.bool)
FULL = torch.ones(H, W, dtype=torch.bool)


def pixel(y, x):
    return box(y, y + 1, x, x + 1)


# ------------------------------------------------------------------------------------------------
# RES


def test_res_giou_vs_ciou_on_unequal_areas():
    m = RESMetric()
    # big sample: 64-pixel target found exactly (I = U = 64); small sample: 4-pixel target, the
    # prediction covers 2 of them (I = 2, U = 4, IoU 0.5)
    m.update([box(0, 8, 0, 8), box(0, 1, 0, 2)], [box(0, 8, 0, 8), box(0, 1, 0, 4)])
    out = m.compute()
    assert out["gIoU"] == pytest.approx((1.0 + 0.5) / 2)
    assert out["cIoU"] == pytest.approx(66 / 68)
    assert out["Pr@0.5"] == 1.0  # IoU exactly 0.5 counts (>=)
    assert out["Pr@0.6"] == 0.5
    assert out["Pr@0.9"] == 0.5
    assert out["count"] == 2.0
    assert set(out) == {"cIoU", "gIoU", "Pr@0.5", "Pr@0.6", "Pr@0.7", "Pr@0.8", "Pr@0.9", "count"}


def test_res_empty_single_pixel_and_full_masks():
    m = RESMetric()
    m.update([EMPTY], [EMPTY])  # empty union: IoU 1
    out = m.compute()
    assert out["gIoU"] == 1.0 and out["cIoU"] == 1.0 and out["Pr@0.9"] == 1.0
    m.update([EMPTY], [box(0, 2, 0, 2)])  # non-empty GT, empty prediction: IoU 0, U = 4
    out = m.compute()
    assert out["gIoU"] == 0.5 and out["cIoU"] == 0.0
    m.update([pixel(3, 4)], [pixel(3, 4)])  # single pixel, exact
    m.update([FULL], [FULL])  # all ones
    m.update([FULL], [pixel(0, 0)])  # IoU 1/100
    out = m.compute()
    assert out["count"] == 5.0
    assert out["gIoU"] == pytest.approx((1 + 0 + 1 + 1 + 0.01) / 5)
    assert out["cIoU"] == pytest.approx((0 + 0 + 1 + 100 + 1) / (0 + 4 + 1 + 100 + 100))


def test_res_accepts_numpy_and_integer_masks_and_reset():
    preds = [box(0, 3, 0, 3), box(2, 5, 2, 9)]
    targets = [box(1, 4, 1, 4), box(2, 5, 2, 5)]
    a = RESMetric()
    a.update(preds, targets)
    b = RESMetric()
    b.update([p.numpy() for p in preds], [t.numpy().astype(np.uint8) * 255 for t in targets])
    assert a.compute() == b.compute()
    a.reset()
    with pytest.warns(UserWarning, match="before the ``update``"):
        assert a.compute()["count"] == 0.0


def test_res_shape_mismatch_names_the_sample():
    m = RESMetric()
    with pytest.raises(SamtokError, match="sample 1"):
        m.update([EMPTY, EMPTY], [EMPTY, torch.zeros(H, W + 1, dtype=torch.bool)])
    with pytest.raises(SamtokError, match="2 predictions but 1 targets"):
        m.update([EMPTY, EMPTY], [EMPTY])
    with pytest.raises(SamtokError, match="sample 0 prediction"):
        m.update([torch.zeros(2, 3, 4, dtype=torch.bool)], [EMPTY])
    with pytest.raises(SamtokError, match="sample 0 target"):
        m.update([EMPTY], [np.arange(H * W).reshape(H, W) % 3])  # not binary


def test_res_without_samples_is_nan():
    with pytest.warns(UserWarning, match="before the ``update``"):
        out = RESMetric().compute()
    assert out["count"] == 0.0 and math.isnan(out["gIoU"]) and math.isnan(out["cIoU"])


# ------------------------------------------------------------------------------------------------
# GRES


def test_gres_confusion_table_and_both_accuracy_conventions():
    target = box(0, 4, 0, 4)  # 16 pixels
    m = GRESMetric()
    m.update(
        [EMPTY, EMPTY, box(0, 2, 0, 4), box(0, 4, 0, 2), EMPTY, box(5, 8, 5, 8), box(0, 4, 0, 4)],
        [EMPTY, EMPTY, EMPTY, target, target, EMPTY, target],
    )
    # sample: 0 TP, 1 TP, 2 FN (pred 8 px), 3 TN (I 8, U 16), 4 FP (U 16), 5 FN (pred 9 px), 6 TN (16/16)
    out = m.compute()
    assert (out["TP"], out["FN"], out["FP"], out["TN"]) == (2.0, 2.0, 1.0, 2.0)
    assert out["count"] == 7.0 and out["count_no_target"] == 4.0
    assert out["gIoU"] == pytest.approx((1 + 1 + 0 + 0.5 + 0 + 0 + 1) / 7)
    # the false positives' areas (8 and 9) are in the union
    assert out["cIoU"] == pytest.approx((8 + 16) / (8 + 16 + 16 + 9 + 16))
    assert out["N-acc"] == pytest.approx(2 / 4)
    assert out["T-acc"] == pytest.approx(2 / 3)
    assert out["N-acc_rela"] == pytest.approx(2 / 5)
    assert out["T-acc_rela"] == pytest.approx(2 / 4)
    # Pr@X over the 3 targeted samples only (IoUs 0.5, 0, 1)
    assert out["Pr@0.7"] == pytest.approx(1 / 3)
    assert out["Pr@0.9"] == pytest.approx(1 / 3)


def test_gres_false_positive_prediction_on_no_target_grows_the_union():
    m = GRESMetric()
    m.update([box(0, 2, 0, 2)], [box(0, 2, 0, 4)])  # TN: I 4, U 8
    assert m.compute()["cIoU"] == pytest.approx(4 / 8)
    m.update([box(6, 8, 6, 8)], [EMPTY])  # empty GT, 4-pixel prediction: FN
    out = m.compute()
    assert out["cIoU"] == pytest.approx(4 / 12)
    assert out["gIoU"] == pytest.approx(0.25)
    assert out["N-acc"] == 0.0 and out["FN"] == 1.0


def test_gres_single_pixel_full_masks_and_unions():
    m = GRESMetric()
    # a list of predicted masks is unioned: two single pixels against a 2-pixel target
    m.update([[pixel(0, 0), pixel(0, 1)]], [box(0, 1, 0, 2)])
    m.update([torch.stack([FULL, EMPTY])], [torch.stack([FULL])])
    m.update([torch.zeros(0, H, W, dtype=torch.bool)], [EMPTY])  # no predicted mask: empty, TP
    out = m.compute()
    assert out["gIoU"] == 1.0 and out["cIoU"] == 1.0
    assert (out["TP"], out["TN"]) == (1.0, 2.0)


def test_gres_without_no_target_samples():
    m = GRESMetric()
    m.update([box(0, 2, 0, 2), EMPTY], [box(0, 2, 0, 2), box(0, 2, 0, 2)])
    out = m.compute()
    assert math.isnan(out["N-acc"])
    assert out["T-acc"] == 0.5
    # ReLA reports both accuracies as 0 when a split has no no-target sample
    assert out["N-acc_rela"] == 0.0 and out["T-acc_rela"] == 0.0
    assert out["Pr@0.7"] == 0.5


def test_gres_only_correct_rejections():
    m = GRESMetric()
    m.update([EMPTY, EMPTY], [EMPTY, EMPTY])
    out = m.compute()
    assert out["gIoU"] == 1.0 and out["cIoU"] == 1.0 and out["N-acc"] == 1.0
    assert out["N-acc_rela"] == pytest.approx(2 / 3)
    assert math.isnan(out["T-acc"]) and math.isnan(out["Pr@0.7"])


def test_gres_shape_checks():
    m = GRESMetric()
    with pytest.raises(SamtokError, match="sample 0"):
        m.update([torch.zeros(H + 1, W, dtype=torch.bool)], [EMPTY])
    with pytest.raises(SamtokError, match="empty list"):
        m.update([[]], [EMPTY])
    with pytest.raises(SamtokError, match=r"sample 0 prediction\[1\]"):
        m.update([[EMPTY, torch.zeros(3, 3, dtype=torch.bool)]], [EMPTY])


# ------------------------------------------------------------------------------------------------
# multi-round


def test_multi_round_per_round_values():
    m = MultiRoundMetric(num_rounds=3)
    m.update([box(0, 2, 0, 2), box(0, 4, 0, 4)], [box(0, 2, 0, 4), box(0, 4, 0, 4)], [1, 1])
    m.update([EMPTY], [box(0, 1, 0, 1)], torch.tensor([3]))
    out = m.compute()
    assert out["gIoU@round1"] == pytest.approx(0.75)
    assert out["cIoU@round1"] == pytest.approx((4 + 16) / (8 + 16))
    assert out["count@round1"] == 2.0
    assert math.isnan(out["gIoU@round2"]) and out["count@round2"] == 0.0
    assert out["gIoU@round3"] == 0.0 and out["cIoU@round3"] == 0.0
    assert out["gIoU"] == pytest.approx(0.5) and out["count"] == 3.0
    assert "gIoU@round4" not in out
    with pytest.warns(UserWarning, match="before the ``update``"):
        assert len([k for k in MultiRoundMetric().compute() if k.startswith("cIoU@round")]) == 10


def test_multi_round_rejects_bad_rounds():
    m = MultiRoundMetric()
    with pytest.raises(SamtokError, match="sample 0: round index 0"):
        m.update([EMPTY], [EMPTY], [0])
    with pytest.raises(SamtokError, match="round index 11"):
        m.update([EMPTY], [EMPTY], [11])
    with pytest.raises(SamtokError, match="round indices"):
        m.update([EMPTY], [EMPTY], [1, 2])


# ------------------------------------------------------------------------------------------------
# tokenizer reconstruction


def area_mask(n, h=100, w=100):
    m = np.zeros(h * w, bool)
    m[:n] = True
    return m.reshape(h, w)


def test_reconstruction_bins_by_area_fraction():
    m = MaskReconstructionMetric()
    # areas on a 100x100 image: 19 px = 0.19%, 20 px = 0.2% exactly (lower bound is inclusive)
    areas = [19, 20, 49, 50, 100, 299, 300, 999, 1000, 10000]
    targets = [area_mask(a) for a in areas]
    preds = [area_mask(a // 2) for a in areas]  # IoU = floor(a/2) / a
    m.update(preds, targets)
    out = m.compute()
    ious = [(a // 2) / a for a in areas]
    assert out["count"] == 10.0
    assert out["rMaskIoU"] == pytest.approx(sum(ious) / 10)
    expected = {"<0.2%": [0], "0.2-0.5%": [1, 2], "0.5-1%": [3], "1-3%": [4, 5], "3-10%": [6, 7], ">10%": [8, 9]}
    for label, idx in expected.items():
        assert out[f"count[{label}]"] == float(len(idx)), label
        assert out[f"rMaskIoU[{label}]"] == pytest.approx(sum(ious[i] for i in idx) / len(idx)), label


def test_reconstruction_edge_cases():
    m = MaskReconstructionMetric()
    m.update([EMPTY, EMPTY, pixel(0, 0), FULL], [EMPTY, pixel(1, 1), pixel(0, 0), FULL])
    out = m.compute()
    assert out["rMaskIoU"] == pytest.approx((1 + 0 + 1 + 1) / 4)
    assert out["count[<0.2%]"] == 1.0  # the empty GT (area 0), reconstructed as empty: IoU 1
    assert out["rMaskIoU[<0.2%]"] == 1.0
    assert out["count[1-3%]"] == 2.0 and out["rMaskIoU[1-3%]"] == 0.5  # 1 px of 100 = 1%
    assert out["count[0.5-1%]"] == 0.0
    assert out["count[>10%]"] == 1.0
    with pytest.warns(UserWarning, match="before the ``update``"):
        assert math.isnan(MaskReconstructionMetric().compute()["rMaskIoU[3-10%]"])
    with pytest.raises(SamtokError, match="sample 0"):
        m.update([EMPTY], [torch.zeros(5, 5, dtype=torch.bool)])
