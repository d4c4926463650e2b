"""GRPO objective in plain torch: group-normalised advantages, clipped surrogate, k3 KL, aggregation.

No trainer, no model: inputs are per-token log-probabilities that the caller computed. Shapes:
``B`` completions (``num_prompts × G``, the ``G`` completions of one prompt consecutive), ``T``
completion positions (right-padded); ``completion_mask`` is 1 on real completion tokens, 0 on padding.
Log-probabilities are natural-log probabilities of the sampled tokens, shape (B, T).

The formulas follow TRL's ``GRPOTrainer`` (1.16) for the shared options, and
``tests/test_grpo_parity.py`` checks them against TRL's own code on the same numbers:

* advantage ``A_i = (r_i − mean_group(r)) / (std + eps)`` (std: Bessel-corrected, of the group or of
  the whole batch; no scaling for ``scale_rewards="none"``); NaN rewards (unscorable completions)
  are left out of the group statistics and get advantage 0;
* ratio ``ρ = exp(logp − logp_old)``; with ``old_logps=None`` (one update per generation batch,
  ``num_iterations = 1``) ``logp_old = logp.detach()``: ρ = 1 but its gradient is the policy gradient;
* per-token loss ``−min(ρ·A, clip(ρ, 1−ε_low, 1+ε_high)·A) + β·KL``, with the low-variance (k3)
  estimator ``KL = exp(ref − logp) − (ref − logp) − 1`` (≥ 0; its mean over tokens sampled from the
  policy is an unbiased estimate of KL(π‖π_ref));
* aggregation ``"grpo"``: mean over each sequence's tokens, then over sequences; ``"dapo"``: sum over
  all tokens / number of tokens (``num_items`` overrides the count, e.g. the tokens of a whole
  gradient-accumulation window); ``"dr_grpo"``: sum / (B × ``max_completion_length``).

Gradient-accumulation scaling (dividing by the number of micro-batches) is the trainer's business.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

from samtok.core.errors import SamtokError

LOSS_TYPES = ("grpo", "dapo", "dr_grpo")
SCALE_REWARDS = ("group", "batch", "none")


@dataclass
class GRPOLossConfig:
    """Options of the GRPO objective (defaults: the SAMTok RL settings of spec §4 where reported)."""

    num_generations: int = 8  # G: completions per prompt, consecutive in the batch (spec: 8)
    scale_rewards: str = "group"  # "group": divide by the group std; "batch": by the batch std; "none"
    advantage_eps: float = 1e-4  # added to the std before dividing (TRL's value)
    epsilon_low: float = 0.2  # ratio clipped below at 1 - epsilon_low
    epsilon_high: float = 0.2  # ratio clipped above at 1 + epsilon_high (DAPO suggests 0.28)
    beta: float = 0.01  # KL coefficient to the reference policy (spec: 0.01); 0: no reference needed
    loss_type: str = "grpo"  # aggregation: "grpo", "dapo" or "dr_grpo" (see module docstring)
    max_completion_length: Optional[int] = None  # dr_grpo's constant; None: the padded length T

    def __post_init__(self) -> None:
        check_loss_config(self)


def check_loss_config(cfg: GRPOLossConfig) -> None:
    """Raise :class:`SamtokError` for values the objective cannot use."""
    if cfg.num_generations < 1:
        raise SamtokError(f"num_generations must be >= 1, got {cfg.num_generations}")
    if cfg.scale_rewards not in SCALE_REWARDS:
        raise SamtokError(f"scale_rewards must be one of {SCALE_REWARDS}, got {cfg.scale_rewards!r}")
    if cfg.loss_type not in LOSS_TYPES:
        raise SamtokError(f"loss_type must be one of {LOSS_TYPES}, got {cfg.loss_type!r}")
    if not (0.0 <= cfg.epsilon_low < 1.0) or cfg.epsilon_high < 0.0:
        raise SamtokError(f"need 0 <= epsilon_low < 1 and epsilon_high >= 0, got {cfg.epsilon_low}, {cfg.epsilon_high}")
    if cfg.beta < 0.0 or cfg.advantage_eps < 0.0:
        raise SamtokError(f"beta and advantage_eps must be >= 0, got {cfg.beta}, {cfg.advantage_eps}")
    if cfg.max_completion_length is not None and cfg.max_completion_length < 1:
        raise SamtokError(f"max_completion_length must be >= 1 or None, got {cfg.max_completion_length}")


# ------------------------------------------------------------------------------ advantages


def _nanstd(x: torch.Tensor, dim: Optional[int] = None) -> torch.Tensor:
    """Bessel-corrected std ignoring NaNs (NaN when fewer than two values)."""
    if dim is None:
        x, dim = x.reshape(-1), 0
    mean = torch.nanmean(x, dim=dim, keepdim=True)
    count = (~torch.isnan(x)).sum(dim=dim, keepdim=True)
    sq = torch.nansum((x - mean) ** 2, dim=dim, keepdim=True)
    var = torch.where(count > 1, sq / (count - 1).clamp(min=1), torch.full_like(sq, float("nan")))
    return var.sqrt().squeeze(dim)


def group_advantages(rewards: torch.Tensor, num_generations: int, scale_rewards: str = "group",
                     eps: float = 1e-4) -> torch.Tensor:
    """Group-relative advantages of ``rewards`` shaped (num_prompts × G,), groups consecutive.

    Mean-centred per group; divided by ``std + eps`` with the group's (``"group"``) or the whole
    batch's (``"batch"``) Bessel-corrected std, or not at all (``"none"``). A group whose rewards
    are all equal gets zero advantages. NaN rewards are ignored in the statistics and get 0.
    A group of one (G = 1) has no spread: its advantage is 0.
    """
    if scale_rewards not in SCALE_REWARDS:
        raise SamtokError(f"scale_rewards must be one of {SCALE_REWARDS}, got {scale_rewards!r}")
    r = torch.as_tensor(rewards, dtype=torch.float32) if not isinstance(rewards, torch.Tensor) else rewards
    if r.dim() != 1 or num_generations < 1 or r.numel() % num_generations:
        raise ValueError(f"rewards must be 1-D with a multiple of num_generations={num_generations} entries, "
                         f"got shape {tuple(r.shape)}")
    grouped = r.view(-1, num_generations)
    mean = torch.nanmean(grouped, dim=1, keepdim=True)
    adv = grouped - mean
    if scale_rewards == "group":
        std = _nanstd(grouped, dim=1).unsqueeze(1) if num_generations > 1 else torch.zeros_like(mean)
        adv = adv / (std + eps)
    elif scale_rewards == "batch":
        std = _nanstd(r) if r.numel() > 1 else torch.zeros((), dtype=r.dtype, device=r.device)
        adv = adv / (std + eps)
    return torch.nan_to_num(adv.reshape(-1), nan=0.0)


# ------------------------------------------------------------------------------ per-token terms


def kl_k3(logps: torch.Tensor, ref_logps: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimate of KL(π‖π_ref): ``exp(ref − logp) − (ref − logp) − 1`` (≥ 0)."""
    d = ref_logps - logps
    return torch.exp(d) - d - 1


def importance_ratio(logps: torch.Tensor, old_logps: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``exp(logp − logp_old)``; ``old_logps=None`` means the current policy, detached (ratio 1)."""
    old = logps.detach() if old_logps is None else old_logps
    return torch.exp(logps - old)


def clipped_surrogate(ratio: torch.Tensor, advantages: torch.Tensor, epsilon_low: float = 0.2,
                      epsilon_high: float = 0.2) -> torch.Tensor:
    """Per-token PPO loss ``−min(ρ·A, clip(ρ, 1−ε_low, 1+ε_high)·A)``; ``advantages`` (B,) or (B, T).

    Outside the clip range on the side the advantage pushes towards, the loss is constant in ρ
    (no gradient): ρ > 1+ε_high with A > 0, or ρ < 1−ε_low with A < 0.
    """
    adv = advantages.unsqueeze(1) if advantages.dim() == 1 else advantages
    clipped = torch.clamp(ratio, 1 - epsilon_low, 1 + epsilon_high)
    return -torch.min(ratio * adv, clipped * adv)


def aggregate_loss(per_token_loss: torch.Tensor, completion_mask: torch.Tensor, loss_type: str = "grpo",
                   max_completion_length: Optional[int] = None, num_items: Optional[float] = None) -> torch.Tensor:
    """Reduce a (B, T) per-token loss to a scalar (see the module docstring for each ``loss_type``).

    ``num_items``: dapo's token count (default: tokens in this batch). Sequences with no token
    contribute 0 to "grpo" (their token count is clamped to 1), as in TRL.
    """
    mask = completion_mask.to(per_token_loss.dtype)
    masked = per_token_loss * mask
    if loss_type == "grpo":
        return (masked.sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    if loss_type == "dapo":
        n = mask.sum() if num_items is None else torch.as_tensor(num_items, dtype=mask.dtype, device=mask.device)
        return masked.sum() / n.clamp(min=1.0)
    if loss_type == "dr_grpo":
        length = per_token_loss.size(1) if max_completion_length is None else max_completion_length
        return masked.sum() / (per_token_loss.size(0) * length)
    raise SamtokError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")


# ------------------------------------------------------------------------------ the loss


@dataclass
class GRPOLossOutput:
    """The scalar loss (differentiable) and detached 0-d metric tensors for logging."""

    loss: torch.Tensor
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)


def _masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum() / mask.sum().clamp(min=1.0)


def grpo_loss(logps: torch.Tensor, advantages: torch.Tensor, completion_mask: torch.Tensor,
              old_logps: Optional[torch.Tensor] = None, ref_logps: Optional[torch.Tensor] = None,
              config: Optional[GRPOLossConfig] = None, num_items: Optional[float] = None) -> GRPOLossOutput:
    """The GRPO loss of one (micro-)batch and its metrics.

    Args:
        logps: (B, T) log-probs of the sampled tokens under the policy being trained (with grad).
        advantages: (B,) per-completion advantages (:func:`group_advantages`), or (B, T).
        completion_mask: (B, T) 1 for completion tokens, 0 for padding.
        old_logps: (B, T) log-probs under the policy that generated the batch; needed when the batch
            is reused for several updates (``num_iterations > 1``); ``None``: on-policy.
        ref_logps: (B, T) log-probs under the reference policy; required iff ``config.beta > 0``.
        num_items: dapo token count override (see :func:`aggregate_loss`).

    Metrics (masked token means unless said): ``kl``, ``ratio/mean``, ``clip_ratio/low_mean``
    (ρ < 1−ε_low with A < 0), ``clip_ratio/high_mean`` (ρ > 1+ε_high with A > 0),
    ``clip_ratio/region_mean`` (either), ``clip_ratio/low_min`` / ``clip_ratio/high_max`` (min / max
    over non-empty sequences of the per-sequence fractions), ``policy_loss`` (the loss without the
    KL term, same aggregation), ``num_tokens``.
    """
    cfg = config or GRPOLossConfig()
    if logps.dim() != 2 or completion_mask.shape != logps.shape:
        raise ValueError(f"logps and completion_mask must both be (B, T), got {tuple(logps.shape)} "
                         f"and {tuple(completion_mask.shape)}")
    for name, t in (("old_logps", old_logps), ("ref_logps", ref_logps)):
        if t is not None and t.shape != logps.shape:
            raise ValueError(f"{name} must have shape {tuple(logps.shape)}, got {tuple(t.shape)}")
    if cfg.beta != 0.0 and ref_logps is None:
        raise ValueError("ref_logps is required when beta != 0")
    adv = advantages.unsqueeze(1) if advantages.dim() == 1 else advantages
    mask = completion_mask.to(logps.dtype)

    ratio = importance_ratio(logps, old_logps)
    policy_per_token = clipped_surrogate(ratio, adv, cfg.epsilon_low, cfg.epsilon_high)
    per_token = policy_per_token
    kl = None
    if cfg.beta != 0.0:
        kl = kl_k3(logps, ref_logps)
        per_token = per_token + cfg.beta * kl

    def agg(x: torch.Tensor) -> torch.Tensor:
        return aggregate_loss(x, mask, cfg.loss_type, cfg.max_completion_length, num_items)

    loss = agg(per_token)
    with torch.no_grad():
        r = ratio.detach()
        low = ((r < 1 - cfg.epsilon_low) & (adv < 0)).to(mask.dtype)
        high = ((r > 1 + cfg.epsilon_high) & (adv > 0)).to(mask.dtype)
        region = torch.maximum(low, high)
        lengths = mask.sum(-1)
        nonempty = lengths > 0
        seq_low = (low * mask).sum(-1)[nonempty] / lengths[nonempty]
        seq_high = (high * mask).sum(-1)[nonempty] / lengths[nonempty]
        zero = torch.zeros((), dtype=mask.dtype, device=mask.device)
        metrics = {
            "kl": _masked_mean(kl.detach(), mask) if kl is not None else zero,
            "ratio/mean": _masked_mean(r, mask),
            "clip_ratio/low_mean": _masked_mean(low, mask),
            "clip_ratio/high_mean": _masked_mean(high, mask),
            "clip_ratio/region_mean": _masked_mean(region, mask),
            "clip_ratio/low_min": seq_low.min() if seq_low.numel() else zero,
            "clip_ratio/high_max": seq_high.max() if seq_high.numel() else zero,
            "policy_loss": agg(policy_per_token.detach()),
            "num_tokens": mask.sum(),
        }
    return GRPOLossOutput(loss=loss, metrics=metrics)
