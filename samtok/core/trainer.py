"""Training plumbing shared by every stage (tokenizer, SFT, GRPO): one ``TrainerConfig``.

Strategy, devices, nodes, precision, accumulation and ZeRO settings are config keys; the DeepSpeed
config is generated from them (never a hand-edited JSON). Lightning is imported lazily so that
``samtok.core`` itself stays importable without it.
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
    else:
        n = int(devices) if devices.lstrip("-").isdigit() and int(devices) > 0 else 1
    return max(1, n) * max(1, cfg.num_nodes)


def global_batch_size(cfg: TrainerConfig, per_device: int) -> int:
    """Per-device batch x devices x nodes x accumulation."""
    return per_device * world_size_of(cfg) * max(1, cfg.accumulate_grad_batches)


def deepspeed_config(cfg: TrainerConfig, per_device_batch: int) -> dict:
    """The DeepSpeed JSON for this config (ZeRO stage, offload, precision, clipping, batch sizes)."""
    if cfg.zero_stage not in (0, 1, 2, 3):
        raise ValueError(f"trainer.zero_stage must be 0..3, got {cfg.zero_stage}")
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
    if cfg.gradient_clip_val and cfg.gradient_clip_val > 0:
        ds["gradient_clipping"] = cfg.gradient_clip_val
    if cfg.precision.startswith("bf16"):
        ds["bf16"] = {"enabled": True}
    elif cfg.precision.startswith("16"):
        ds["fp16"] = {"enabled": True, "loss_scale": 0, "initial_scale_power": 16}
    return ds


def build_strategy(cfg: TrainerConfig, per_device_batch: int) -> Any:
    """A Lightning strategy object (or name) for ``cfg.strategy``."""
    if cfg.strategy == "deepspeed":
        from lightning.pytorch.strategies import DeepSpeedStrategy

        return DeepSpeedStrategy(config=deepspeed_config(cfg, per_device_batch))
    if cfg.strategy in ("ddp", "ddp_spawn"):
        from lightning.pytorch.strategies import DDPStrategy

        return DDPStrategy(start_method="spawn" if cfg.strategy == "ddp_spawn" else "popen",
                           find_unused_parameters=True)
    return cfg.strategy


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
    **overrides: Any,
):
    """A ``lightning.Trainer`` for a stage: TensorBoard under ``run_dir/tb``, checkpoints, strategy."""
    import lightning as L
    from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
    from lightning.pytorch.loggers import TensorBoardLogger

    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    run_dir = Path(run_dir)
    cbs = list(callbacks or [])
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
    """``last.ckpt`` of ``run_dir`` when ``mode`` is auto/true and it exists; an explicit path otherwise."""
    if mode in ("", "never", "false", "False", "no"):
        return None
    if mode in ("auto", "true", "True", "yes"):
        last = Path(run_dir) / "checkpoints" / "last.ckpt"
        return str(last) if last.is_file() else None
    p = Path(mode)
    if not p.is_file():
        from samtok.core.errors import SamtokError

        raise SamtokError(f"resume checkpoint not found: {p}")
    return str(p)
