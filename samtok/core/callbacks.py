"""Lightning callbacks shared by every stage (imports Lightning; the rest of core does not)."""

from __future__ import annotations

import time

from lightning.pytorch.callbacks import Callback


class StepProgress(Callback):
    """One tqdm bar over optimiser steps (not epochs), with ETA and a few live metrics."""

    def __init__(self, total: int, desc: str, keys: tuple[str, ...] = ("train/loss",)):
        self.total, self.desc, self.keys = total, desc, keys
        self.bar = None
        self.start = 0.0

    def on_train_start(self, trainer, pl_module):
        from tqdm.auto import tqdm

        if trainer.is_global_zero:
            self.start = time.time()
            self.bar = tqdm(total=self.total, initial=trainer.global_step, desc=self.desc,
                            dynamic_ncols=True, mininterval=5.0, unit="step")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.bar is None:
            return
        metrics = trainer.callback_metrics
        post = {k.split("/")[-1]: f"{float(metrics[k]):.3f}" for k in self.keys if k in metrics}
        self.bar.set_postfix(post, refresh=False)
        self.bar.update(trainer.global_step - self.bar.n)

    def on_train_end(self, trainer, pl_module):
        if self.bar is not None:
            self.bar.update(trainer.global_step - self.bar.n)
            self.bar.close()
            self.bar = None


def _flat_loaders(loaders) -> list:
    """DataLoaders of whatever ``trainer.train_dataloader`` holds (one, a list, a dict, nested)."""
    if loaders is None:
        return []
    if isinstance(loaders, dict):
        return [dl for v in loaders.values() for dl in _flat_loaders(v)]
    if isinstance(loaders, (list, tuple)):
        return [dl for v in loaders for dl in _flat_loaders(v)]
    return [loaders]


class BatchSamplerEpoch(Callback):
    """Calls ``set_epoch`` on the training loaders' batch samplers at every epoch start and on resume.

    Lightning moves the epoch of ``loader.sampler`` and ``loader.batch_sampler.sampler`` only; the
    project's rank-aware batch samplers (``samtok.data.datamodule``) are passed as ``batch_sampler``
    and would otherwise replay epoch 0's order in every epoch. The epoch number is Lightning's own
    (``fit_loop.epoch_progress.current.processed``), so a resumed run gets the epoch it stopped in.
    """

    def _apply(self, trainer) -> None:
        epoch = int(trainer.fit_loop.epoch_progress.current.processed)
        for dl in _flat_loaders(trainer.train_dataloader):
            bs = getattr(dl, "batch_sampler", None)
            if bs is not None and callable(getattr(bs, "set_epoch", None)):
                bs.set_epoch(epoch)

    def on_train_start(self, trainer, pl_module):
        self._apply(trainer)

    def on_train_epoch_start(self, trainer, pl_module):
        self._apply(trainer)


class GlobalBatchLogger(Callback):
    """Logs the batch arithmetic of the running job once, at the start of training (rank 0).

    Hyper-parameters ``batch/per_device``, ``batch/devices_per_node``, ``batch/num_nodes``,
    ``batch/world_size``, ``batch/accumulate_grad_batches``, ``batch/global`` (= per device × world
    size × accumulation, from the live Trainer, not from the config's estimate) plus the strategy,
    precision and ZeRO settings; the scalar ``trainer/global_batch_size``; and one log line.
    """

    def __init__(self, per_device_batch: int, unit: str = "samples", config=None):
        self.per_device_batch, self.unit, self.config = int(per_device_batch), unit, config
        self.values: dict = {}

    def batch_values(self, trainer) -> dict:
        world = int(trainer.world_size)
        accum = int(trainer.accumulate_grad_batches)
        nodes = int(trainer.num_nodes)
        out = {
            "batch/unit": self.unit,
            "batch/per_device": self.per_device_batch,
            "batch/devices_per_node": max(1, world // max(1, nodes)),
            "batch/num_nodes": nodes,
            "batch/world_size": world,
            "batch/accumulate_grad_batches": accum,
            "batch/global": self.per_device_batch * world * accum,
            "trainer/strategy": type(trainer.strategy).__name__,
            "trainer/precision": str(trainer.precision),
        }
        if self.config is not None:
            out["trainer/zero_stage"] = int(self.config.zero_stage) if self.config.strategy == "deepspeed" else -1
            out["trainer/offload_optimizer"] = bool(self.config.offload_optimizer)
            out["trainer/offload_parameters"] = bool(self.config.offload_parameters)
        return out

    def on_train_start(self, trainer, pl_module):
        self.values = self.batch_values(trainer)
        if not trainer.is_global_zero:
            return
        from samtok.core.runtime import get_logger

        v = self.values
        get_logger("samtok.trainer").info(
            "global batch %d %s = %d per device x %d devices x %d nodes x %d accumulation (%s, %s)",
            v["batch/global"], self.unit, v["batch/per_device"], v["batch/devices_per_node"], v["batch/num_nodes"],
            v["batch/accumulate_grad_batches"], v["trainer/strategy"], v["trainer/precision"])
        for logger in trainer.loggers:
            logger.log_hyperparams(v)
            logger.log_metrics({"trainer/global_batch_size": float(v["batch/global"])}, step=trainer.global_step)
            _rewrite_hparams_file(logger)


def _rewrite_hparams_file(logger) -> None:
    """TensorBoard's ``hparams.yaml`` is written once, before ``on_train_start``: write it again so
    that it also holds what was logged since."""
    from lightning.pytorch.loggers import TensorBoardLogger

    if not isinstance(logger, TensorBoardLogger):
        return
    import os

    from lightning.pytorch.core.saving import save_hparams_to_yaml

    os.makedirs(logger.log_dir, exist_ok=True)
    save_hparams_to_yaml(os.path.join(logger.log_dir, TensorBoardLogger.NAME_HPARAMS_FILE), logger.hparams)
