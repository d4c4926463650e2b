"""Seeding, logging and run directories: the small things every command needs."""

from __future__ import annotations

import logging
import os
import random
import sys
from pathlib import Path

import numpy as np

_LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def get_logger(name: str = "samtok") -> logging.Logger:
    """A logger under the ``samtok`` hierarchy writing to stderr (configured once)."""
    root = logging.getLogger("samtok")
    if not root.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(_LOG_FORMAT, datefmt="%H:%M:%S"))
        root.addHandler(handler)
        root.setLevel(os.environ.get("SAMTOK_LOG_LEVEL", "INFO").upper())
        root.propagate = False
    return logging.getLogger(name if name.startswith("samtok") else f"samtok.{name}")


def seed_everything(seed: int) -> int:
    """Seed Python, NumPy and torch (all devices). Returns the seed."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    try:
        import torch

        torch.manual_seed(seed)
    except ImportError:  # pragma: no cover
        pass
    os.environ["PYTHONHASHSEED"] = str(seed)
    return seed


def make_run_dir(path: str | Path) -> Path:
    p = Path(path)
    p.mkdir(parents=True, exist_ok=True)
    return p


def set_offline() -> None:
    """Guard against any hub access at run time (the project never downloads)."""
    for key in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
        os.environ.setdefault(key, "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
