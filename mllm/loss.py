"""Next-token loss and token-accuracy metrics on (logits, labels) pairs.

:func:`causal_lm_loss` is the same computation as transformers' ``ForCausalLMLoss`` (labels shifted
left by one, -100 ignored, float32 cross-entropy, mean over counted tokens or sum / ``num_items``),
so a training loop may compute the loss itself — e.g. to also report accuracy on mask tokens — and
get the number ``outputs.loss`` would have given (a test checks this on Qwen-VL batches).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from samtok.mllm.sequences import IGNORE_INDEX


def shift_for_next_token(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Align predictions with targets: ``logits[:, t]`` predicts ``labels[:, t + 1]``.

    Returns ``(logits (B·(L-1), V), targets (B·(L-1),))``.
    """
    if logits.shape[:2] != labels.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)} disagree")
    shifted = logits[:, :-1, :].reshape(-1, logits.shape[-1])
    targets = labels[:, 1:].reshape(-1).to(shifted.device)
    return shifted, targets


def causal_lm_loss(
    logits: torch.Tensor, labels: torch.Tensor, num_items_in_batch: Optional[int | torch.Tensor] = None
) -> torch.Tensor:
    """Mean next-token cross-entropy over labelled positions (float32).

    Args:
        logits: ``(B, L, V)``.
        labels: ``(B, L)`` with -100 where nothing is learned (unshifted, as in the batch).
        num_items_in_batch: divide the summed loss by this instead (gradient accumulation across
            micro-batches with different token counts, as transformers does).
    """
    shifted, targets = shift_for_next_token(logits.float(), labels)
    if num_items_in_batch is None:
        return F.cross_entropy(shifted, targets, ignore_index=IGNORE_INDEX, reduction="mean")
    total = F.cross_entropy(shifted, targets, ignore_index=IGNORE_INDEX, reduction="sum")
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(total.device)
    return total / num_items_in_batch


@dataclass
class TokenAccuracy:
    """Greedy next-token accuracy over a subset of target tokens; add them up across batches."""

    correct: int = 0
    total: int = 0

    @property
    def value(self) -> float:
        """correct / total, or NaN when no token was counted."""
        return self.correct / self.total if self.total else float("nan")

    def __add__(self, other: "TokenAccuracy") -> "TokenAccuracy":
        return TokenAccuracy(self.correct + other.correct, self.total + other.total)


@torch.no_grad()
def token_accuracy(
    logits: torch.Tensor, labels: torch.Tensor, token_ids: Optional[Sequence[int] | torch.Tensor] = None
) -> TokenAccuracy:
    """Argmax accuracy at labelled positions whose target is in ``token_ids`` (all labelled if None)."""
    shifted, targets = shift_for_next_token(logits, labels)
    keep = targets != IGNORE_INDEX
    if token_ids is not None:
        ids = torch.as_tensor(list(token_ids) if not torch.is_tensor(token_ids) else token_ids, device=targets.device)
        keep &= torch.isin(targets, ids)
    if not bool(keep.any()):
        return TokenAccuracy(0, 0)
    pred = shifted[keep].argmax(dim=-1)
    return TokenAccuracy(int((pred == targets[keep]).sum()), int(keep.sum()))


def mask_token_accuracy(
    logits: torch.Tensor, labels: torch.Tensor, mask_token_ids: Sequence[int] | torch.Tensor
) -> TokenAccuracy:
    """Next-token accuracy on mask words only (pass all 514 ids, or only the 512 code ids).

    Args:
        logits: ``(B, L, V)`` model outputs.
        labels: ``(B, L)`` unshifted labels with -100 at ignored positions.
        mask_token_ids: ids counted (``samtok.mllm.vocab.mask_token_ids(tokenizer)``).

    Returns:
        :class:`TokenAccuracy` (``.value`` is the accuracy; counts add up across batches).
    """
    return token_accuracy(logits, labels, mask_token_ids)
