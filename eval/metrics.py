"""Segmentation metrics of the SAMTok evaluation protocols (spec §5) as torchmetrics ``Metric``s.

All metrics

* take masks as torch bool tensors (any device) or numpy arrays; integer/float masks holding two
  values ``{0, v}`` are accepted too (see :func:`samtok.core.masks.as_bool_mask`). An all-False
  mask is an empty prediction / empty target;
* check that prediction and target of a sample have the same ``(H, W)`` and raise
  :class:`~samtok.core.errors.SamtokError` naming the sample (index within the ``update`` call);
* keep **per-sample** numbers (intersection, union, areas ...) in ``"cat"`` states and derive
  everything in ``compute()``. Integers are stored exactly (float64 states: exact below 2^53) and
  float sums use ``math.fsum`` (correctly rounded, order-independent), so the result under DDP is
  *exactly* the single-process result whatever the order in which ranks saw the samples;
* return a ``dict`` of Python floats in [0, 1] (not percentages) from ``compute()``; ratios
  whose denominator is zero are NaN unless a convention below says otherwise.

IoU thresholds (``Pr@X``) are compared exactly, in rational arithmetic: a sample counts when
``I / U >= X`` (as the ReLA reference code does with ``>=``).

Metrics: :class:`RESMetric` (RefCOCO/+/g), :class:`GRESMetric` (gRefCOCO), :class:`GCGMetric`
(GLaMM's GCG protocol; pure pieces in :mod:`samtok.eval.gcg`, captions in
:mod:`samtok.eval.captions`), :class:`MultiRoundMetric`, :class:`MaskReconstructionMetric`
(tokenizer rMaskIoU).
"""

from __future__ import annotations

import math
from fractions import Fraction
from typing import Any, Sequence

import numpy as np
import torch
from torchmetrics import Metric

from samtok.core.errors import SamtokError
from samtok.core.masks import as_bool_mask
from samtok.eval.captions import caption_scores, strip_grounding_markup
from samtok.eval.gcg import (
    IOU_THRESHOLD,
    TEXT_SIM_THRESHOLD,
    PhraseSimilarity,
    coco_ap50,
    greedy_pairing_miou,
    greedy_phrase_matches,
    iou_matrix,
    resolve_phrase_similarity,
)

__all__ = [
    "RESMetric",
    "GRESMetric",
    "GCGMetric",
    "MultiRoundMetric",
    "MaskReconstructionMetric",
    "AREA_BINS",
]

NAN = float("nan")

# ------------------------------------------------------------------------------------------------
# mask helpers


def _to_mask(x: Any, where: str):
    """A 2-D bool mask: torch bool tensors stay tensors (on their device), the rest becomes numpy."""
    if isinstance(x, torch.Tensor) and x.dtype == torch.bool:
        if x.ndim == 3 and x.shape[0] == 1:
            x = x[0]
        if x.ndim != 2 or x.shape[0] == 0 or x.shape[1] == 0:
            raise SamtokError(f"{where}: expected a 2-D (H, W) mask, got shape {tuple(x.shape)}")
        return x
    return as_bool_mask(x, where)


def _union_mask(x: Any, where: str):
    """One 2-D mask from a mask, an ``(K, H, W)`` stack or a list of masks (their union)."""
    if isinstance(x, (list, tuple)):
        if len(x) == 0:
            raise SamtokError(
                f"{where}: an empty list of masks has no image size; pass an all-False (H, W) mask "
                "(or an empty (0, H, W) stack) for an empty prediction"
            )
        masks = [_to_numpy(_to_mask(m, f"{where}[{k}]")) for k, m in enumerate(x)]
        for k, m in enumerate(masks):
            if m.shape != masks[0].shape:
                raise SamtokError(f"{where}[{k}]: mask shape {m.shape} differs from {where}[0] shape {masks[0].shape}")
        return np.logical_or.reduce(masks)
    if (isinstance(x, (torch.Tensor, np.ndarray))) and x.ndim == 3:
        if x.shape[0] == 0:
            if isinstance(x, torch.Tensor):
                return torch.zeros(tuple(x.shape[1:]), dtype=torch.bool, device=x.device)
            return np.zeros(x.shape[1:], dtype=bool)
        if isinstance(x, torch.Tensor) and x.dtype == torch.bool:
            return x.any(dim=0)
        return np.logical_or.reduce([as_bool_mask(m, f"{where}[{k}]") for k, m in enumerate(x)])
    return _to_mask(x, where)


def _to_numpy(m) -> np.ndarray:
    return m.detach().cpu().numpy() if isinstance(m, torch.Tensor) else m


def _overlap(pred, target, where: str) -> tuple[int, int, int, int]:
    """``(|p ∧ t|, |p ∨ t|, |p|, |t|)`` of two 2-D bool masks of the same shape."""
    if tuple(pred.shape) != tuple(target.shape):
        raise SamtokError(
            f"{where}: prediction shape {tuple(pred.shape)} does not match target shape {tuple(target.shape)}"
        )
    if isinstance(pred, torch.Tensor) and isinstance(target, torch.Tensor):
        if target.device != pred.device:
            target = target.to(pred.device)
        vals = torch.stack([(pred & target).sum(), (pred | target).sum(), pred.sum(), target.sum()]).tolist()
        return int(vals[0]), int(vals[1]), int(vals[2]), int(vals[3])
    p, t = _to_numpy(pred), _to_numpy(target)
    return (
        int(np.count_nonzero(p & t)),
        int(np.count_nonzero(p | t)),
        int(np.count_nonzero(p)),
        int(np.count_nonzero(t)),
    )


def _sample_overlap(preds: Sequence[Any], targets: Sequence[Any], k: int) -> tuple[int, int, int, int]:
    """:func:`_overlap` of sample ``k`` (2-D masks), errors naming the sample."""
    where = f"sample {k}"
    return _overlap(_to_mask(preds[k], f"{where} prediction"), _to_mask(targets[k], f"{where} target"), where)


def _check_lengths(preds: Sequence, targets: Sequence, what: str = "targets") -> int:
    if len(preds) != len(targets):
        raise SamtokError(f"got {len(preds)} predictions but {len(targets)} {what}")
    return len(preds)


def _fraction(x: float) -> Fraction:
    """Exact rational of a threshold written in decimal (0.7 → 7/10, not the binary float)."""
    return Fraction(str(x))


def _threshold_key(prefix: str, t: float) -> str:
    return f"{prefix}@{t:g}"


def _count_at_least(inter: np.ndarray, union: np.ndarray, t: Fraction) -> int:
    """How many samples have ``I/U >= t``, exactly; an empty union (IoU 1 by convention) counts."""
    i = inter.astype(np.int64)
    u = union.astype(np.int64)
    ok = (u == 0) | (i * t.denominator >= t.numerator * u)
    return int(np.count_nonzero(ok))


def _sample_ious(inter: np.ndarray, union: np.ndarray) -> np.ndarray:
    """Per-sample IoU, 1.0 where the union is empty (empty prediction of an empty target)."""
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(union > 0, inter / np.where(union > 0, union, 1.0), 1.0)


def _mean(values: np.ndarray) -> float:
    return math.fsum(values.tolist()) / len(values) if len(values) else NAN


def _ratio(num: float, den: float, empty: float = NAN) -> float:
    return float(num) / float(den) if den else empty


# ------------------------------------------------------------------------------------------------
# base class


class _PerSampleMetric(Metric):
    """Keeps one float64 ``"cat"`` state per field; subclasses append one value per sample."""

    is_differentiable = False
    higher_is_better = True
    full_state_update = False
    _fields: tuple[str, ...] = ()

    def __init__(self, **kwargs: Any):
        super().__init__(**kwargs)
        for name in self._fields:
            self.add_state(name, default=[], dist_reduce_fx="cat")
        # float64 everywhere: exact integers, and the empty placeholder torchmetrics gathers from a
        # rank that saw no sample (created with the metric's dtype) matches the other ranks' dtype.
        self.set_dtype(torch.float64)

    def _append(self, **columns: Sequence[float]) -> None:
        for name, values in columns.items():
            getattr(self, name).append(torch.tensor(list(values), dtype=torch.float64, device=self.device))

    def _columns(self) -> dict[str, np.ndarray]:
        out = {}
        for name in self._fields:
            v = getattr(self, name)
            if isinstance(v, list):
                v = torch.cat([t.reshape(-1) for t in v]) if v else torch.zeros(0, dtype=torch.float64)
            out[name] = v.detach().double().cpu().numpy().reshape(-1)
        return out


# ------------------------------------------------------------------------------------------------
# RES


class RESMetric(_PerSampleMetric):
    """Referring expression segmentation (RefCOCO/+/g): one prediction per referring sentence.

    ``update(preds, targets)``: two equally long sequences of ``(H, W)`` masks, one per sample.

    ``compute()`` keys:

    * ``"cIoU"`` = ΣI / ΣU over all samples (1.0 if ΣU = 0: nothing to find and nothing predicted);
    * ``"gIoU"`` = mean per-sample IoU; a sample with an empty union scores 1;
    * ``"Pr@0.5"`` … ``"Pr@0.9"`` = fraction of samples with IoU ≥ threshold (``iou_thresholds``);
    * ``"count"`` = number of samples.
    """

    _fields = ("intersection", "union")

    def __init__(self, iou_thresholds: Sequence[float] = (0.5, 0.6, 0.7, 0.8, 0.9), **kwargs: Any):
        super().__init__(**kwargs)
        self.iou_thresholds = tuple(float(t) for t in iou_thresholds)

    def update(self, preds: Sequence[Any], targets: Sequence[Any]) -> None:
        n = _check_lengths(preds, targets)
        inter, union = [], []
        for k in range(n):
            i, u, _, _ = _sample_overlap(preds, targets, k)
            inter.append(i)
            union.append(u)
        self._append(intersection=inter, union=union)

    def compute(self) -> dict[str, float]:
        c = self._columns()
        inter, union = c["intersection"], c["union"]
        n = len(inter)
        out = {
            "cIoU": _ratio(inter.sum(), union.sum(), empty=1.0 if n else NAN),
            "gIoU": _mean(_sample_ious(inter, union)),
        }
        for t in self.iou_thresholds:
            out[_threshold_key("Pr", t)] = _ratio(_count_at_least(inter, union, _fraction(t)), n)
        out["count"] = float(n)
        return out


# ------------------------------------------------------------------------------------------------
# GRES


class GRESMetric(_PerSampleMetric):
    """Generalized referring expression segmentation (gRefCOCO), spec §5 and ReLA's evaluator.

    ``update(preds, targets)``: one prediction and one target per sample; each may be an
    ``(H, W)`` mask, an ``(K, H, W)`` stack or a list of masks, which is unioned (the model's
    predicted masks are unioned; the target is the merged GT, all-False for a no-target sample).

    Per sample (ReLA's names: "positive" = no target):

    ============  ================  ======================  ==========  ===================
    target        prediction        class                   gIoU term   adds to ΣI, ΣU
    ============  ================  ======================  ==========  ===================
    empty         empty             TP                      1           0, 0
    empty         non-empty         FN                      0           0, |pred|
    non-empty     empty             FP                      0           0, |target|
    non-empty     non-empty         TN                      I / U       I, U
    ============  ================  ======================  ==========  ===================

    ``compute()`` keys:

    * ``"gIoU"`` mean of the per-sample terms over all samples; ``"cIoU"`` = ΣI / ΣU (1.0 when
      ΣU = 0, i.e. only correctly rejected no-target samples);
    * ``"N-acc"`` = TP / (TP + FN), ``"T-acc"`` = TN / (TN + FP) (NaN without such samples);
    * ``"N-acc_rela"`` = TP / (TP + FN + 1), ``"T-acc_rela"`` = TN / (TN + FP + 1): the +1 of
      ReLA's ``gres_model/evaluation/refer_evaluation.py`` (henghuiding/ReLA, commit a389648).
      Like that code, both are 0.0 when the split has no no-target sample. That same commit
      computes ``T_acc`` as ``TP / (TP + FP + 1)`` — a typo (TP instead of TN) we do not
      reproduce. Another version of the file (commit 1e6e889) has no +1 and TN in ``T_acc``,
      i.e. our plain keys;
    * ``"Pr@0.7"``, ``"Pr@0.8"``, ``"Pr@0.9"`` = fraction of **targeted** samples (non-empty GT)
      with IoU ≥ threshold, as ReLA counts them (no-target samples are excluded from numerator
      and denominator; NaN without targeted samples);
    * ``"count"``, ``"count_no_target"``, ``"TP"``, ``"FN"``, ``"FP"``, ``"TN"``.

    A prediction is "empty" when its (unioned) mask has no pixel: in SAMTok a no-target answer
    ("No target.") or an answer whose mask spans all failed to parse.
    """

    _fields = ("intersection", "union", "pred_area", "target_area")

    def __init__(self, iou_thresholds: Sequence[float] = (0.7, 0.8, 0.9), **kwargs: Any):
        super().__init__(**kwargs)
        self.iou_thresholds = tuple(float(t) for t in iou_thresholds)

    def update(self, preds: Sequence[Any], targets: Sequence[Any]) -> None:
        n = _check_lengths(preds, targets)
        rows: dict[str, list[int]] = {f: [] for f in self._fields}
        for k in range(n):
            where = f"sample {k}"
            p = _union_mask(preds[k], f"{where} prediction")
            t = _union_mask(targets[k], f"{where} target")
            i, u, pa, ta = _overlap(p, t, where)
            for f, v in zip(self._fields, (i, u, pa, ta)):
                rows[f].append(v)
        self._append(**rows)

    def compute(self) -> dict[str, float]:
        c = self._columns()
        inter, union = c["intersection"], c["union"]
        pred_empty = c["pred_area"] == 0
        no_target = c["target_area"] == 0
        n = len(inter)
        tp = int(np.count_nonzero(no_target & pred_empty))
        fn = int(np.count_nonzero(no_target & ~pred_empty))
        fp = int(np.count_nonzero(~no_target & pred_empty))
        tn = int(np.count_nonzero(~no_target & ~pred_empty))
        # the table above reduces to I/U with IoU 1 for an empty union: TP has U = 0, FN and FP
        # have I = 0 and U = the non-empty mask's area.
        out = {
            "gIoU": _mean(_sample_ious(inter, union)),
            "cIoU": _ratio(inter.sum(), union.sum(), empty=1.0 if n else NAN),
            "N-acc": _ratio(tp, tp + fn),
            "T-acc": _ratio(tn, tn + fp),
            "N-acc_rela": tp / (tp + fn + 1) if tp + fn > 0 else 0.0,
            "T-acc_rela": tn / (tn + fp + 1) if tp + fn > 0 else 0.0,
        }
        targeted = ~no_target
        for t in self.iou_thresholds:
            hits = _count_at_least(inter[targeted], union[targeted], _fraction(t))
            out[_threshold_key("Pr", t)] = _ratio(hits, int(np.count_nonzero(targeted)))
        out.update({
            "count": float(n), "count_no_target": float(tp + fn),
            "TP": float(tp), "FN": float(fn), "FP": float(fp), "TN": float(tn),
        })
        return out


# ------------------------------------------------------------------------------------------------
# multi-round


class MultiRoundMetric(_PerSampleMetric):
    """Multi-round interactive segmentation: cIoU and gIoU per round ``1 … num_rounds``.

    ``update(preds, targets, rounds)``: masks as for :class:`RESMetric` plus the 1-based round
    index of each sample (sequence of ints or an integer tensor).

    ``compute()`` keys, for every round r in ``1 … num_rounds``: ``"cIoU@round{r}"``,
    ``"gIoU@round{r}"`` (NaN for a round without samples), ``"count@round{r}"``; and over all
    rounds together ``"cIoU"``, ``"gIoU"``, ``"count"``. Same conventions as :class:`RESMetric`.
    """

    _fields = ("round", "intersection", "union")

    def __init__(self, num_rounds: int = 10, **kwargs: Any):
        super().__init__(**kwargs)
        if num_rounds < 1:
            raise SamtokError(f"num_rounds must be >= 1, got {num_rounds}")
        self.num_rounds = int(num_rounds)

    def update(self, preds: Sequence[Any], targets: Sequence[Any], rounds: Sequence[int] | torch.Tensor) -> None:
        n = _check_lengths(preds, targets)
        rounds_list = rounds.tolist() if isinstance(rounds, (torch.Tensor, np.ndarray)) else list(rounds)
        _check_lengths(preds, rounds_list, "round indices")
        inter, union, rr = [], [], []
        for k in range(n):
            r = rounds_list[k]
            is_number = isinstance(r, (int, float, np.integer)) and not isinstance(r, bool)
            if not is_number or not math.isfinite(r) or int(r) != r or not 1 <= r <= self.num_rounds:
                raise SamtokError(f"sample {k}: round index {r!r} is not an integer in [1, {self.num_rounds}]")
            i, u, _, _ = _sample_overlap(preds, targets, k)
            inter.append(i)
            union.append(u)
            rr.append(int(r))
        self._append(round=rr, intersection=inter, union=union)

    def compute(self) -> dict[str, float]:
        c = self._columns()
        out: dict[str, float] = {}
        for r in range(1, self.num_rounds + 1):
            sel = c["round"] == r
            inter, union = c["intersection"][sel], c["union"][sel]
            n = len(inter)
            out[f"cIoU@round{r}"] = _ratio(inter.sum(), union.sum(), empty=1.0 if n else NAN)
            out[f"gIoU@round{r}"] = _mean(_sample_ious(inter, union))
            out[f"count@round{r}"] = float(n)
        inter, union = c["intersection"], c["union"]
        out["cIoU"] = _ratio(inter.sum(), union.sum(), empty=1.0 if len(inter) else NAN)
        out["gIoU"] = _mean(_sample_ious(inter, union))
        out["count"] = float(len(inter))
        return out


# ------------------------------------------------------------------------------------------------
# tokenizer reconstruction

# (label, lower bound inclusive, upper bound exclusive) of the GT mask's area / image area
AREA_BINS: tuple[tuple[str, Fraction, Fraction | None], ...] = (
    ("<0.2%", Fraction(0), Fraction(2, 1000)),
    ("0.2-0.5%", Fraction(2, 1000), Fraction(5, 1000)),
    ("0.5-1%", Fraction(5, 1000), Fraction(1, 100)),
    ("1-3%", Fraction(1, 100), Fraction(3, 100)),
    ("3-10%", Fraction(3, 100), Fraction(10, 100)),
    (">10%", Fraction(10, 100), None),
)


class MaskReconstructionMetric(_PerSampleMetric):
    """Tokenizer reconstruction quality ("rMaskIoU"): mean per-mask IoU after encode → decode.

    ``update(preds, targets)``: decoded masks and the original (GT) masks, one pair per mask.

    ``compute()`` keys: ``"rMaskIoU"`` (mean per-mask IoU; an empty GT decoded as empty scores
    1), ``"count"``, and per bin of the GT mask's area fraction (GT pixels / image pixels)
    ``"rMaskIoU[<0.2%]"``, ``"count[<0.2%]"`` for the bins ``<0.2%``, ``0.2-0.5%``, ``0.5-1%``,
    ``1-3%``, ``3-10%``, ``>10%``. Bins include their lower bound (a mask of exactly 1% falls in
    ``1-3%``); bounds are compared exactly. An empty bin has NaN mean and count 0.
    """

    _fields = ("intersection", "union", "target_area", "num_pixels")

    def update(self, preds: Sequence[Any], targets: Sequence[Any]) -> None:
        n = _check_lengths(preds, targets)
        rows: dict[str, list[int]] = {f: [] for f in self._fields}
        for k in range(n):
            where = f"sample {k}"
            p, t = _to_mask(preds[k], f"{where} prediction"), _to_mask(targets[k], f"{where} target")
            i, u, _, ta = _overlap(p, t, where)
            for f, v in zip(self._fields, (i, u, ta, int(t.shape[0]) * int(t.shape[1]))):
                rows[f].append(v)
        self._append(**rows)

    def compute(self) -> dict[str, float]:
        c = self._columns()
        ious = _sample_ious(c["intersection"], c["union"])
        area = c["target_area"].astype(np.int64)
        pixels = c["num_pixels"].astype(np.int64)
        out = {"rMaskIoU": _mean(ious), "count": float(len(ious))}
        for label, lo, hi in AREA_BINS:
            sel = area * lo.denominator >= lo.numerator * pixels
            if hi is not None:
                sel &= area * hi.denominator < hi.numerator * pixels
            out[f"rMaskIoU[{label}]"] = _mean(ious[sel])
            out[f"count[{label}]"] = float(np.count_nonzero(sel))
        return out


# ------------------------------------------------------------------------------------------------
# GCG


def _mask_stack(x: Any, where: str) -> list[np.ndarray]:
    """A list of 2-D numpy bool masks from an ``(K, H, W)`` stack or a sequence of masks."""
    if isinstance(x, (torch.Tensor, np.ndarray)):
        if x.ndim == 2:
            raise SamtokError(f"{where}: expected a (K, H, W) stack or a list of masks, got one 2-D mask")
        if x.ndim != 3:
            raise SamtokError(f"{where}: expected a (K, H, W) stack, got shape {tuple(x.shape)}")
        items = list(x)
    else:
        items = list(x)
    masks = [_to_numpy(_to_mask(m, f"{where}[{k}]")) for k, m in enumerate(items)]
    for k, m in enumerate(masks):
        if m.shape != masks[0].shape:
            raise SamtokError(f"{where}[{k}]: mask shape {m.shape} differs from {where}[0] shape {masks[0].shape}")
    return masks


def _encode_rle_bytes(mask: np.ndarray) -> bytes:
    from pycocotools import mask as coco_mask

    return coco_mask.encode(np.asfortranarray(mask.astype(np.uint8)))["counts"]


def _bytes_column(chunks: Sequence[bytes]) -> tuple[list[int], list[int]]:
    """Concatenated byte values and per-chunk lengths (stored as float64 states)."""
    data: list[int] = []
    lengths = []
    for b in chunks:
        data.extend(b)
        lengths.append(len(b))
    return data, lengths


def _split_bytes(data: np.ndarray, lengths: np.ndarray) -> list[bytes]:
    raw = data.astype(np.uint8).tobytes()
    out, pos = [], 0
    for n in lengths.astype(np.int64).tolist():
        out.append(raw[pos : pos + n])
        pos += n
    return out


class GCGMetric(_PerSampleMetric):
    """Grounded conversation generation, GLaMM protocol (details in :mod:`samtok.eval.gcg`).

    ``update(pred_masks, target_masks, pred_phrases=None, target_phrases=None,
    pred_captions=None, target_captions=None, image_ids=None)``, all sequences over images:

    * ``pred_masks[i]`` / ``target_masks[i]``: the image's masks, a ``(K, H, W)`` stack or a list
      of ``(H, W)`` masks (K may be 0);
    * ``pred_phrases[i]`` / ``target_phrases[i]``: one phrase per mask, in mask order (needed for
      recall; give them in every update or in none);
    * ``pred_captions[i]``: the generated caption; ``target_captions[i]``: one reference string or a
      list of them (needed for caption metrics; every update or none). Special tokens such as
      ``<|object_ref_start|>`` and mask words are stripped first (``strip_markup``);
    * ``image_ids``: optional unique ints (COCO image ids). AP50 with all scores equal depends on
      the order of images (pycocotools sorts by id, ties resolved in that order); without ids,
      images are numbered in the order they were gathered (rank 0's first under DDP).

    ``compute()`` keys: ``"AP50"`` (NaN without GT masks), ``"mIoU"``, ``"recall"`` (GLaMM's
    greedy matching with its early stop), ``"recall_admissible"`` (same without the early stop),
    ``"num_images"``, ``"num_gt_masks"``, ``"num_pred_masks"``, ``"num_gt_phrases"``,
    ``"phrase_similarity"`` (the similarity's name, a string), and with captions ``"BLEU-1"`` …
    ``"BLEU-4"``, ``"METEOR (exact-match only)"``, ``"ROUGE-L"``, ``"CIDEr-D"``
    (:mod:`samtok.eval.captions`).

    Conventions (GLaMM's): a pair of masks whose union is empty has IoU 0 (GLaMM gets 0/0 = NaN
    there, which would end its pairing loop early); recall without phrases is NaN.
    """

    _fields = (
        "img_id", "img_h", "img_w", "img_miou", "img_n_pred", "img_n_gt",
        "img_has_phrases", "img_n_gt_phrases", "img_matches", "img_matches_admissible",
        "gt_rle", "gt_rle_len", "pred_rle", "pred_rle_len",
        "img_has_caption", "hyp_text", "hyp_text_len", "ref_text", "ref_text_len", "img_n_refs",
    )

    def __init__(
        self,
        phrase_similarity: PhraseSimilarity | str | None = None,
        iou_threshold: float = IOU_THRESHOLD,
        text_sim_threshold: float = TEXT_SIM_THRESHOLD,
        strip_markup: bool = True,
        **kwargs: Any,
    ):
        super().__init__(**kwargs)
        self.phrase_similarity = resolve_phrase_similarity(phrase_similarity)
        self.iou_threshold = float(iou_threshold)
        self.text_sim_threshold = float(text_sim_threshold)
        self.strip_markup = strip_markup

    def update(
        self,
        pred_masks: Sequence[Any],
        target_masks: Sequence[Any],
        pred_phrases: Sequence[Sequence[str]] | None = None,
        target_phrases: Sequence[Sequence[str]] | None = None,
        pred_captions: Sequence[str] | None = None,
        target_captions: Sequence[str | Sequence[str]] | None = None,
        image_ids: Sequence[int] | None = None,
    ) -> None:
        n = _check_lengths(pred_masks, target_masks, "target mask sets")
        if (pred_phrases is None) != (target_phrases is None):
            raise SamtokError("give both pred_phrases and target_phrases, or neither")
        if (pred_captions is None) != (target_captions is None):
            raise SamtokError("give both pred_captions and target_captions, or neither")
        for name, seq in (("pred_phrases", pred_phrases), ("target_phrases", target_phrases),
                          ("pred_captions", pred_captions), ("target_captions", target_captions),
                          ("image_ids", image_ids)):
            if seq is not None and len(seq) != n:
                raise SamtokError(f"{name} has {len(seq)} entries for {n} images")
        rows: dict[str, list] = {f: [] for f in self._fields}
        gt_chunks: list[bytes] = []
        pred_chunks: list[bytes] = []
        hyp_chunks: list[bytes] = []
        ref_chunks: list[bytes] = []
        for k in range(n):
            where = f"image {k}"
            preds = _mask_stack(pred_masks[k], f"{where} predictions")
            gts = _mask_stack(target_masks[k], f"{where} targets")
            shapes = {m.shape for m in preds + gts}
            if len(shapes) > 1:
                raise SamtokError(f"{where}: predicted masks {preds[0].shape if preds else None} and target masks "
                                  f"{gts[0].shape if gts else None} differ in shape")
            h, w = shapes.pop() if shapes else (0, 0)
            ious = iou_matrix(preds, gts)  # (pred, gt)
            rows["img_id"].append(-1 if image_ids is None else int(image_ids[k]))
            rows["img_h"].append(h)
            rows["img_w"].append(w)
            rows["img_miou"].append(greedy_pairing_miou(ious))
            rows["img_n_pred"].append(len(preds))
            rows["img_n_gt"].append(len(gts))
            if pred_phrases is not None:
                pp, tp = [str(s) for s in pred_phrases[k]], [str(s) for s in target_phrases[k]]
                if len(pp) != len(preds):
                    raise SamtokError(f"{where}: {len(pp)} predicted phrases for {len(preds)} predicted masks")
                if len(tp) != len(gts):
                    raise SamtokError(f"{where}: {len(tp)} target phrases for {len(gts)} target masks")
                sims = (self.phrase_similarity(tp, pp) if tp and pp else np.zeros((len(tp), len(pp))))
                sims = np.asarray(sims, dtype=np.float64)
                if sims.shape != (len(tp), len(pp)):
                    raise SamtokError(f"phrase similarity returned shape {sims.shape}, expected {(len(tp), len(pp))}")
                m = greedy_phrase_matches(ious.T, sims, self.iou_threshold, self.text_sim_threshold, "glamm")
                ma = greedy_phrase_matches(ious.T, sims, self.iou_threshold, self.text_sim_threshold, "admissible")
                rows["img_has_phrases"].append(1)
                rows["img_n_gt_phrases"].append(len(tp))
                rows["img_matches"].append(len(m))
                rows["img_matches_admissible"].append(len(ma))
            else:
                rows["img_has_phrases"].append(0)
                rows["img_n_gt_phrases"].append(0)
                rows["img_matches"].append(0)
                rows["img_matches_admissible"].append(0)
            gt_chunks.extend(_encode_rle_bytes(m) for m in gts)
            pred_chunks.extend(_encode_rle_bytes(m) for m in preds)
            if pred_captions is not None:
                hyp = str(pred_captions[k])
                refs = target_captions[k]
                refs = [refs] if isinstance(refs, str) else [str(r) for r in refs]
                if not refs:
                    raise SamtokError(f"{where}: no reference caption")
                if self.strip_markup:
                    hyp = strip_grounding_markup(hyp)
                    refs = [strip_grounding_markup(r) for r in refs]
                rows["img_has_caption"].append(1)
                hyp_chunks.append(hyp.encode("utf-8"))
                ref_chunks.extend(r.encode("utf-8") for r in refs)
                rows["img_n_refs"].append(len(refs))
            else:
                rows["img_has_caption"].append(0)
                rows["img_n_refs"].append(0)
        rows["gt_rle"], rows["gt_rle_len"] = _bytes_column(gt_chunks)
        rows["pred_rle"], rows["pred_rle_len"] = _bytes_column(pred_chunks)
        rows["hyp_text"], rows["hyp_text_len"] = _bytes_column(hyp_chunks)
        rows["ref_text"], rows["ref_text_len"] = _bytes_column(ref_chunks)
        self._append(**rows)

    def compute(self) -> dict[str, Any]:
        c = self._columns()
        n_img = len(c["img_id"])
        ids = c["img_id"].astype(np.int64)
        if n_img and (ids < 0).any():
            if not (ids < 0).all():
                raise SamtokError("image_ids were given in some updates and not in others")
            ids = np.arange(1, n_img + 1, dtype=np.int64)
        if len(set(ids.tolist())) != n_img:
            raise SamtokError("image_ids are not unique")
        n_pred = c["img_n_pred"].astype(np.int64)
        n_gt = c["img_n_gt"].astype(np.int64)
        gt_rles = _split_bytes(c["gt_rle"], c["gt_rle_len"])
        pred_rles = _split_bytes(c["pred_rle"], c["pred_rle_len"])
        images, gt_list, pred_list = [], [], []
        gpos = ppos = 0
        for k in range(n_img):
            h, w = int(c["img_h"][k]), int(c["img_w"][k])
            image_id = int(ids[k])
            if h > 0:
                images.append((image_id, h, w))
            for b in gt_rles[gpos : gpos + n_gt[k]]:
                gt_list.append((image_id, {"size": [h, w], "counts": b}))
            for b in pred_rles[ppos : ppos + n_pred[k]]:
                pred_list.append((image_id, {"size": [h, w], "counts": b}))
            gpos += int(n_gt[k])
            ppos += int(n_pred[k])

        has_phr = c["img_has_phrases"]
        if n_img and has_phr.min() != has_phr.max():
            raise SamtokError("phrases were given in some updates and not in others")
        n_gt_phr = int(c["img_n_gt_phrases"].sum())
        with_phrases = bool(n_img and has_phr.max() == 1)
        out: dict[str, Any] = {
            "AP50": coco_ap50(images, gt_list, pred_list) if n_img else NAN,
            "mIoU": _mean(c["img_miou"]),
            "recall": _ratio(c["img_matches"].sum(), n_gt_phr) if with_phrases else NAN,
            "recall_admissible": _ratio(c["img_matches_admissible"].sum(), n_gt_phr) if with_phrases else NAN,
            "num_images": float(n_img),
            "num_gt_masks": float(n_gt.sum()),
            "num_pred_masks": float(n_pred.sum()),
            "num_gt_phrases": float(n_gt_phr),
            "phrase_similarity": self.phrase_similarity.name,
        }
        has_cap = c["img_has_caption"]
        if n_img and has_cap.min() != has_cap.max():
            raise SamtokError("captions were given in some updates and not in others")
        if n_img and has_cap.max() == 1:
            hyps = [b.decode("utf-8") for b in _split_bytes(c["hyp_text"], c["hyp_text_len"])]
            all_refs = [b.decode("utf-8") for b in _split_bytes(c["ref_text"], c["ref_text_len"])]
            refs, pos = [], 0
            for r in c["img_n_refs"].astype(np.int64).tolist():
                refs.append(all_refs[pos : pos + r])
                pos += r
            out.update(caption_scores(hyps, refs))
        return out

