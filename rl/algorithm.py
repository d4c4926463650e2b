"""GRPO on a Qwen-VL policy in plain PyTorch: rollouts and the loss of a micro-batch (no Lightning).

One batch of ``P`` prompts becomes ``N = P × G`` completions (``G = loss.num_generations``):

1. :meth:`GRPOAlgorithm.rollout` (no gradients) repeats every prompt ``G`` times (prompt-major,
   the layout :func:`~samtok.rl.grpo.group_advantages` expects), samples the completions with the
   policy in eval mode (KV cache, dropout off), scores them with the reward function (total and
   every component), computes group-normalised advantages, and — only when needed — the per-token
   log-probs of the policy that sampled (``num_iterations > 1``) and of the reference policy
   (``beta > 0``), both at the sampling temperature.
2. :meth:`GRPOAlgorithm.loss` (with gradients) recomputes the policy's log-probs of a subset of
   the completions (a micro-batch) and returns :func:`~samtok.rl.grpo.grpo_loss` scaled so that
   the losses of the micro-batches of a batch SUM to the loss of the whole batch (``grpo`` and
   ``dr_grpo``: weight = rows / N; ``dapo``: the token count of the whole batch as ``num_items``).

The optimiser loop (``num_iterations`` steps per rollout, accumulation over micro-batches,
clipping) is the caller's: :class:`samtok.rl.lightning.GRPOLightningModule`.

Batches are the left-padded prompt batches of :class:`samtok.data.datamodule.RLDataModule`: model
tensors (``input_ids``, ``attention_mask``, ``mm_token_type_ids``, ``pixel_values``,
``image_grid_thw``) plus per-row lists (``ground_truth``, ``task``, ``prompt``, ``images``...);
:func:`select_rows` picks rows of such a batch, images included.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Mapping, Optional, Sequence

import torch
from torch import nn

from samtok.core.errors import SamtokError
from samtok.mllm.generation import SamplingConfig, completion_logprobs, generate
from samtok.rl.grpo import GRPOLossConfig, GRPOLossOutput, group_advantages, grpo_loss
from samtok.tokenizer.codec import MaskCodec

_ROW_TENSORS = ("input_ids", "attention_mask", "mm_token_type_ids")
_IMAGE_TENSORS = ("pixel_values", "image_grid_thw")
NO_TARGET_ANSWER = "No target."

RewardFn = Callable[..., Sequence[float]]
"""TRL's reward contract: ``fn(completions=[str], completion_ids=[[int]], prompts=[...], **columns) -> [float]``.
A function with a ``breakdown`` method (:class:`~samtok.rl.rewards.WeightedReward`) also reports components."""


# ------------------------------------------------------------------------------------------ batches


def images_per_row(batch: Mapping[str, Any]) -> list[int]:
    """Images of each row of a collated prompt batch (the rows' blocks of ``pixel_values``).

    Read from ``mm_token_type_ids`` (one run of image tokens, type 1, per image); without it, from
    the ``images`` lists; else one image per row.
    """
    n = int(batch["input_ids"].shape[0])
    if "pixel_values" not in batch:
        return [0] * n
    types = batch.get("mm_token_type_ids")
    if isinstance(types, torch.Tensor):
        img = (types == 1).long()
        starts = img[:, 1:] * (1 - img[:, :-1])
        return (starts.sum(1) + img[:, 0]).tolist()
    images = batch.get("images")
    if isinstance(images, list) and len(images) == n:
        return [len(x) if isinstance(x, (list, tuple)) else 1 for x in images]
    return [1] * n


def select_rows(batch: Mapping[str, Any], rows: Sequence[int]) -> dict[str, Any]:
    """The sub-batch of ``rows`` (any order, repeats allowed) of a left-padded prompt batch.

    Token tensors are indexed by row, then columns that are padding in every selected row are cut
    from the left; ``pixel_values`` / ``image_grid_thw`` keep the selected rows' image blocks in
    order; lists with one entry per row are indexed; anything else is copied as is.
    """
    rows = [int(r) for r in rows]
    n = int(batch["input_ids"].shape[0])
    if not rows or min(rows) < 0 or max(rows) >= n:
        raise IndexError(f"rows must be non-empty indices in [0, {n}), got {rows[:8]}")
    index = torch.tensor(rows, device=batch["input_ids"].device)
    out: dict[str, Any] = {}
    for key in _ROW_TENSORS:
        if key in batch:
            out[key] = batch[key].index_select(0, index)
    if "attention_mask" in out:
        attended = out["attention_mask"].bool().any(0)
        first = int(attended.float().argmax()) if bool(attended.any()) else 0
        for key in _ROW_TENSORS:
            if key in out:
                out[key] = out[key][:, first:]
    if "pixel_values" in batch:
        counts = images_per_row(batch)
        grid = batch["image_grid_thw"]
        patches = grid.prod(-1).tolist()
        first_image = [0] * n
        for r in range(1, n):
            first_image[r] = first_image[r - 1] + counts[r - 1]
        first_patch = [0] * len(patches)
        for k in range(1, len(patches)):
            first_patch[k] = first_patch[k - 1] + patches[k - 1]
        images = [first_image[r] + k for r in rows for k in range(counts[r])]
        if images:
            pv = batch["pixel_values"]
            out["pixel_values"] = torch.cat([pv[first_patch[i]: first_patch[i] + patches[i]] for i in images])
            out["image_grid_thw"] = grid[torch.tensor(images, device=grid.device)]
    for key, value in batch.items():
        if key in out or key in _ROW_TENSORS or key in _IMAGE_TENSORS:
            continue
        out[key] = [value[r] for r in rows] if isinstance(value, list) and len(value) == n else value
    return out


def repeat_rows(batch: Mapping[str, Any], n: int) -> dict[str, Any]:
    """Every row ``n`` times in a row (prompt-major: the ``G`` completions of a prompt are consecutive)."""
    rows = int(batch["input_ids"].shape[0])
    return select_rows(batch, [r for r in range(rows) for _ in range(n)])


def chunks(n: int, size: int) -> list[list[int]]:
    """``range(n)`` cut into consecutive pieces of ``size`` (``size <= 0``: one piece)."""
    size = n if size <= 0 else size
    return [list(range(s, min(n, s + size))) for s in range(0, n, size)]


def vision_token_ids(model: nn.Module) -> list[int]:
    """Ids the model treats as image/video placeholders (``<|image_pad|>``, ``<|vision_start|>``...)."""
    config = getattr(model, "config", None)
    ids = []
    for name in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id"):
        value = getattr(config, name, None)
        if isinstance(value, int):
            ids.append(value)
    return ids


def cut_at_tokens(ids: torch.Tensor, mask: torch.Tensor, banned: Sequence[int], pad_id: int) -> torch.Tensor:
    """End completions right before their first ``banned`` token, in place; returns the rows cut (N,) bool.

    A sampled ``<|image_pad|>`` (or another vision placeholder) cannot be fed back to a Qwen-VL
    forward: the model would look for image features it does not have. Such a completion keeps
    what came before (scored as cut by length: not finished); the rest becomes padding.
    """
    if not banned or ids.numel() == 0:
        return torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
    hit = torch.isin(ids, torch.as_tensor(list(banned), device=ids.device)) & mask.bool()
    rows = hit.any(1)
    if rows.any():
        first = torch.where(rows, hit.float().argmax(1), torch.full_like(rows, ids.shape[1], dtype=torch.long))
        after = torch.arange(ids.shape[1], device=ids.device).unsqueeze(0) >= first.unsqueeze(1)
        mask.masked_fill_(after, 0)
        ids.masked_fill_(after, pad_id)
    return rows


def disable_dropout(model: nn.Module) -> int:
    """Set every ``nn.Dropout``'s probability to 0; returns how many there were."""
    count = 0
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
            count += 1
    return count


# ------------------------------------------------------------------------------------------ reference


class ReferencePolicy:
    """The frozen policy of the KL term.

    * ``"adapters_disabled"``: the LoRA policy itself inside peft's ``disable_adapter()`` — the base
      weights, i.e. the starting model, as long as nothing but the adapters trains (no second copy);
    * ``"copy"``: a frozen deep copy of the starting model (full fine-tuning, or trained embeddings).

    Not an ``nn.Module``: a LightningModule holding it does not register, checkpoint or wrap it.
    """

    KINDS = ("adapters_disabled", "copy")

    def __init__(self, kind: str, model: Optional[nn.Module] = None):
        if kind not in self.KINDS:
            raise SamtokError(f"reference kind must be one of {self.KINDS}, got {kind!r}")
        if (kind == "copy") != (model is not None):
            raise SamtokError("a 'copy' reference needs its model; 'adapters_disabled' takes none")
        self.kind = kind
        self.model = model

    @classmethod
    def frozen_copy(cls, model: nn.Module) -> "ReferencePolicy":
        """A deep copy of ``model`` (call it before training changes anything), frozen, in eval mode."""
        ref = copy.deepcopy(model)
        ref.requires_grad_(False)
        ref.eval()
        return cls("copy", ref)

    @classmethod
    def build(cls, kind: Optional[str], model: nn.Module) -> Optional["ReferencePolicy"]:
        """``None`` for ``kind=None`` (beta = 0: nothing is built), else the reference of that kind."""
        if kind is None:
            return None
        return cls.frozen_copy(model) if kind == "copy" else cls("adapters_disabled")

    def to(self, device: torch.device | str, dtype: Optional[torch.dtype] = None) -> "ReferencePolicy":
        if self.model is not None:
            self.model.to(device=device, dtype=dtype)
        return self

    @torch.no_grad()
    def logprobs(self, policy: nn.Module, batch: Mapping[str, Any], completion_ids: torch.Tensor,
                 completion_mask: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
        """``(N, T)`` reference log-probs of the completions (0 on padding)."""
        if self.kind == "copy":
            return completion_logprobs(self.model, batch, completion_ids, completion_mask, temperature)
        if not hasattr(policy, "disable_adapter"):
            raise SamtokError("reference 'adapters_disabled' needs a peft (LoRA) policy; use a 'copy' reference")
        with policy.disable_adapter():
            return completion_logprobs(policy, batch, completion_ids, completion_mask, temperature)


# ------------------------------------------------------------------------------------------ rollouts


@dataclass
class Rollout:
    """One generated batch: ``N = P × G`` completions (rows), ``T`` = longest completion.

    Tensors live on the policy's device; ``old_logps`` / ``ref_logps`` are ``None`` when not needed.
    """

    batch: dict[str, Any]  # the prompt batch with each prompt repeated G times (N rows)
    completion_ids: torch.Tensor  # (N, T) long, pad after the stop token
    completion_mask: torch.Tensor  # (N, T) long, 1 on completion tokens (stop token included)
    texts: list[str]  # decoded completions (stop token dropped; mask and special tokens kept)
    finished: torch.Tensor  # (N,) bool, False when cut by max_new_tokens
    rewards: torch.Tensor  # (N,) float32 weighted total (NaN: unscorable)
    components: dict[str, torch.Tensor]  # name -> (N,) unweighted component values
    advantages: torch.Tensor  # (N,) float32
    old_logps: Optional[torch.Tensor] = None  # (N, T) policy that sampled (num_iterations > 1)
    ref_logps: Optional[torch.Tensor] = None  # (N, T) reference policy (beta > 0)
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def size(self) -> int:
        return int(self.completion_ids.shape[0])

    def column(self, key: str) -> list:
        value = self.batch.get(key)
        return value if isinstance(value, list) else [None] * self.size


def _pad_right(tensors: Sequence[torch.Tensor], value: float | int) -> torch.Tensor:
    width = max(int(t.shape[1]) for t in tensors)
    return torch.cat([nn.functional.pad(t, (0, width - int(t.shape[1])), value=value) for t in tensors])


class GRPOAlgorithm:
    """Rollouts and micro-batch losses of GRPO for one policy (see the module docstring).

    Args:
        model: the policy (a transformers Qwen-VL model, or its peft wrapper).
        processor: its processor (tokenizer for pad/stop ids and decoding).
        reward_fn: a TRL-style reward function (:data:`RewardFn`).
        loss: the objective's options; ``num_generations`` is G.
        sampling: how to sample (``do_sample`` is forced on).
        num_iterations: optimiser steps per rollout (old log-probs are stored when > 1).
        micro_batch_size: completions per forward pass (0: all).
        generation_batch_size: completions per ``generate`` call (0: all).
        reference: the KL reference (required iff ``loss.beta > 0``).
        no_target_answer: the answer counted by the ``completion/no_target_fraction`` metric.
    """

    def __init__(self, model: nn.Module, processor: Any, reward_fn: RewardFn, loss: GRPOLossConfig,
                 sampling: SamplingConfig, num_iterations: int = 1, micro_batch_size: int = 0,
                 generation_batch_size: int = 0, reference: Optional[ReferencePolicy] = None,
                 no_target_answer: str = NO_TARGET_ANSWER, codec: Optional[MaskCodec] = None):
        if loss.beta > 0 and reference is None:
            raise SamtokError("loss.beta > 0 needs a reference policy")
        if num_iterations < 1:
            raise SamtokError(f"num_iterations must be >= 1, got {num_iterations}")
        self.model = model
        self.processor = processor
        self.reward_fn = reward_fn
        if loss.max_completion_length is None:
            loss = replace(loss, max_completion_length=sampling.max_new_tokens)
        self.loss_config = loss
        self.sampling = replace(sampling, do_sample=True)
        self.num_iterations = num_iterations
        self.micro_batch_size = micro_batch_size
        self.generation_batch_size = generation_batch_size
        self.reference = reference if loss.beta > 0 else None
        self.no_target_answer = no_target_answer
        self.codec = codec or getattr(reward_fn, "codec", None) or MaskCodec()

    @property
    def group_size(self) -> int:
        return self.loss_config.num_generations

    @property
    def temperature(self) -> float:
        return float(self.sampling.temperature)

    def micro_batches(self, n: int) -> list[list[int]]:
        """Row indices of each forward/backward pass over ``n`` completions."""
        return chunks(n, self.micro_batch_size)

    # -------------------------------------------------------------------------------- rollout
    @torch.no_grad()
    def rollout(self, batch: Mapping[str, Any]) -> Rollout:
        """Sample G completions per prompt, score them, and prepare everything the loss needs."""
        t0 = time.perf_counter()
        group = repeat_rows(batch, self.group_size)
        was_training = self.model.training
        self.model.eval()
        try:
            ids, mask, texts, finished = self._generate(group)
            t1 = time.perf_counter()
            rewards, components = self._score(group, texts, ids, mask)
            t2 = time.perf_counter()
            advantages = group_advantages(rewards, self.group_size, self.loss_config.scale_rewards,
                                          self.loss_config.advantage_eps)
            device = ids.device
            old = self._logprobs(group, ids, mask, self._policy_logprobs) if self.num_iterations > 1 else None
            ref = self._logprobs(group, ids, mask, self._reference_logprobs) if self.reference is not None else None
        finally:
            self.model.train(was_training)
        t3 = time.perf_counter()
        return Rollout(batch=group, completion_ids=ids, completion_mask=mask, texts=texts, finished=finished,
                       rewards=rewards.to(device), components={k: v.to(device) for k, v in components.items()},
                       advantages=advantages.to(device), old_logps=old, ref_logps=ref,
                       seconds={"generation": t1 - t0, "reward": t2 - t1, "logprobs": t3 - t2})

    def _generate(self, group: Mapping[str, Any]):
        tok = getattr(self.processor, "tokenizer", self.processor)
        pad = int(tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
        ids, masks, texts, finished = [], [], [], []
        for rows in chunks(int(group["input_ids"].shape[0]), self.generation_batch_size):
            part = group if len(rows) == int(group["input_ids"].shape[0]) else select_rows(group, rows)
            out = generate(self.model, self.processor, part, self.sampling)
            ids.append(out.completion_ids)
            masks.append(out.completion_mask)
            texts.extend(out.texts)
            finished.append(out.finished)
        ids, mask, finished = _pad_right(ids, pad), _pad_right(masks, 0), torch.cat(finished)
        cut = cut_at_tokens(ids, mask, vision_token_ids(self.model), pad)
        if cut.any():
            from samtok.mllm.generation import decode_completions

            finished = finished & ~cut
            rows = cut.nonzero().flatten().tolist()
            redone = decode_completions(tok, ids[rows].cpu(), mask[rows].cpu(), finished[rows].cpu())
            for r, text in zip(rows, redone):
                texts[r] = text
        return ids, mask, texts, finished

    def _score(self, group: Mapping[str, Any], texts: list[str], ids: torch.Tensor,
               mask: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        n = len(texts)
        columns = {k: v for k, v in group.items() if isinstance(v, list) and len(v) == n and k != "prompt"}
        id_lists = [row[: int(m.sum())].tolist() for row, m in zip(ids.cpu(), mask.cpu())]
        kwargs = dict(columns, prompts=group.get("prompt"), completion_ids=id_lists)
        if hasattr(self.reward_fn, "breakdown"):
            out = self.reward_fn.breakdown(texts, **kwargs)
            total, comps = out.total, out.components
        else:
            total, comps = self.reward_fn(completions=texts, **kwargs), {}
        if len(total) != n:
            raise SamtokError(f"the reward function returned {len(total)} values for {n} completions")
        as_tensor = lambda v: torch.tensor([math.nan if x is None else float(x) for x in v], dtype=torch.float32)  # noqa: E731
        return as_tensor(total), {k: as_tensor(v) for k, v in comps.items()}

    def _policy_logprobs(self, part, ids, mask):
        return completion_logprobs(self.model, part, ids, mask, self.temperature)

    def _reference_logprobs(self, part, ids, mask):
        return self.reference.logprobs(self.model, part, ids, mask, self.temperature)

    def _logprobs(self, group, ids, mask, fn) -> torch.Tensor:
        """(N, T) log-probs by micro-batch, without gradients."""
        out = torch.zeros(ids.shape, dtype=torch.float32, device=ids.device)
        for rows in self.micro_batches(int(ids.shape[0])):
            part, cids, cmask, width = self._micro(group, ids, mask, rows)
            out[rows[0]: rows[-1] + 1, :width] = fn(part, cids, cmask).float()
        return out

    @staticmethod
    def _micro(group, ids, mask, rows):
        """Prompt rows, completion ids and mask of ``rows`` (consecutive), cut to their longest completion."""
        sl = slice(rows[0], rows[-1] + 1)
        width = max(1, int(mask[sl].sum(1).max()))
        part = group if len(rows) == int(ids.shape[0]) else select_rows(group, rows)
        return part, ids[sl, :width], mask[sl, :width], width

    # -------------------------------------------------------------------------------- loss
    def loss(self, rollout: Rollout, rows: Optional[Sequence[int]] = None) -> GRPOLossOutput:
        """The loss of the completions ``rows`` (consecutive; default all), with gradients.

        Scaled so that summing it over :meth:`micro_batches` gives the loss of the whole rollout.
        Metrics are those of :func:`~samtok.rl.grpo.grpo_loss` for these rows (unscaled).
        """
        rows = list(range(rollout.size)) if rows is None else list(rows)
        if rows != list(range(rows[0], rows[0] + len(rows))):
            raise ValueError("rows must be consecutive (a micro-batch of the rollout)")
        part, ids, mask, width = self._micro(rollout.batch, rollout.completion_ids, rollout.completion_mask, rows)
        sl = slice(rows[0], rows[-1] + 1)
        logps = completion_logprobs(self.model, part, ids, mask, self.temperature)
        old = rollout.old_logps[sl, :width] if rollout.old_logps is not None else None
        ref = rollout.ref_logps[sl, :width] if rollout.ref_logps is not None else None
        cfg = self.loss_config
        num_items = None
        weight = len(rows) / rollout.size
        if cfg.loss_type == "dapo":
            num_items, weight = float(rollout.completion_mask.sum()), 1.0
        out = grpo_loss(logps, rollout.advantages[sl], mask, old, ref, cfg, num_items=num_items)
        metrics = dict(out.metrics)
        metrics["policy_loss"] = metrics["policy_loss"] * weight
        return GRPOLossOutput(loss=out.loss * weight, metrics=metrics)

    @staticmethod
    def merge_loss_metrics(parts: Sequence[Mapping[str, Any]]) -> dict[str, float]:
        """The metrics of a whole rollout from those of its micro-batches (:meth:`loss` outputs).

        Token means (``kl``, ``ratio/mean``, ``clip_ratio/*_mean``) are weighted by tokens,
        ``clip_ratio/low_min`` / ``high_max`` are the min / max, ``policy_loss`` (already scaled
        by :meth:`loss`) is summed, ``num_tokens`` is summed: equal to the metrics of one pass
        over the whole rollout.
        """
        tokens = sum(float(p["num_tokens"]) for p in parts)
        out: dict[str, float] = {"num_tokens": tokens}
        for key in parts[0]:
            values = [float(p[key]) for p in parts]
            if key == "num_tokens":
                continue
            if key == "policy_loss":
                out[key] = sum(values)
            elif key.endswith("_min"):
                out[key] = min(values)
            elif key.endswith("_max"):
                out[key] = max(values)
            else:
                out[key] = (sum(v * float(p["num_tokens"]) for v, p in zip(values, parts)) / tokens
                            if tokens else 0.0)
        return out

    # -------------------------------------------------------------------------------- metrics
    def rollout_metrics(self, rollout: Rollout) -> dict[str, float]:
        """Scalars worth logging for one rollout (rewards, advantages, completions, timings)."""
        m: dict[str, float] = {}

        def stats(prefix: str, x: torch.Tensor) -> None:
            x = x.float()
            x = x[~torch.isnan(x)]
            if x.numel():
                m[f"{prefix}/mean"] = float(x.mean())
                m[f"{prefix}/std"] = float(x.std()) if x.numel() > 1 else 0.0

        stats("reward", rollout.rewards)
        for name, values in rollout.components.items():
            stats(f"reward/{name}", values)
        grouped = rollout.rewards.float().view(-1, self.group_size)
        spread = torch.nan_to_num(grouped.std(1), nan=0.0)
        m["reward/group_std_mean"] = float(spread.mean())
        m["reward/frac_zero_std"] = float((spread < 1e-6).float().mean())
        for task in sorted({t for t in rollout.column("task") if isinstance(t, str)}):
            sel = torch.tensor([t == task for t in rollout.column("task")], device=rollout.rewards.device)
            stats(f"reward/task_{task}", rollout.rewards[sel])
        adv = rollout.advantages.float()
        m.update({"advantage/mean": float(adv.mean()), "advantage/std": float(adv.std()) if adv.numel() > 1 else 0.0,
                  "advantage/abs_mean": float(adv.abs().mean()), "advantage/min": float(adv.min()),
                  "advantage/max": float(adv.max())})
        lengths = rollout.completion_mask.sum(1).float()
        m.update({"completion/length_mean": float(lengths.mean()), "completion/length_min": float(lengths.min()),
                  "completion/length_max": float(lengths.max()),
                  "completion/clipped_fraction": float((~rollout.finished).float().mean())})
        spans = [len(self.codec.parse(t).spans) for t in rollout.texts]
        m["completion/spans_mean"] = sum(spans) / max(1, len(spans))
        m["completion/no_target_fraction"] = (sum(1 for t in rollout.texts if t.strip() == self.no_target_answer)
                                              / max(1, len(rollout.texts)))
        for k, v in rollout.seconds.items():
            m[f"time/{k}_s"] = float(v)
        return m


__all__ = ["GRPOAlgorithm", "ReferencePolicy", "Rollout", "chunks", "cut_at_tokens", "disable_dropout",
           "images_per_row", "repeat_rows", "select_rows", "vision_token_ids"]
