"""``samtok vision-check`` (does the image reach the model?) and ``samtok pretrain`` (grounding pretraining)
of samtok.mllm.scene_qa: one config schema, two presets."""

from __future__ import annotations

import argparse

from samtok.cli import add_config_arguments


def build_parser(name: str, parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser, "configs/scene_qa/pretrain.yaml" if name == "pretrain" else "configs/scene_qa/vision_check.yaml")


def run(name: str, args: argparse.Namespace) -> int:
    from samtok.core.config import load_config, print_config
    from samtok.mllm.scene_qa import SceneQAConfig, format_report, run_scene_qa

    cfg = load_config(SceneQAConfig, args.config, args.overrides)
    print_config(cfg, name)
    if args.print_config:
        return 0
    report = run_scene_qa(cfg)
    title = "grounding pretraining" if name == "pretrain" else \
        "binding check" if cfg.baseline == "random_object" else "vision-path check"
    print(format_report(report, title))
    if cfg.out_dir:
        print(f"report written to {cfg.out_dir}/report.json" + (f", model to {report['model']}" if "model" in report else ""))
    # the check fails loudly; the pretraining stage reports its margins and hands its model on
    return 0 if name == "pretrain" or report["passed"] else 1
