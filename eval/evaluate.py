"""Evaluation driver: config → benchmarks → predictions (plain loop or Lightning) → reports.

    from samtok.eval.evaluate import evaluate_benchmark, evaluate_config
    report = evaluate_benchmark(cfg, cfg.benchmarks[0], cfg.models[1], "runs/eval/sft/gres")
    summary = evaluate_config(cfg)          # every model x benchmark, then runs/eval/summary.md

The engine of a benchmark is built by an engine factory, ``factory(device) -> engine``:
:class:`EngineSpec` loads a :class:`~samtok.mllm.inference.SamtokPredictor` (or, for the tokenizer
benchmark, a :class:`~samtok.tokenizer.api.SAMTokenizer`) from directories; tests pass their own
factories (stub predictors).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from samtok.core.config import to_dict
from samtok.core.errors import SamtokError
from samtok.core.runtime import get_logger
from samtok.eval.benchmarks import Benchmark, make_benchmark
from samtok.eval.config import BenchmarkConfig, EvalConfig, ModelSpec, check_config, max_new_tokens_for
from samtok.eval.report import (
    dir_fingerprint,
    example_grids,
    histogram,
    histogram_image,
    report_markdown,
    save_figure,
    summary_markdown,
    write_json,
)
from samtok.eval.runner import run_items

log = get_logger("samtok.eval")


@dataclass(frozen=True)
class EngineSpec:
    """Picklable engine factory: ``spec(device)`` loads the model (or only the tokenizer) there."""

    model: Optional[str]
    tokenizer: str
    dtype: str = "auto"
    attn_implementation: Optional[str] = None
    batch_size: int = 8
    max_masks: Optional[int] = None
    system_prompt: Optional[str] = None
    max_prompt_length: Optional[int] = None
    baseline: Optional[str] = None  # a constant-answer baseline (ModelSpec.baseline) instead of a model
    pretokenized: Optional[str] = None  # its table, for baseline "majority_span"

    @classmethod
    def of(cls, model: ModelSpec, cfg: EvalConfig, tokenizer_only: bool) -> "EngineSpec":
        g, r = cfg.generation, cfg.runner
        return cls(model=None if tokenizer_only else model.model, tokenizer=model.tokenizer, dtype=r.dtype,
                   attn_implementation=r.attn_implementation, batch_size=g.batch_size, max_masks=g.max_masks,
                   system_prompt=g.system_prompt, max_prompt_length=g.max_prompt_length,
                   baseline=None if tokenizer_only else model.baseline, pretokenized=model.pretokenized)

    def __call__(self, device: torch.device):
        if self.baseline is not None:
            from samtok.mllm.inference import NO_TARGET_ANSWER
            from samtok.mllm.validation import ConstantAnswerPredictor, majority_span_answer
            from samtok.tokenizer.api import SAMTokenizer

            tok = SAMTokenizer.from_pretrained(self.tokenizer, device=device)
            answer = (NO_TARGET_ANSWER if self.baseline == "no_target"
                      else majority_span_answer(self.pretokenized, tok.codec))
            return ConstantAnswerPredictor(tok, answer)
        if self.model is None:
            from samtok.tokenizer.api import SAMTokenizer

            return SAMTokenizer.from_pretrained(self.tokenizer, device=device)
        from samtok.mllm.inference import SamtokPredictor

        return SamtokPredictor.from_pretrained(
            self.model, self.tokenizer, device=str(device), dtype=self.dtype,
            attn_implementation=self.attn_implementation, batch_size=self.batch_size, max_masks=self.max_masks,
            system_prompt=self.system_prompt, max_prompt_length=self.max_prompt_length)


def _tokenizer_fingerprint(path: Optional[str]) -> Optional[str]:
    if not path:
        return None
    try:
        from samtok.tokenizer.checkpoints import file_fingerprint

        return file_fingerprint(path)
    except OSError:
        return None


def evaluate_benchmark(
    cfg: EvalConfig,
    bench: BenchmarkConfig,
    model: ModelSpec,
    out_dir: str | Path,
    engine_factory: Optional[Callable[[torch.device], Any]] = None,
    benchmark: Optional[Benchmark] = None,
) -> Optional[dict]:
    """Run one benchmark for one model and write ``out_dir/report.json`` and ``report.md`` (+ figures).

    Args:
        cfg: the whole evaluation config (decoding, runner, report settings).
        bench: the benchmark to run.
        model: the model entry (its ``tokenizer`` is used by the tokenizer benchmark).
        out_dir: where the report goes.
        engine_factory: ``factory(device) -> engine``; default :class:`EngineSpec` of ``model``.
        benchmark: an already loaded benchmark object (default: built from ``bench``).

    Returns:
        The report (as written to report.json) on global rank 0; ``None`` on other ranks.
    """
    check_config(cfg)
    t_start = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    benchmark = benchmark or make_benchmark(bench, cfg)
    t_loaded = time.perf_counter()
    tokenizer_only = not benchmark.uses_model
    if not tokenizer_only and not model.answers and engine_factory is None:
        raise SamtokError(f"benchmark {bench.title} needs a language model but {model.name!r} has none")
    factory = engine_factory or EngineSpec.of(model, cfg, tokenizer_only)
    # generation.batch_size: prompts per batch (images per batch for the tokenizer benchmark)
    results, predict_seconds = run_items(benchmark.items, benchmark.step, factory, cfg.runner,
                                         max(1, cfg.generation.batch_size), out)
    if results is None:  # not global rank 0
        return None
    t_scored0 = time.perf_counter()
    scores = benchmark.score(results)
    score_seconds = time.perf_counter() - t_scored0

    figures: dict[str, str] = {}
    hist = histogram(scores.per_item, cfg.report.histogram_bins)
    save_figure(histogram_image(hist, f"{bench.title}: per-item {scores.score_name} ({hist['count']} items)",
                                scores.score_name), out, "score_histogram.png", figures, "score_histogram")
    if "mask_ious" in scores.extra:
        mh = histogram(scores.extra["mask_ious"], cfg.report.histogram_bins)
        save_figure(histogram_image(mh, f"{bench.title}: per-mask IoU ({mh['count']} masks)", "IoU"),
                    out, "mask_iou_histogram.png", figures, "mask_iou_histogram")
    example_grids(out, scores.per_item, cfg.report.num_examples,
                  lambda k: benchmark.panel(results[k], scores.per_item[k], scores.score_name), figures)
    if cfg.report.save_predictions:
        with open(out / "predictions.jsonl", "w") as fh:
            for r, s in zip(results, scores.per_item):
                fh.write(json.dumps({**{k: v for k, v in r.items() if not k.endswith("_rles")},
                                     "score": s if s == s else None}) + "\n")

    n = len(benchmark.items)
    total = time.perf_counter() - t_start
    report: dict[str, Any] = {
        "benchmark": bench.benchmark,
        "name": bench.title,
        "model": {"name": model.name, "path": None if tokenizer_only else model.model,
                  "fingerprint": None if tokenizer_only else dir_fingerprint(model.model),
                  "baseline": None if tokenizer_only else model.baseline},
        "tokenizer": {"path": model.tokenizer, "fingerprint": _tokenizer_fingerprint(model.tokenizer)},
        "data": to_dict(bench.data),
        "num_samples": benchmark.num_samples,
        "num_items": n,
        "metrics": scores.metrics,
        "score": {"name": scores.score_name, **hist},
        "generation": None if tokenizer_only else {
            "max_new_tokens": max_new_tokens_for(cfg, bench.benchmark), "do_sample": False,
            "batch_size": cfg.generation.batch_size, "max_masks": cfg.generation.max_masks,
            "prompt_templates": bench.prompt_templates},
        "timing": {
            "load_seconds": t_loaded - t_start,
            "predict_seconds": predict_seconds,
            "score_seconds": score_seconds,
            "total_seconds": total,
            "items_per_second": n / predict_seconds if predict_seconds > 0 else None,
        },
        "runner": to_dict(cfg.runner),
        "figures": figures,
        "config": {"benchmark": to_dict(bench), "generation": to_dict(cfg.generation),
                   "baselines": to_dict(cfg.baselines), "report": to_dict(cfg.report),
                   "conversation_from": cfg.conversation_from,
                   "conversation": to_dict(benchmark.conv) if benchmark.conv is not None else None},
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    if "baselines" in scores.extra:
        report["baselines"] = scores.extra["baselines"]
    write_json(out / "report.json", report)
    (out / "report.md").write_text(report_markdown(json.loads((out / "report.json").read_text())))
    log.info("%s / %s: %s", model.name, bench.title,
             ", ".join(f"{k} {v:.4f}" for k, v in list(scores.metrics.items())[:4] if isinstance(v, float)))
    return report


def planned_runs(cfg: EvalConfig) -> list[tuple[ModelSpec, BenchmarkConfig]]:
    """Every (model, benchmark) pair that applies, benchmark by benchmark in config order: language
    benchmarks for entries that answer (a ``model`` directory or a constant-answer ``baseline``),
    the tokenizer benchmark once per distinct tokenizer directory (the first non-baseline entry
    naming it)."""
    runs = []
    for bench in cfg.benchmarks:
        seen_tokenizers: set[str] = set()
        for model in cfg.models:
            if bench.benchmark == "tokenizer":
                if model.baseline is not None:
                    continue
                key = str(Path(model.tokenizer).resolve())
                if key not in seen_tokenizers:
                    seen_tokenizers.add(key)
                    runs.append((model, bench))
            elif model.answers:
                runs.append((model, bench))
    return runs


def evaluate_config(cfg: EvalConfig, engine_factories: Optional[dict[str, Callable]] = None) -> Optional[dict]:
    """Every planned run, each into ``out_dir/<model>/<benchmark>/``, then ``out_dir/summary.md`` (+ .json).

    ``engine_factories`` optionally maps a model name to its engine factory (tests).
    """
    check_config(cfg)
    out = Path(cfg.out_dir)
    rows = []
    loaded: dict[str, Benchmark] = {}
    for model, bench in planned_runs(cfg):
        if bench.title not in loaded:
            loaded = {bench.title: make_benchmark(bench, cfg)}  # one benchmark's data in memory at a time
        benchmark = loaded[bench.title]
        run_dir = out / model.name / bench.title
        factory = (engine_factories or {}).get(model.name)
        report = evaluate_benchmark(cfg, bench, model, run_dir, factory, benchmark)
        if report is not None:
            rows.append({**report, "report_path": str((run_dir / "report.md").relative_to(out))})
    if not rows:
        return None
    write_json(out / "summary.json", {"runs": [{k: r[k] for k in ("name", "benchmark", "model", "tokenizer",
                                                                    "num_samples", "metrics", "report_path")}
                                               for r in rows]})
    (out / "summary.md").write_text(summary_markdown(rows))
    return {"runs": rows, "summary": str(out / "summary.md")}
