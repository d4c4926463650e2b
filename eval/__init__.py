"""samtok.eval — benchmarks, metrics and reports (spec §5; docs/evaluation.md).

Modules (import them directly; ``import samtok.eval`` imports nothing heavy):

* :mod:`samtok.eval.metrics` — torchmetrics ``Metric``s: RES, GRES, GCG, multi-round, rMaskIoU.
* :mod:`samtok.eval.gcg`, :mod:`samtok.eval.captions` — GLaMM's GCG pieces, offline caption metrics.
* :mod:`samtok.eval.baselines` — polygon / RLE / Text4Seg-grid mask-as-text baselines.
* :mod:`samtok.eval.config` — ``EvalConfig`` (every key documented in place).
* :mod:`samtok.eval.benchmarks` — refcoco, gres, gcg, region_caption, mr_seg, tokenizer:
  samples → prompts (``samtok.data.conversations``) → predictions → metrics.
* :mod:`samtok.eval.runner`, :mod:`samtok.eval.lightning` — a plain loop or Lightning's predict loop
  (multi-GPU, every sample counted once).
* :mod:`samtok.eval.report` — report.json / report.md / figures / summary.md.
* :mod:`samtok.eval.oracle` — ground-truth answers + a lossless lookup tokenizer (plumbing check).
* :mod:`samtok.eval.evaluate` — the driver; :mod:`samtok.eval.cli` — ``samtok eval``.
"""
