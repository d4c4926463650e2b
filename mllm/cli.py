"""``samtok sft``: supervised fine-tuning of a QwenVL-SAMTok model (recipe in samtok.mllm.train_sft)."""

from __future__ import annotations

import argparse
from pathlib import Path

from samtok.cli import add_config_arguments


def build_parser(name: str, parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser, "configs/sft/tiny.yaml")


def run(name: str, args: argparse.Namespace) -> int:
    from samtok.core.config import load_config, print_config, save_config
    from samtok.mllm.train_sft import SFTConfig, train_sft

    cfg = load_config(SFTConfig, args.config, args.overrides)
    print_config(cfg, "sft")
    if args.print_config:
        return 0
    save_config(cfg, cfg.out_dir)
    summary = train_sft(cfg)
    final = Path(cfg.out_dir) / "final"
    print(f"model written to {final} ({summary['steps']} steps, {summary['minutes']:.1f} min)")
    for k, v in sorted(summary.get("generation", {}).items()):
        print(f"  {k}: {v}")
    (final / "DONE").write_text("sft\n")
    return 0
