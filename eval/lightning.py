"""The thin Lightning wrapper of a benchmark's prediction step (see :mod:`samtok.eval.runner`)."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import lightning as L


class PredictModule(L.LightningModule):
    """Builds the engine on this rank's device when prediction starts, runs ``step`` on each batch,
    and pickles this rank's results into ``parts_dir/rank<global rank>.pkl`` at the end.

    Args:
        step: ``step(engine, items) -> list[dict]`` (picklable: ddp_spawn sends it to the workers).
        engine_factory: ``engine_factory(device) -> engine`` (picklable).
        parts_dir: folder shared by all ranks (created by rank 0 beforehand).
    """

    def __init__(self, step, engine_factory, parts_dir: str):
        super().__init__()
        self.step = step
        self.engine_factory = engine_factory
        self.parts_dir = parts_dir
        self.engine = None
        self._results: list[dict] = []

    def on_predict_start(self) -> None:
        self.engine = self.engine_factory(self.device)
        self._results = []

    def predict_step(self, batch, batch_idx):
        self._results.extend(self.step(self.engine, list(batch)))
        return len(self._results)  # results travel through parts_dir, not Lightning's return value

    def on_predict_end(self) -> None:
        path = Path(self.parts_dir) / f"rank{self.global_rank}.pkl"
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "wb") as fh:
            pickle.dump(self._results, fh)
        os.replace(tmp, path)
        self.engine = None
