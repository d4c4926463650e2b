"""``samtok synth``: the embedded synthetic data set.

    samtok synth --config configs/synth/default.yaml out_dir=runs/synth num_images=50 seed=0
    samtok synth --out runs/synth --num-images 50 --seed 0 --preview

The short flags are applied after the config file and the ``key=value`` overrides.
"""

from __future__ import annotations

import argparse
import json

from samtok.cli import add_config_arguments
from samtok.core.errors import SamtokError

DEFAULT_SYNTH_CONFIG = "synth/default.yaml"


def build_parser(name: str, parser: argparse.ArgumentParser) -> None:
    if name == "synth":
        add_config_arguments(parser, DEFAULT_SYNTH_CONFIG)
        parser.add_argument("--out", metavar="DIR", help="output folder (sets out_dir)")
        parser.add_argument("--num-images", type=int, metavar="N",
                            help="train images; val and test get max(1, N // 10) each (sets num_images)")
        parser.add_argument("--seed", type=int, help="random seed (sets seed)")
        parser.add_argument("--preview", action="store_true", default=None,
                            help="also write out_dir/preview.png (sets preview=true)")
        parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    else:  # pragma: no cover - samtok/cli.py routes only `synth` here
        raise SamtokError(f"samtok.data.cli has no command {name!r}")


def run(name: str, args: argparse.Namespace) -> int:
    if name == "synth":
        return _run_synth(args)
    raise SamtokError(f"samtok.data.cli has no command {name!r}")  # pragma: no cover


def synth_config_from_args(args: argparse.Namespace):
    """Config file -> ``key=value`` overrides -> short flags, validated."""
    from samtok.core.config import load_config
    from samtok.data.synth.config import SynthConfig

    cfg = load_config(SynthConfig, args.config, args.overrides)
    if args.out is not None:
        cfg.out_dir = args.out
    if args.num_images is not None:
        cfg.num_images = args.num_images
    if args.seed is not None:
        cfg.seed = args.seed
    if args.preview:
        cfg.preview = True
    if args.no_progress:
        cfg.progress = False
    return cfg.validate()


def _run_synth(args: argparse.Namespace) -> int:
    import time

    from samtok.core.config import print_config
    from samtok.core.runtime import get_logger
    from samtok.data.synth.dataset import generate

    cfg = synth_config_from_args(args)
    if args.print_config:
        print_config(cfg, "synth config")
        return 0
    log = get_logger("samtok.data.synth")
    t0 = time.perf_counter()
    summary = generate(cfg)
    dt = time.perf_counter() - t0
    n = sum(c["images"] for c in summary["counts"].values())
    log.info("wrote %d images to %s in %.1f s (%.1f ms/image)", n, cfg.out_dir, dt, 1000 * dt / max(n, 1))
    print(json.dumps({"out_dir": cfg.out_dir, "counts": summary["counts"]}, indent=2))
    return 0
