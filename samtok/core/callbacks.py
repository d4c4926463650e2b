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
