"""``samtok eval``: one benchmark from the command line, or every model x benchmark of a config.

    # one benchmark (the data: a path whose layout is recognised, or key=value source arguments)
    samtok eval --benchmark gres --model runs/sft/final --tokenizer runs/tokenizer/final \\
        --data runs/synth --split val --out runs/eval/gres
    samtok eval --benchmark refcoco --model M --tokenizer T --data /data/refer --data dataset=refcoco+ --split testA
    samtok eval --benchmark tokenizer --tokenizer T --data kind=coco --data instances=/coco/instances_val2017.json

    # a config (default configs/eval/tiny.yaml): every model x benchmark, then runs/eval/summary.md
    samtok eval --config configs/eval/tiny.yaml runner.devices=2 generation.batch_size=16

``key=value`` overrides apply to the config in both modes (decoding limits, runner, report...).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Optional, Sequence

from samtok.cli import add_config_arguments
from samtok.core.config import ConfigError

DEFAULT_CONFIG = "configs/eval/tiny.yaml"
DEFAULT_KIND = {"refcoco": "refer", "gres": "grefcoco", "gcg": "gcg", "region_caption": "region_caption",
                "mr_seg": "multiround", "tokenizer": "coco"}
SPLIT_KINDS = ("synthetic", "refer", "grefcoco", "scene_graph")


def build_parser(name: str, parser: argparse.ArgumentParser) -> None:
    from samtok.eval.config import BENCHMARKS

    add_config_arguments(parser, None)
    parser.add_argument("--benchmark", choices=BENCHMARKS, default=None,
                        help=f"run one benchmark (without it: every run of --config, default {DEFAULT_CONFIG})")
    parser.add_argument("--model", default=None, help="QwenVL-SAMTok model directory (not for --benchmark tokenizer)")
    parser.add_argument("--tokenizer", default=None, help="SAMTok tokenizer directory")
    parser.add_argument("--data", action="append", default=[], metavar="PATH|KEY=VALUE",
                        help="the benchmark's data: a path (synthetic root, refer/gRefCOCO data_root, GranDf "
                             "val_test folder, DAM annotations.json, SegLLM json, COCO instances json, SA-1B folder) "
                             "and/or source arguments key=value (kind=..., see docs/formats.md); repeatable")
    parser.add_argument("--split", default=None, help="data split (synthetic / refer / gRefCOCO / GranDf eval)")
    parser.add_argument("--out", default=None, help="report folder (default runs/eval/<benchmark>)")
    parser.add_argument("--name", default=None, help="model name in the report (default: the model folder's name)")
    parser.add_argument("--max-samples", type=int, default=None, help="evaluate the first N samples only")
    parser.add_argument("--batch-size", type=int, default=None, help="prompts (images) per batch and device")
    parser.add_argument("--oracle", action="store_true",
                        help="answer with the ground truth through a lossless lookup tokenizer: every metric must be "
                             "perfect (checks data layout, prompts, parsing and metrics; no --model/--tokenizer)")


def _value(text: str) -> Any:
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("null", "none"):
        return None
    try:
        return int(text)
    except ValueError:
        return text


def guess_source(benchmark: str, path: Path, split: Optional[str]) -> tuple[str, dict]:
    """``(kind, args)`` of a data path whose layout is recognised for ``benchmark``."""
    s = split or "val"
    if not path.exists():
        raise ConfigError(f"--data {path}: no such file or folder")
    if path.is_dir() and (path / f"instances_{s}.json").is_file():
        return "synthetic", {"root": str(path), "split": s}
    if benchmark == "refcoco" and path.is_dir() and any(path.glob("refcoco*/refs(*).p")):
        return "refer", {"data_root": str(path)}
    if benchmark == "gres" and path.is_dir() and (path / "grefcoco").is_dir():
        return "grefcoco", {"data_root": str(path)}
    if benchmark == "gcg":
        if path.is_dir() and (path / f"{s}_gcg_coco_caption_gt.json").is_file():
            return "gcg", {"caption_gt": str(path / f"{s}_gcg_coco_caption_gt.json"),
                           "mask_gt": str(path / f"{s}_gcg_coco_mask_gt.json")}
        if path.is_file():
            return "gcg", {"annotations": str(path)}
    if benchmark == "region_caption":
        ann = path / "annotations.json" if path.is_dir() else path
        if ann.is_file():
            return "region_caption", {"annotations": str(ann)}
    if benchmark == "mr_seg" and path.is_file():
        return "multiround", {"conversations": str(path)}
    if benchmark == "tokenizer":
        if path.is_file() and path.suffix == ".json":
            return "coco", {"instances": str(path)}
        if path.is_dir() and any(path.glob("sa_*.json")):
            return "sa1b", {"path": str(path)}
    raise ConfigError(f"--data {path}: layout not recognised for benchmark {benchmark!r}; give the source "
                      f"arguments instead, e.g. --data kind={DEFAULT_KIND[benchmark]} --data key=value (docs/formats.md)")


def data_spec_from_cli(benchmark: str, values: Sequence[str], split: Optional[str]):
    """The :class:`~samtok.eval.config.DataSpec` of ``--data`` values and ``--split``."""
    from samtok.eval.config import DataSpec

    pairs = [v for v in values if "=" in v]
    paths = [v for v in values if "=" not in v]
    if len(paths) > 1:
        raise ConfigError(f"--data: at most one path, got {paths}")
    if not paths and not pairs:
        raise ConfigError("--data is required with --benchmark")
    args: dict[str, Any] = {}
    for p in pairs:
        key, _, value = p.partition("=")
        if not key:
            raise ConfigError(f"--data {p!r}: expected key=value")
        args[key] = _value(value)
    kind = args.pop("kind", None)
    if paths:
        guessed_kind, guessed = guess_source(benchmark, Path(paths[0]), split)
        kind = kind or guessed_kind
        args = {**guessed, **args}
    kind = kind or DEFAULT_KIND[benchmark]
    if split is not None and kind in SPLIT_KINDS:
        args.setdefault("split", split)
    return DataSpec(kind=kind, args=args)


def single_run_config(args: argparse.Namespace):
    """``(config, benchmark, model, out dir)`` of ``--benchmark`` mode."""
    from samtok.core.config import load_config
    from samtok.eval.config import BenchmarkConfig, EvalConfig, ModelSpec

    cfg = load_config(EvalConfig, args.config, args.overrides)
    if args.oracle:
        if args.model or args.tokenizer:
            raise ConfigError("--oracle replaces --model and --tokenizer")
        args.model, args.tokenizer, args.name = "(oracle)", "(oracle)", args.name or "oracle"
    if args.tokenizer is None:
        raise ConfigError("--tokenizer is required with --benchmark")
    if args.benchmark != "tokenizer" and args.model is None:
        raise ConfigError(f"--model is required for --benchmark {args.benchmark}")
    bench = BenchmarkConfig(benchmark=args.benchmark, data=data_spec_from_cli(args.benchmark, args.data, args.split),
                            max_samples=args.max_samples)
    name = args.name or (Path(args.model).name if args.model else Path(args.tokenizer).name) or "model"
    model = ModelSpec(name=name, model=None if args.benchmark == "tokenizer" else args.model, tokenizer=args.tokenizer)
    if args.batch_size:
        cfg.generation.batch_size = args.batch_size
    cfg.models, cfg.benchmarks = [model], [bench]
    out = Path(args.out or Path(cfg.out_dir) / args.benchmark)
    return cfg, bench, model, out


def run(name: str, args: argparse.Namespace) -> int:
    from samtok.core.config import load_config, print_config
    from samtok.eval.config import EvalConfig, check_config
    from samtok.eval.evaluate import evaluate_benchmark, evaluate_config

    if args.benchmark is not None:
        cfg, bench, model, out = single_run_config(args)
        check_config(cfg)
        print_config(cfg, "eval")
        if args.print_config:
            return 0
        factory = None
        if args.oracle:
            import functools

            from samtok.eval.oracle import oracle_engine

            factory = functools.partial(oracle_engine, tokenizer_only=args.benchmark == "tokenizer")
        report = evaluate_benchmark(cfg, bench, model, out, engine_factory=factory)
        if report is not None:
            print(f"{bench.title}: {report['num_samples']} samples; report: {out / 'report.md'}")
            for k, v in list(report["metrics"].items())[:8]:
                print(f"  {k}: {v:.4f}" if isinstance(v, float) else f"  {k}: {v}")
        return 0
    if args.model or args.tokenizer or args.data:
        raise ConfigError("--model/--tokenizer/--data need --benchmark (a config names its own models and data)")
    cfg = load_config(EvalConfig, args.config or DEFAULT_CONFIG, args.overrides)
    check_config(cfg)
    if args.max_samples is not None:
        for b in cfg.benchmarks:
            b.max_samples = args.max_samples
    if args.batch_size:
        cfg.generation.batch_size = args.batch_size
    print_config(cfg, "eval")
    if args.print_config:
        return 0
    summary = evaluate_config(cfg)
    if summary is not None:
        print(Path(summary["summary"]).read_text())
    return 0
