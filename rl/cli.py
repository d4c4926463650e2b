"""``samtok rl``: GRPO of a QwenVL-SAMTok model (recipe in samtok.rl.train_rl, config in samtok.rl.config)."""

from __future__ import annotations

import argparse
from pathlib import Path

from samtok.cli import add_config_arguments


def build_parser(name: str, parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser, "configs/rl/tiny.yaml")


def run(name: str, args: argparse.Namespace) -> int:
    from samtok.core.config import load_config, print_config, save_config
    from samtok.rl.config import GRPOConfig, check_grpo_config
    from samtok.rl.train_rl import comparison_table, train_rl

    cfg = load_config(GRPOConfig, args.config, args.overrides)
    check_grpo_config(cfg)
    print_config(cfg, "rl")
    if args.print_config:
        return 0
    save_config(cfg, cfg.out_dir)
    summary = train_rl(cfg)
    if not summary:  # not global rank 0
        return 0
    final = Path(cfg.out_dir) / "final"
    print(f"model written to {final} ({summary['steps']} steps, {summary['minutes']:.1f} min)")
    train = summary.get("train", {})
    if "reward_first" in train:
        print(f"training reward (sampled): first batches {train['reward_first']:.4f} -> last batches "
              f"{train['reward_last']:.4f}")
    if summary["before"] or summary["after"]:
        print(comparison_table(summary["before"], summary["after"]))
    print(f"summary: {Path(cfg.out_dir) / 'summary.json'}")
    return 0
