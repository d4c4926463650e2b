"""Training plumbing shared by every stage (tokenizer, SFT, GRPO): one ``TrainerConfig``.

Strategy, devices, nodes, precision, accumulation and ZeRO settings are config keys; the DeepSpeed
config is generated from them (never a hand-edited JSON). Lightning is imported lazily so that
``samtok.core`` itself stays importable without it.

Every ``build_trainer`` trainer also (see ``docs/distributed.md``):

* logs the global batch (per device × devices × nodes × accumulation, from the live Trainer) as
  hyper-parameters and as the scalar ``trainer/global_batch_size``;
* moves the epoch of the project's rank-aware batch samplers (Lightning only calls ``set_epoch`` on
  ``loader.sampler`` and ``loader.batch_sampler.sampler``, never on a batch sampler itself).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch


@dataclass
class TrainerConfig:
    accelerator: str = "auto"  # auto | cpu | gpu
    devices: str = "auto"  # "auto", a count ("2") or a list ("0,1")
    num_nodes: int = 1
    strategy: str = "auto"  # auto | ddp | ddp_spawn | deepspeed | fsdp
    precision: str = "32-true"  # 32-true | bf16-mixed | 16-mixed | bf16-true
    max_steps: int = 1000  # -1: no step limit (then max_epochs decides)
    max_epochs: Optional[int] = None  # e.g. 1 for the release's one epoch; None: steps decide
    max_minutes: Optional[float] = None  # hard wall-clock stop (Lightning max_time), a safety net
    accumulate_grad_batches: int = 1
    gradient_clip_val: float = 1.0  # by norm; 0 disables
    log_every_n_steps: int = 10
    val_every_n_steps: int = 200  # 0 disables periodic validation (a final one still runs)
    checkpoint_every_n_steps: int = 200  # last.ckpt for resuming; 0 disables
    zero_stage: int = 2  # DeepSpeed ZeRO stage (strategy: deepspeed)
    offload_optimizer: bool = False  # DeepSpeed: optimizer states in CPU memory
    offload_parameters: bool = False  # DeepSpeed ZeRO-3: parameters in CPU memory
    num_workers: int = 0  # DataLoader workers per process
    seed: int = 0
    deterministic: bool = False
    threads: int = 0  # torch intra-op threads on CPU (0: leave torch's default)


def world_size_of(cfg: TrainerConfig) -> int:
    """Processes this config will run on (devices x nodes), best effort before launch."""
    devices = str(cfg.devices)
    if devices == "auto":
        n = torch.cuda.device_count() if (cfg.accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available()) else 1
    elif "," in devices or devices.startswith("["):
        n = len([d for d in devices.strip("[]").split(",") if d.strip()])
    elif devices == "-1":  # Lightning: every visible device
        n = torch.cuda.device_count() if torch.cuda.is_available() and cfg.accelerator != "cpu" else 1
    else:
        n = int(devices) if devices.lstrip("-").isdigit() and int(devices) > 0 else 1
    return max(1, n) * max(1, cfg.num_nodes)


def global_batch_size(cfg: TrainerConfig, per_device: int) -> int:
    """Per-device batch x devices x nodes x accumulation."""
    return per_device * world_size_of(cfg) * max(1, cfg.accumulate_grad_batches)


def deepspeed_config(cfg: TrainerConfig, per_device_batch: int) -> dict:
    """The DeepSpeed JSON for this config, as ``deepspeed.initialize`` receives it under Lightning.

    ZeRO stage, offload, precision (``bf16`` / ``fp16`` with dynamic loss scaling), gradient clipping
    by norm, micro-batch and accumulation. DeepSpeed derives ``train_batch_size`` = micro-batch ×
    accumulation × data-parallel world size itself. Lightning refuses a config that already holds
    ``gradient_accumulation_steps`` (it inserts ``accumulate_grad_batches``): the strategy gets
    :func:`lightning_deepspeed_config`, which is this dict without that key.
    """
    if cfg.zero_stage not in (0, 1, 2, 3):
        raise ValueError(f"trainer.zero_stage must be 0..3, got {cfg.zero_stage}")
    if cfg.offload_optimizer and cfg.zero_stage == 0:
        raise ValueError("trainer.offload_optimizer needs trainer.zero_stage >= 1")
    zero: dict[str, Any] = {
        "stage": cfg.zero_stage,
        "overlap_comm": True,
        "contiguous_gradients": True,
        "reduce_bucket_size": 5e8,
    }
    if cfg.zero_stage >= 2:
        zero["allgather_bucket_size"] = 5e8
    if cfg.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if cfg.offload_parameters:
        if cfg.zero_stage != 3:
            raise ValueError("trainer.offload_parameters needs trainer.zero_stage=3")
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    if cfg.zero_stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    ds: dict[str, Any] = {
        "zero_optimization": zero,
        "train_micro_batch_size_per_gpu": per_device_batch,
        "gradient_accumulation_steps": max(1, cfg.accumulate_grad_batches),
        "zero_allow_untested_optimizer": True,
    }
    if cfg.offload_optimizer:
        # The stages build torch.optim.AdamW; DeepSpeed refuses it with offload unless told otherwise.
        # It then steps on the CPU copy (correct, slower than DeepSpeedCPUAdam: see offload_aware_adamw).
        ds["zero_force_ds_cpu_optimizer"] = False
    # always explicit: DeepSpeed clips at 1.0 when the key is absent (0 disables)
    ds["gradient_clipping"] = float(cfg.gradient_clip_val) if cfg.gradient_clip_val and cfg.gradient_clip_val > 0 else 0.0
    if cfg.precision.startswith("bf16"):
        ds["bf16"] = {"enabled": True}
    elif cfg.precision.startswith("16"):
        ds["fp16"] = {"enabled": True, "loss_scale": 0, "initial_scale_power": 16}
    return ds


def lightning_deepspeed_config(cfg: TrainerConfig, per_device_batch: int) -> dict:
    """:func:`deepspeed_config` for ``DeepSpeedStrategy(config=...)``: without
    ``gradient_accumulation_steps``, which Lightning adds from ``Trainer(accumulate_grad_batches)``."""
    ds = deepspeed_config(cfg, per_device_batch)
    ds.pop("gradient_accumulation_steps")
    return ds


_DEEPSPEED_STRATEGY: Any = None


def deepspeed_strategy_class() -> type:
    """``AccumulatingDeepSpeedStrategy``: Lightning's ``DeepSpeedStrategy`` whose engine may accumulate
    micro-batches under manual optimisation.

    Lightning writes ``Trainer(accumulate_grad_batches)`` into the DeepSpeed config, and manual
    optimisation (the GRPO module) requires that to be 1 — yet such a module may feed the engine
    several micro-batches per optimiser step. ``engine_accumulation`` is then written into the config
    instead. With automatic optimisation both must agree (Lightning steps the engine every batch and
    DeepSpeed finds the accumulation boundary itself); a mismatch is refused.
    """
    global _DEEPSPEED_STRATEGY
    if _DEEPSPEED_STRATEGY is not None:
        return _DEEPSPEED_STRATEGY
    from lightning.pytorch.strategies import DeepSpeedStrategy
    from lightning.pytorch.utilities.exceptions import MisconfigurationException

    class AccumulatingDeepSpeedStrategy(DeepSpeedStrategy):
        def __init__(self, *args: Any, engine_accumulation: Optional[int] = None, **kwargs: Any):
            super().__init__(*args, **kwargs)
            self.engine_accumulation = engine_accumulation

        def _format_batch_size_and_grad_accum_config(self) -> None:
            super()._format_batch_size_and_grad_accum_config()
            module = self.lightning_module
            if module is None or self.engine_accumulation is None:
                return
            lightning_accumulation = int(self.config["gradient_accumulation_steps"])
            if not module.automatic_optimization:
                self.config["gradient_accumulation_steps"] = int(self.engine_accumulation)
            elif int(self.engine_accumulation) != lightning_accumulation:
                raise MisconfigurationException(
                    f"DeepSpeed would accumulate {self.engine_accumulation} micro-batches but the Trainer "
                    f"{lightning_accumulation}: with automatic optimisation set trainer.accumulate_grad_batches only")

    AccumulatingDeepSpeedStrategy.__module__ = __name__
    AccumulatingDeepSpeedStrategy.__qualname__ = "AccumulatingDeepSpeedStrategy"
    _DEEPSPEED_STRATEGY = AccumulatingDeepSpeedStrategy
    globals()["AccumulatingDeepSpeedStrategy"] = AccumulatingDeepSpeedStrategy  # picklable by name
    return AccumulatingDeepSpeedStrategy


def build_strategy(cfg: TrainerConfig, per_device_batch: int) -> Any:
    """A Lightning strategy object (or name) for ``cfg.strategy``.

    ``ddp`` starts the other local processes by re-running the command (or takes them from torchrun /
    SLURM); ``ddp_spawn`` forks them from inside ``fit`` (objects built before ``fit`` then carry
    rank 0's view: prefer ``ddp``). ``deepspeed`` gets :func:`lightning_deepspeed_config`; its engine
    accumulates ``cfg.accumulate_grad_batches`` micro-batches (see :func:`deepspeed_strategy_class`).
    """
    if cfg.strategy == "deepspeed":
        return deepspeed_strategy_class()(config=lightning_deepspeed_config(cfg, per_device_batch),
                                          engine_accumulation=max(1, cfg.accumulate_grad_batches))
    if cfg.strategy in ("ddp", "ddp_spawn"):
        from lightning.pytorch.strategies import DDPStrategy

        return DDPStrategy(start_method="spawn" if cfg.strategy == "ddp_spawn" else "popen",
                           find_unused_parameters=True)
    return cfg.strategy


def offloads_optimizer(trainer: Any) -> bool:
    """Whether ``trainer`` runs DeepSpeed with the optimizer states in CPU memory."""
    config = getattr(getattr(trainer, "strategy", None), "config", None)
    if not isinstance(config, dict):
        return False
    offload = (config.get("zero_optimization") or {}).get("offload_optimizer") or {}
    return offload.get("device", "none") not in ("none", None)


def offload_aware_adamw(param_groups: Any, trainer: Any = None, **kwargs: Any) -> torch.optim.Optimizer:
    """``torch.optim.AdamW(param_groups, **kwargs)``, or DeepSpeed's CPU Adam (AdamW mode, same
    arguments) when ``trainer`` offloads the optimizer: several times faster on the CPU copy.
    Call it from ``configure_optimizers`` as ``offload_aware_adamw(groups, self.trainer, lr=...)``."""
    if trainer is not None and offloads_optimizer(trainer):
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(param_groups, adamw_mode=True, **kwargs)
    return torch.optim.AdamW(param_groups, **kwargs)


def distributed_token_mean(loss_sum: torch.Tensor, num_tokens: torch.Tensor | int) -> torch.Tensor:
    """This rank's share of a per-token mean over ALL ranks, for ``backward``.

    ``loss_sum``: the summed per-token loss of this rank's micro-batch; ``num_tokens``: how many tokens
    it summed. DDP, DeepSpeed and FSDP average gradients over the W ranks, so returning
    ``loss_sum × W / N`` (``N`` = tokens of all ranks, all-reduced) gives exactly the gradient of
    ``Σ_r loss_sum_r / N`` — what one process holding the whole batch computes. Averaging the returned
    values over ranks (``self.log(..., sync_dist=True)``) gives that global mean. Without a process
    group it is ``loss_sum / num_tokens``.
    """
    import torch.distributed as dist

    count = torch.as_tensor(num_tokens, dtype=torch.float32, device=loss_sum.device).detach().clone()
    world = 1
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        world = dist.get_world_size()
        dist.all_reduce(count)
    return loss_sum * world / count.clamp_min(1.0)


def _devices_arg(devices: str) -> Any:
    d = str(devices)
    if d == "auto":
        return "auto"
    if "," in d or d.startswith("["):
        return [int(x) for x in d.strip("[]").split(",") if x.strip()]
    return int(d)


def build_trainer(
    cfg: TrainerConfig,
    run_dir: str | Path,
    per_device_batch: int,
    callbacks: Optional[list] = None,
    logger_name: str = "tb",
    enable_progress_bar: bool = False,
    batch_unit: str = "samples",
    **overrides: Any,
):
    """A ``lightning.Trainer`` for a stage: TensorBoard under ``run_dir/tb``, checkpoints, strategy.

    ``per_device_batch`` (in ``batch_unit``s) is logged at the start of training with the global batch
    it makes (:class:`samtok.core.callbacks.GlobalBatchLogger`); ``overrides`` go to ``Trainer`` as is.
    """
    import lightning as L
    from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
    from lightning.pytorch.loggers import TensorBoardLogger

    from samtok.core.callbacks import BatchSamplerEpoch, GlobalBatchLogger

    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    run_dir = Path(run_dir)
    cbs = list(callbacks or [])
    cbs.append(GlobalBatchLogger(per_device_batch, unit=batch_unit, config=cfg))
    cbs.append(BatchSamplerEpoch())
    if cfg.checkpoint_every_n_steps > 0:
        cbs.append(ModelCheckpoint(dirpath=run_dir / "checkpoints", save_last=True, save_top_k=0,
                                   every_n_train_steps=cfg.checkpoint_every_n_steps))
    cbs.append(LearningRateMonitor(logging_interval="step"))
    max_time = None
    if cfg.max_minutes:
        secs = int(cfg.max_minutes * 60)
        max_time = {"seconds": secs}
    kwargs = dict(
        accelerator=cfg.accelerator,
        devices=_devices_arg(cfg.devices),
        num_nodes=cfg.num_nodes,
        strategy=build_strategy(cfg, per_device_batch),
        precision=cfg.precision,
        max_steps=cfg.max_steps,
        max_epochs=cfg.max_epochs if cfg.max_epochs is not None else (-1 if cfg.max_steps > 0 else None),
        max_time=max_time,
        accumulate_grad_batches=cfg.accumulate_grad_batches,
        gradient_clip_val=(cfg.gradient_clip_val or None) if cfg.strategy != "deepspeed" else None,
        log_every_n_steps=cfg.log_every_n_steps,
        val_check_interval=None,
        check_val_every_n_epoch=None,
        num_sanity_val_steps=0,
        logger=TensorBoardLogger(save_dir=str(run_dir), name=logger_name, version=""),
        callbacks=cbs,
        enable_progress_bar=enable_progress_bar,
        enable_model_summary=False,
        deterministic=cfg.deterministic,
        default_root_dir=str(run_dir),
    )
    if cfg.val_every_n_steps > 0:
        kwargs["val_check_interval"] = cfg.val_every_n_steps
    kwargs.update(overrides)
    return L.Trainer(**kwargs)


def warmup_cosine(step: int, total: int, warmup_fraction: float = 0.05, min_ratio: float = 0.0) -> float:
    """LR multiplier: linear warm-up over ``warmup_fraction`` of ``total`` steps, then cosine to ``min_ratio``."""
    total = max(1, total)
    warm = max(1, int(round(warmup_fraction * total))) if warmup_fraction > 0 else 0
    if step < warm:
        return (step + 1) / warm
    progress = min(1.0, (step - warm) / max(1, total - warm))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def resume_checkpoint(run_dir: str | Path, mode: str) -> Optional[str]:
    """``last.ckpt`` of ``run_dir`` when ``mode`` is auto/true and it exists; an explicit path otherwise.

    A checkpoint is a file (DDP, single device) or a directory (DeepSpeed: one shard per rank).
    """
    if mode in ("", "never", "false", "False", "no"):
        return None
    if mode in ("auto", "true", "True", "yes"):
        last = Path(run_dir) / "checkpoints" / "last.ckpt"
        return str(last) if last.exists() else None
    p = Path(mode)
    if not p.exists():
        from samtok.core.errors import SamtokError

        raise SamtokError(f"resume checkpoint not found: {p}")
    return str(p)
