"""Mask losses of the tokenizer (spec §1): point-sampled BCE + Dice, plus SAM's IoU-head loss.

Points are chosen as in Mask2Former: ``num_points × oversample`` random points, of which the
``importance`` fraction with the most uncertain logits (closest to 0) are kept, plus random points
for the rest. Ground truth is resized (nearest) to the logit size and sampled at the same points.
When the logit map has no more pixels than ``num_points`` the loss is simply taken on every pixel.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class MaskLossConfig:
    bce_weight: float = 2.0
    dice_weight: float = 0.5
    iou_weight: float = 1.0  # MSE between predicted and actual IoU (trains the IoU head)
    commitment_weight: float = 1.0
    num_points: int = 12544  # points per mask (112 x 112)
    oversample: float = 3.0
    importance: float = 0.75
    multimask: str = "min"  # loss over the 3 outputs: min (SAM) | best_pred (the one decode keeps) | all
    # how the GT reaches the logit size (S/4): "nearest" (the release; samples the top-left pixel of
    # each block, a shift of 1.5 px against the centre-aligned bilinear upsampling of the logits,
    # negligible at 1024 px but ~0.2 IoU on 128-px images), "nearest-exact" (block centres), or
    # "area" (antialiased coverage in [0, 1]: soft targets aligned with the upsampling)
    gt_resize: str = "nearest"


def point_sample(x: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
    """Sample ``x (N, C, H, W)`` at normalised ``coords (N, P, 2)`` in [0, 1] (x, y) → ``(N, C, P)``."""
    grid = 2.0 * coords.unsqueeze(2) - 1.0
    return F.grid_sample(x, grid, mode="bilinear", align_corners=False).squeeze(3)


@torch.no_grad()
def uncertain_points(logits: torch.Tensor, num_points: int, oversample: float, importance: float) -> torch.Tensor:
    """``logits (N, 1, H, W)`` → ``(N, P, 2)`` points, most uncertain first (Mask2Former's rule)."""
    n = logits.shape[0]
    num_sampled = int(num_points * oversample)
    coords = torch.rand(n, num_sampled, 2, device=logits.device)
    uncertainty = -point_sample(logits.float(), coords).abs().squeeze(1)  # (N, num_sampled)
    num_uncertain = int(importance * num_points)
    num_random = num_points - num_uncertain
    top = uncertainty.topk(num_uncertain, dim=1).indices
    chosen = torch.gather(coords, 1, top.unsqueeze(-1).expand(-1, -1, 2))
    if num_random > 0:
        chosen = torch.cat([chosen, torch.rand(n, num_random, 2, device=logits.device)], dim=1)
    return chosen


def sigmoid_bce(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean BCE per mask: ``(N, P)`` → ``(N,)``."""
    return F.binary_cross_entropy_with_logits(logits, targets, reduction="none").mean(dim=1)


def naive_dice(logits: torch.Tensor, targets: torch.Tensor, smooth: float = 1.0) -> torch.Tensor:
    """``1 - (2Σpg + 1) / (Σp + Σg + 1)`` per mask: ``(N, P)`` → ``(N,)``."""
    p = logits.sigmoid()
    num = 2.0 * (p * targets).sum(dim=1) + smooth
    den = p.sum(dim=1) + targets.sum(dim=1) + smooth
    return 1.0 - num / den


def mask_losses(logits: torch.Tensor, gt: torch.Tensor, cfg: MaskLossConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-mask BCE and Dice for ``logits (N, 1, h, w)`` vs ``gt (N, 1, h, w)`` (already logit-sized)."""
    n, _, h, w = logits.shape
    logits = logits.float()
    if cfg.num_points >= h * w:
        lp = logits.flatten(1)
        gp = gt.float().flatten(1)
    else:
        coords = uncertain_points(logits, cfg.num_points, cfg.oversample, cfg.importance)
        lp = point_sample(logits, coords).squeeze(1)
        gp = point_sample(gt.float(), coords).squeeze(1)
    return sigmoid_bce(lp, gp), naive_dice(lp, gp)


GT_RESIZE_MODES = ("nearest", "nearest-exact", "area")


def resize_gt(gt: torch.Tensor, size: tuple[int, int], mode: str = "nearest") -> torch.Tensor:
    """GT masks ``(N, 1, H, W)`` → logit size (see :attr:`MaskLossConfig.gt_resize`)."""
    if mode not in GT_RESIZE_MODES:
        raise ValueError(f"loss.gt_resize must be one of {GT_RESIZE_MODES}, got {mode!r}")
    if tuple(gt.shape[-2:]) == tuple(size):
        return gt.float()
    if mode == "area":
        return F.interpolate(gt.float(), size=size, mode="bilinear", align_corners=False, antialias=True)
    return F.interpolate(gt.float(), size=size, mode=mode)


@torch.no_grad()
def actual_iou(logits: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
    """IoU of ``logits > 0`` with ``gt`` per mask and output: ``(N, M, h, w)`` vs ``(N, 1, h, w)`` → ``(N, M)``."""
    pred = logits > 0
    g = gt > 0.5
    inter = (pred & g).flatten(2).sum(-1).float()
    union = (pred | g).flatten(2).sum(-1).float()
    return torch.where(union > 0, inter / union.clamp_min(1), torch.ones_like(union))


def multimask_loss(
    logits: torch.Tensor, iou_pred: torch.Tensor, gt: torch.Tensor, cfg: MaskLossConfig
) -> dict[str, torch.Tensor]:
    """SAM-style loss over ``M`` outputs ``logits (N, M, h, w)``, ``iou_pred (N, M)``, ``gt (N, 1, H, W)``.

    Returns a dict with ``loss`` (weighted), ``bce``, ``dice``, ``iou_mse`` (means over masks) and
    ``chosen`` (the output index each mask's loss was taken on).
    """
    n, m, h, w = logits.shape
    g = resize_gt(gt, (h, w), cfg.gt_resize)
    flat_logits = logits.reshape(n * m, 1, h, w)
    flat_gt = g.repeat_interleave(m, dim=0)
    bce, dice = mask_losses(flat_logits, flat_gt, cfg)
    bce, dice = bce.view(n, m), dice.view(n, m)
    per_output = cfg.bce_weight * bce + cfg.dice_weight * dice
    rows = torch.arange(n, device=logits.device)
    if cfg.multimask == "min" or m == 1:
        chosen = per_output.argmin(dim=1)
    elif cfg.multimask == "best_pred":
        chosen = iou_pred.argmax(dim=1)
    elif cfg.multimask == "all":
        chosen = None
    else:
        raise ValueError(f"loss.multimask must be min, best_pred or all, got {cfg.multimask!r}")
    if chosen is None:
        mask_loss, bce_m, dice_m = per_output.mean(1), bce.mean(1), dice.mean(1)
    else:
        mask_loss, bce_m, dice_m = per_output[rows, chosen], bce[rows, chosen], dice[rows, chosen]
    target_iou = actual_iou(logits, g)
    iou_mse = F.mse_loss(iou_pred.float(), target_iou, reduction="none").mean(dim=1)
    loss = mask_loss + cfg.iou_weight * iou_mse
    return {
        "loss": loss.mean(),
        "bce": bce_m.mean(),
        "dice": dice_m.mean(),
        "iou_mse": iou_mse.mean(),
        "chosen": chosen if chosen is not None else torch.zeros(n, dtype=torch.long, device=logits.device),
    }
