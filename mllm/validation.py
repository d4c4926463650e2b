"""Generation-based validation of a QwenVL-SAMTok model, next to baselines scored by the same code.

Used at the end of SFT and GRPO: the model directory is run through the ``samtok eval``
benchmarks (prompts from the training mixture's conversation settings, spans decoded with the
mask tokenizer at the image size), and so are two constant-answer baselines:

* ``majority_span`` — always the most frequent code pair of the pre-tokenized table, as one mask
  (what a model that learned the answer format but nothing about the image would score);
* ``no_target`` — always ``No target.`` (the majority answer of a no-target-heavy GRES split).

Metrics come back flat: ``{"res/cIoU": ..., "gres/N-acc": ..., "baseline/majority_span/res/cIoU": ...}``.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from samtok.core.runtime import get_logger
from samtok.mllm.inference import Completion, SamtokPredictor

log = get_logger("mllm.validation")


class ConstantAnswerPredictor(SamtokPredictor):
    """A predictor that answers every prompt with ``answer`` (parsing and decoding stay real)."""

    def __init__(self, tokenizer, answer: str, **kwargs: Any):
        super().__init__(model=None, processor=None, tokenizer=tokenizer, **kwargs)
        self.answer = answer

    def generate_texts(self, requests: Sequence[Any], sampling: Any) -> list[Completion]:
        return [Completion(text=self.answer, finished=True, num_tokens=0) for _ in requests]


@dataclass
class ValidationSpec:
    mixture: str  # the training mixture (its conversation settings give the prompts)
    tokenizer: str  # mask tokenizer directory
    split: str = "val"  # which synthetic/real split the benchmarks read (through the mixture's val entries)
    data: dict = field(default_factory=dict)  # DataSpec of the benchmarks: {"kind": ..., "args": {...}}
    tasks: Sequence[str] = ("refcoco", "gres")
    max_samples: int = 64
    max_new_tokens: int = 96
    batch_size: int = 16
    baselines: bool = True
    pretokenized: Optional[str] = None  # for the majority span


def majority_span(pretokenized: str) -> tuple[int, int]:
    from samtok.data.pretokenize import load_pretokenized

    ds = load_pretokenized(pretokenized)
    counts = Counter(zip(ds["c0"], ds["c1"]))
    (c0, c1), _ = counts.most_common(1)[0]
    return int(c0), int(c1)


def _eval_config(spec: ValidationSpec, out_dir: Path, models: list[dict]):
    from samtok.core.config import from_dict
    from samtok.eval.config import EvalConfig

    benches = [{"benchmark": t, "data": spec.data, "max_samples": spec.max_samples} for t in spec.tasks]
    raw = {
        "out_dir": str(out_dir),
        "models": models,
        "benchmarks": benches,
        "conversation_from": spec.mixture,
        "generation": {"batch_size": spec.batch_size,
                       "max_new_tokens": {t: spec.max_new_tokens for t in ("refcoco", "gres", "mr_seg")}},
        "runner": {"lightning": False},
        "report": {"num_examples": 2},
    }
    return from_dict(EvalConfig, raw, source="validation")


def _flatten(report: dict, prefix: str) -> dict[str, float]:
    bench = "res" if report["benchmark"] == "refcoco" else report["benchmark"]
    out = {}
    for k, v in report.get("metrics", {}).items():
        if isinstance(v, (int, float)) and v is not None:
            out[f"{prefix}{bench}/{k}"] = float(v)
    return out


def generation_validation(model_dir: str | Path, spec: ValidationSpec, out_dir: str | Path) -> dict[str, float]:
    """Benchmarks for ``model_dir`` and (optionally) the constant-answer baselines."""
    from samtok.eval.evaluate import evaluate_benchmark
    from samtok.eval.benchmarks import make_benchmark
    from samtok.tokenizer.api import SAMTokenizer

    out = Path(out_dir)
    cfg = _eval_config(spec, out, [{"name": "model", "model": str(model_dir), "tokenizer": spec.tokenizer}])
    results: dict[str, float] = {}
    tok = SAMTokenizer.from_pretrained(spec.tokenizer) if spec.baselines else None
    answers = {}
    if spec.baselines:
        if spec.pretokenized:
            c0, c1 = majority_span(spec.pretokenized)
            from samtok.data.conversations import mask_answer

            answers["majority_span"] = mask_answer([(tok.codec.format(c0, c1), "object")])
        answers["no_target"] = "No target."
    for bench in cfg.benchmarks:
        benchmark = make_benchmark(bench, cfg)
        report = evaluate_benchmark(cfg, bench, cfg.models[0], out / "model" / bench.title, benchmark=benchmark)
        if report:
            results.update(_flatten(report, ""))
        for name, answer in answers.items():
            factory = (lambda text: (lambda device: ConstantAnswerPredictor(tok, text)))(answer)
            rep = evaluate_benchmark(cfg, bench, cfg.models[0], out / f"baseline_{name}" / bench.title,
                                     engine_factory=factory, benchmark=benchmark)
            if rep:
                results.update(_flatten(rep, f"baseline/{name}/"))
    return results
