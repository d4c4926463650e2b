"""The Lightning wrapper of GRPO: manual optimisation around :class:`~samtok.rl.algorithm.GRPOAlgorithm`.

Per batch of prompts (one ``training_step``):

1. ``rollout``: G sampled completions per prompt, rewards (total + components), group-normalised
   advantages, old log-probs (``num_iterations > 1``) and reference log-probs (``beta > 0``);
2. ``num_iterations`` optimiser steps on that rollout, each: zero the gradients, forward/backward
   every micro-batch (their losses sum to the full-batch GRPO loss), clip the gradient norm
   (``gradient_clip_val``), AdamW step, scheduler step.

``trainer.global_step`` therefore counts optimiser steps (``num_iterations`` per batch). The
Trainer must be built with ``accumulate_grad_batches=1`` and ``gradient_clip_val=None`` (Lightning
refuses both with manual optimisation; clipping happens here).

DeepSpeed (ZeRO-2): the engine accumulates the micro-batches itself when its config has
``gradient_accumulation_steps`` = micro-batches per step (:func:`samtok.rl.train_rl.build_strategy`):
every micro-batch but the last calls ``engine.step()`` (a no-op outside the accumulation boundary),
the last goes through the Lightning optimiser, so that Lightning counts one step; the engine scales
the loss by 1/accumulation itself and clips by its ``gradient_clipping``.

Logged (TensorBoard, ``train/`` prefix): reward mean/std overall, per component and per task, the
within-group spread, advantage statistics, KL, ratio and clip fractions, policy loss, loss,
gradient norm, completion lengths, clipped fraction, spans per completion, fraction of
"No target." answers, timings; sample completions as text every ``log_completions_every_n_steps``.
"""

from __future__ import annotations

import math
import time
from typing import Optional

import lightning as L
import torch

from samtok.core.runtime import get_logger
from samtok.mllm.sft import OptimSettings, SFTLightningModule
from samtok.rl.algorithm import GRPOAlgorithm, Rollout

log = get_logger("samtok.rl.lightning")


class GRPOLightningModule(L.LightningModule):
    """GRPO with manual optimisation (see the module docstring).

    Args:
        algorithm: rollouts and losses (holds the policy, reward function and reference).
        optim: AdamW settings and the warm-up + cosine schedule (shared with SFT).
        total_steps: optimiser steps of the schedule (``trainer.max_steps``; <= 0: Lightning's estimate).
        gradient_clip_val: clip the global gradient norm to this (0: no clipping, the norm is still logged).
        log_completions_every_n_steps: write sample completions every this many batches (0: never).
        num_logged_completions: how many each time.
    """

    def __init__(self, algorithm: GRPOAlgorithm, optim: OptimSettings, total_steps: int,
                 gradient_clip_val: float = 1.0, log_completions_every_n_steps: int = 50,
                 num_logged_completions: int = 4):
        super().__init__()
        self.automatic_optimization = False
        self.algorithm = algorithm
        self.model = algorithm.model  # registered: trained, checkpointed, wrapped by the strategy
        self.optim = optim
        self.total_steps = total_steps
        self.gradient_clip_val = float(gradient_clip_val or 0.0)
        self.log_completions_every_n_steps = log_completions_every_n_steps
        self.num_logged_completions = num_logged_completions
        self.last_rollout: Optional[Rollout] = None  # the latest rollout (tests, debugging)
        self.last_losses: list[list[float]] = []  # per iteration: the micro-batch losses of the latest batch
        self.history: list[dict[str, float]] = []  # per batch: the rollout and loss metrics (for summaries)

    # -------------------------------------------------------------------------------- set-up
    def on_fit_start(self) -> None:
        # Train mode for the optimisation passes (gradient checkpointing only runs in train mode;
        # dropout is usually disabled anyway); rollouts switch to eval mode and back themselves.
        self.model.train()
        ref = self.algorithm.reference
        if ref is not None and ref.model is not None:
            dtype = next(self.model.parameters()).dtype
            ref.to(self.device, dtype if dtype.is_floating_point else None)

    def configure_optimizers(self):
        if self.total_steps <= 0:  # max_steps = -1: max_epochs decides; Lightning counts batches
            self.total_steps = int(self.trainer.estimated_stepping_batches) * self.algorithm.num_iterations
        # The same AdamW parameter groups and warm-up + cosine schedule as SFT (it reads only
        # self.model, self.optim, self.total_steps and self.trainer).
        return SFTLightningModule.configure_optimizers(self)

    # -------------------------------------------------------------------------------- helpers
    def _deepspeed_engine(self):
        from lightning.pytorch.strategies import DeepSpeedStrategy

        strategy = self._trainer.strategy if self._trainer is not None else None
        return strategy.model if isinstance(strategy, DeepSpeedStrategy) else None

    def _clip_and_norm(self) -> float:
        params = [p for p in self.model.parameters() if p.grad is not None]
        if not params:
            return 0.0
        max_norm = self.gradient_clip_val if self.gradient_clip_val > 0 else math.inf
        return float(torch.nn.utils.clip_grad_norm_(params, max_norm))

    # -------------------------------------------------------------------------------- training
    def training_step(self, batch: dict, batch_idx: int) -> None:
        t0 = time.perf_counter()
        algo = self.algorithm
        rollout = algo.rollout(batch)
        self.last_rollout = rollout
        opt = self.optimizers()
        sched = self.lr_schedulers()
        engine = self._deepspeed_engine()
        micro = algo.micro_batches(rollout.size)
        n = rollout.size
        metrics = algo.rollout_metrics(rollout)
        self.last_losses = []
        for iteration in range(algo.num_iterations):
            opt.zero_grad()
            parts: list[dict] = []
            losses: list[float] = []
            for k, rows in enumerate(micro):
                out = algo.loss(rollout, rows)
                # DeepSpeed divides by its gradient_accumulation_steps (= len(micro)) itself.
                self.manual_backward(out.loss * len(micro) if engine is not None else out.loss)
                if engine is not None and k < len(micro) - 1:
                    engine.step()  # counts the micro-step; steps only at the accumulation boundary
                losses.append(float(out.loss.detach()))
                parts.append(out.metrics)
            grad_norm = self._clip_and_norm() if engine is None else math.nan
            opt.step()
            if engine is not None and hasattr(engine, "get_global_grad_norm"):
                norm = engine.get_global_grad_norm()
                grad_norm = float(norm) if norm is not None else math.nan
            if sched is not None:
                sched.step()
            self.last_losses.append(losses)
            step = {key: v for key, v in algo.merge_loss_metrics(parts).items() if key != "num_tokens"}
            step["loss"] = sum(losses)
            step["grad_norm"] = grad_norm
            if iteration == 0:
                metrics.update(step)
            else:
                metrics.update({f"iter{iteration}/{key}": v for key, v in step.items()})
        metrics["time/step_s"] = time.perf_counter() - t0
        self.history.append(dict(metrics))
        self.log_dict({f"train/{k}": v for k, v in metrics.items() if not math.isnan(v)}, on_step=True,
                      on_epoch=False, batch_size=n)
        self.log("train/reward", metrics.get("reward/mean", math.nan), prog_bar=True, on_step=True,
                 on_epoch=False, batch_size=n, logger=False)
        every = self.log_completions_every_n_steps
        if every > 0 and batch_idx % every == 0:
            self._log_completions(rollout)

    # -------------------------------------------------------------------------------- text samples
    def completions_markdown(self, rollout: Rollout, limit: int) -> str:
        """A few completions of the rollout (one per prompt first) as Markdown (indented code blocks)."""
        g = self.algorithm.group_size
        order = [p * g + k for k in range(g) for p in range(rollout.size // g)][:limit]
        prompts, truths, tasks = rollout.column("prompt"), rollout.column("ground_truth"), rollout.column("task")
        parts = []
        for i in order:
            user = ""
            if isinstance(prompts[i], list):
                user = "\n".join(str(m.get("content", "")) for m in prompts[i] if m.get("role") == "user")
            reward = float(rollout.rewards[i])
            comps = ", ".join(f"{k} {float(v[i]):.3f}" for k, v in rollout.components.items())
            block = f"PROMPT: {user}\n\nCOMPLETION: {rollout.texts[i]}\n\nREFERENCE: {truths[i]}"
            # an indented code block: the texts hold ``` fences themselves, and <|...|> must not be read as HTML
            block = "\n".join("    " + line for line in block.splitlines())
            parts.append(f"**completion {i}** (task {tasks[i]}, reward {reward:.3f}{'; ' + comps if comps else ''}, "
                         f"advantage {float(rollout.advantages[i]):+.3f})\n\n{block}")
        return "\n\n".join(parts)

    def _log_completions(self, rollout: Rollout) -> None:
        logger = self.logger
        experiment = getattr(logger, "experiment", None) if logger is not None else None
        if experiment is None or not hasattr(experiment, "add_text") or not self.trainer.is_global_zero:
            return
        experiment.add_text("train/completions", self.completions_markdown(rollout, self.num_logged_completions),
                            self.global_step)


__all__ = ["GRPOLightningModule"]
