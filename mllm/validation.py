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
from samtok.mllm.inference import NO_TARGET_ANSWER, Completion, SamtokPredictor

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


def majority_span_answer(pretokenized: str, codec=None) -> str:
    """The answer text of the ``majority_span`` baseline: the most frequent code pair as one mask
    (``codec``: the evaluated tokenizer's, for its codebook size)."""
    from samtok.data.conversations import mask_answer
    from samtok.tokenizer.codec import MaskCodec

    c0, c1 = majority_span(pretokenized)
    return mask_answer([((codec or MaskCodec()).format(c0, c1), "object")])


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
            answers["majority_span"] = majority_span_answer(spec.pretokenized, tok.codec)
        answers["no_target"] = NO_TARGET_ANSWER
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


TABLE_ROWS = (
    ("res/cIoU", "RES cIoU"), ("res/gIoU", "RES gIoU"), ("res/span_exact", "RES span exact"),
    ("res/first_code_exact", "RES first code exact"), ("res/on_an_object", "RES answers on an object"),
    ("res/right_object", "RES ... the referred one"),
    ("gres/gIoU", "GRES gIoU"), ("gres/cIoU", "GRES cIoU"), ("gres/N-acc", "GRES N-acc"),
    ("gres/T-acc", "GRES T-acc"), ("gres/span_exact", "GRES span exact"),
)
"""The generation metrics of :func:`baseline_table`, in order (key in the flat results, row name)."""
CHANCE_OF = {"res/right_object": "res/right_object_chance"}
"""Rows whose chance column is a metric of the same results (a random pick among the image's objects)."""


def code_majority(pretokenized: str) -> dict[str, float]:
    """Teacher-forced baselines of the code accuracies: the share of the most frequent first / second
    code in the pre-tokenized table (what always writing that code scores) and uniform chance."""
    from samtok.data.pretokenize import load_pretokenized

    ds = load_pretokenized(pretokenized)
    out = {}
    for name, column in (("acc_c0", "c0"), ("acc_c1", "c1")):
        values = [v for v in ds[column] if v >= 0]
        counts = Counter(values)
        out[name] = counts.most_common(1)[0][1] / len(values) if values else float("nan")
    return out


def baseline_table(generation: dict[str, float], teacher_forced: Optional[dict[str, float]] = None,
                   majority_codes: Optional[dict[str, float]] = None, codebook_size: int = 256) -> str:
    """A plain-text table of the model's validation metrics next to the baselines scored by the
    same code: the most frequent code pair as the answer, always ``No target.``, and — for the
    teacher-forced code accuracies — the most frequent code and uniform chance."""
    cols = ("model", "majority span", "No target.", "chance")
    rows: list[tuple[str, list[Optional[float]]]] = []
    for name in ("acc_c0", "acc_c1"):
        if teacher_forced and f"val/{name}" in teacher_forced:
            majority = (majority_codes or {}).get(name)
            rows.append((f"teacher-forced {name} (val)",
                         [teacher_forced[f"val/{name}"], majority, None, 1.0 / codebook_size]))
    for key, label in TABLE_ROWS:
        if key in generation:
            rows.append((label, [generation.get(key), generation.get(f"baseline/majority_span/{key}"),
                                 generation.get(f"baseline/no_target/{key}"), generation.get(CHANCE_OF.get(key, ""))]))
    width = max([len("metric")] + [len(r[0]) for r in rows])
    fmt = lambda v: f"{v:>13.3f}" if isinstance(v, float) and v == v else f"{'-':>13}"  # noqa: E731
    lines = [f"{'metric'.ljust(width)}  " + "  ".join(f"{c:>13}" for c in cols)]
    lines += [f"{label.ljust(width)}  " + "  ".join(fmt(None if v is None else float(v)) for v in vals)
              for label, vals in rows]
    return "\n".join(lines)


def exact_span_match(model, processor, examples: Sequence[tuple[list[dict], list, str]], batch_size: int = 16,
                     max_new_tokens: int = 96) -> dict[str, float]:
    """Greedy answers of ``model`` to ``(prompt messages, images, reference answer)`` triples: the
    share whose valid mask spans are the reference's, code pair by code pair IN ORDER (stricter than
    the set comparison of the benchmarks' ``span_exact``), and the same on first codes."""
    from samtok.mllm.generation import greedy_texts
    from samtok.tokenizer.codec import MaskCodec

    codec = MaskCodec()
    texts = greedy_texts(model, processor, [(messages, images) for messages, images, _ in examples], batch_size,
                         max_new_tokens)
    exact = first = 0
    for (_, _, answer), text in zip(examples, texts):
        gt, pred = codec.parse_codes(answer), codec.parse_codes(text)
        exact += int(gt == pred)
        first += int([c[0] for c in gt] == [c[0] for c in pred])
    n = max(1, len(examples))
    return {"examples": float(len(examples)), "spans_in_order_exact": exact / n, "first_codes_in_order_exact": first / n}


def training_set_exact_match(model_dir: str | Path, dataset, num_examples: int, batch_size: int = 16,
                             max_new_tokens: int = 96, device: Optional[str] = None,
                             dtype: str = "auto") -> dict[str, float]:
    """The plumbing check: :func:`exact_span_match` of the SAVED model on the first ``num_examples``
    training examples, with the very prompts it was trained on (``dataset``: the SFT datamodule's
    ``train_set``).

    A model that cannot reproduce answers it was trained on until its loss is near zero points at
    a bug in labels, masking, embeddings, saving or generation, not at a lack of training.
    """
    from samtok.data.conversations import example_images, prompt_only
    from samtok.mllm.models import load_model_and_processor

    model, processor = load_model_and_processor(str(model_dir), dtype=dtype, device=device)
    n = min(int(num_examples), len(dataset))
    examples = []
    for j in range(n):
        e = dataset.chat_example(j)
        examples.append((prompt_only(e).messages, example_images(e), e.answer))
    return {f"train/{k}": v for k, v in exact_span_match(model, processor, examples, batch_size, max_new_tokens).items()}
