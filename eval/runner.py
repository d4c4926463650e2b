"""Running a benchmark's prediction step over its items: a plain loop, or Lightning's predict loop.

A benchmark hands over

* ``items``: a list of picklable items, each with a unique integer ``index`` (its position);
* ``step(engine, items) -> list[dict]``: the predictions of a batch of items, one dict per item
  carrying the item's ``"index"`` (plain Python data only: they are pickled between processes);
* ``engine_factory(device) -> engine``: builds the model(s) on a device (a picklable callable).

With Lightning, :class:`PredictModule` builds the engine on its rank's device when prediction
starts and runs ``step`` in ``predict_step``. Lightning's predict loop shards the data with
``UnrepeatedDistributedSampler`` (no padding, no repeats); every rank pickles its results into
``parts_dir/rank<r>.pkl``; after a barrier, rank 0 reads all parts. :func:`collect_results` then
checks that every index appears exactly once, so no sample is lost or counted twice.
"""

from __future__ import annotations

import pickle
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch

from samtok.core.errors import SamtokError
from samtok.core.runtime import get_logger
from samtok.eval.config import RunnerConfig

log = get_logger("samtok.eval.runner")

StepFn = Callable[[Any, list], list[dict]]
EngineFactory = Callable[[torch.device], Any]


def collect_results(parts: Sequence[Sequence[dict]], num_items: int) -> list[dict]:
    """Merge per-rank results into one list ordered by ``index``; every index exactly once."""
    by_index: dict[int, dict] = {}
    for part in parts:
        for r in part:
            k = int(r["index"])
            if k in by_index:
                raise SamtokError(f"sample {k} was predicted twice (by two ranks or two batches)")
            by_index[k] = r
    missing = sorted(set(range(num_items)) - set(by_index))
    extra = sorted(set(by_index) - set(range(num_items)))
    if missing or extra:
        raise SamtokError(f"predictions do not cover the benchmark: {len(missing)} missing (e.g. {missing[:5]}), "
                          f"{len(extra)} unknown indices (e.g. {extra[:5]})")
    return [by_index[k] for k in range(num_items)]


def _check_items(items: Sequence[Any]) -> None:
    for k, item in enumerate(items):
        idx = item["index"] if isinstance(item, dict) else getattr(item, "index", None)
        if idx != k:
            raise SamtokError(f"item {k} has index {idx!r}; items must be numbered 0..N-1 in order")


def _device_for(cfg: RunnerConfig) -> torch.device:
    if cfg.accelerator in ("gpu", "cuda") or (cfg.accelerator == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise SamtokError("runner.accelerator asks for a GPU but CUDA is not available")
        return torch.device("cuda", 0)
    return torch.device("cpu")


def run_plain(items: Sequence[Any], step: StepFn, engine_factory: EngineFactory, cfg: RunnerConfig,
              batch_size: int) -> list[dict]:
    """All items in this process, in order."""
    engine = engine_factory(_device_for(cfg))
    results: list[dict] = []
    for start in range(0, len(items), batch_size):
        results.extend(step(engine, list(items[start : start + batch_size])))
    return collect_results([results], len(items))


def _devices_arg(devices: str) -> Any:
    d = str(devices)
    if d == "auto":
        return "auto"
    if "," in d or d.startswith("["):
        return [int(x) for x in d.strip("[]").split(",") if x.strip()]
    return int(d)


def run_lightning(items: Sequence[Any], step: StepFn, engine_factory: EngineFactory, cfg: RunnerConfig,
                  batch_size: int, work_dir: str | Path) -> Optional[list[dict]]:
    """Items sharded over Lightning's devices; the merged results on global rank 0, ``None`` elsewhere."""
    import lightning as L
    from torch.utils.data import DataLoader

    parts_dir = Path(work_dir) / ".predict_parts"
    trainer = L.Trainer(
        accelerator=cfg.accelerator,
        devices=_devices_arg(cfg.devices),
        num_nodes=cfg.num_nodes,
        strategy=cfg.strategy,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(work_dir),
    )
    if trainer.global_rank == 0:
        shutil.rmtree(parts_dir, ignore_errors=True)
        parts_dir.mkdir(parents=True, exist_ok=True)
    trainer.strategy.barrier("samtok-eval-parts-dir")
    from samtok.eval.lightning import PredictModule

    module = PredictModule(step, engine_factory, str(parts_dir))
    loader = DataLoader(list(items), batch_size=batch_size, shuffle=False, collate_fn=list,
                        num_workers=cfg.num_workers)
    trainer.predict(module, dataloaders=loader, return_predictions=False)
    trainer.strategy.barrier("samtok-eval-parts-written")
    if trainer.global_rank != 0:
        return None
    files = sorted(parts_dir.glob("rank*.pkl"))
    world = trainer.world_size
    if len(files) != world:  # ddp_spawn: the parent's trainer reports the world size too
        raise SamtokError(f"expected {world} result parts in {parts_dir}, found {len(files)}")
    parts = []
    for f in files:
        with open(f, "rb") as fh:
            parts.append(pickle.load(fh))
    shutil.rmtree(parts_dir, ignore_errors=True)
    return collect_results(parts, len(items))


def run_items(items: Sequence[Any], step: StepFn, engine_factory: EngineFactory, cfg: RunnerConfig,
              batch_size: int, work_dir: str | Path) -> tuple[Optional[list[dict]], float]:
    """Predictions of every item (``None`` on ranks other than 0) and the wall-clock seconds taken."""
    _check_items(items)
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    t0 = time.perf_counter()
    if not items:
        return [], 0.0
    if cfg.lightning:
        results = run_lightning(items, step, engine_factory, cfg, batch_size, work_dir)
    else:
        results = run_plain(items, step, engine_factory, cfg, batch_size)
    return results, time.perf_counter() - t0
