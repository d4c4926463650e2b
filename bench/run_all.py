"""``make bench``: run every benchmark under bench/, print its table, rewrite docs/benchmarks.md.

    python bench/run_all.py                    # every benchmark on this machine's device (GPU if visible)
    python bench/run_all.py --only sft_step    # one (the other sections of the doc are kept)
    python bench/run_all.py --device cpu --repeats 5 --threads 2
    python bench/run_all.py --quick --no-write # micro sizes, nothing written (seconds)

docs/benchmarks.md keeps one section per (benchmark, device kind): a CPU run rewrites the CPU
sections and keeps the GPU ones, a GPU run the other way round; a section never measured says so.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Optional, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent))

import grpo_rollout  # noqa: E402
import pretokenize_throughput  # noqa: E402
import sft_step  # noqa: E402
import tokenizer_throughput  # noqa: E402
from benchkit import (  # noqa: E402
    DOC, BenchResult, apply_threads, kind_of, offline, pending_section, resolve_device, standard_args, update_doc,
)

BENCHMARKS = [tokenizer_throughput, pretokenize_throughput, sft_step, grpo_rollout]

HEADER = """# Benchmarks

Written by `make bench` (`bench/run_all.py`); do not edit between the `bench:` markers by hand.
Each benchmark is a script under `bench/` with small defaults (`python bench/<name>.py --help`);
`run_all.py` runs them all on the machine's device — the GPU when one is visible, else the CPU — and
rewrites the sections of that device kind, keeping the others. Speed is measured here and only
here: unit tests never time anything (docs/STYLE: ratios and throughput live in `bench/`).

How numbers are taken: wall-clock after a warm-up, `torch.cuda.synchronize()` around each timed
region on a GPU, every measurement repeated and the **median** reported with its spread (slowest /
fastest repeat). Random weights everywhere: throughput does not depend on what the weights learned.
The CPU tables come from the project's 2-core CPU machine with two torch threads and nothing else
running (2026-11-23, an AMD EPYC; the SFT-step table 2026-12-06, an Intel Xeon — each device line
names its CPU and the load average, which includes the benchmark's own warm-up).
Earlier tables taken with one thread while other training jobs ran were 1.5–2x slower: read the
numbers as orders of magnitude and the ratios (cached vs per-mask) as the result.

| benchmark | measures |
|---|---|
| `tokenizer_throughput` | masks/s of `SAMTokenizer` encode/decode with the image embedding computed once per image vs once per mask (what the release's scripts do), for 1/4/16/64 masks per image; images/s |
| `pretokenize_throughput` | masks/s of `samtok.data.pretokenize` (Lightning predict loop, shards) on a synthetic set |
| `sft_step` | samples/s and tokens/s of an SFT optimiser step of `SFTLightningModule`; peak GPU memory |
| `grpo_rollout` | rollouts/s and optimisation steps/s of the RL Lightning module (G = 8) |
"""

GPU_PENDING = ("GPU numbers pending: no GPU was available when this document was last written. On a GPU machine, "
               "`python bench/run_all.py` (or `make bench`) fills this section: {what}.")
GPU_WHAT = {
    "tokenizer_throughput": "Hiera-L at 1024 px with random weights in bf16, masks/s for 1/4/16/64 masks per image "
                            "and images/s with 1 and 8 images per call",
    "pretokenize_throughput": "Hiera-L at 1024 px, 64 synthetic images",
    "sft_step": "a Qwen2.5-VL-3B-sized random model, LoRA r=128, bf16, gradient checkpointing, 4 samples per step: "
                "samples/s, tokens/s and peak memory",
    "grpo_rollout": "a Qwen2.5-VL-3B-sized random model, LoRA r=64, bf16, 8 prompts x G 8, 256 new tokens",
}
CPU_PENDING = "CPU numbers not measured yet: `python bench/run_all.py --device cpu`."


def order() -> list[tuple[str, str]]:
    return [(b.NAME, kind) for b in BENCHMARKS for kind in ("cpu", "gpu")]


def defaults() -> dict[str, str]:
    out = {}
    for b in BENCHMARKS:
        out[f"{b.NAME}:gpu"] = pending_section(b.NAME, b.TITLE, "gpu", GPU_PENDING.format(what=GPU_WHAT[b.NAME]))
        out[f"{b.NAME}:cpu"] = pending_section(b.NAME, b.TITLE, "cpu", CPU_PENDING)
    return out


def summary_lines(results: Sequence[BenchResult]) -> list[str]:
    """A few headline ratios and throughputs for the console."""
    lines = []
    for r in results:
        if not r.rows:
            lines.append(f"{r.name} ({r.kind}): {'; '.join(r.notes)}")
            continue
        if r.name == "tokenizer_throughput":
            top = max(r.rows, key=lambda x: (x["images/call"] == 1, x["masks/image"]))
            lines.append(f"{r.name} ({r.kind}): {top['masks/image']} masks/image: encode {top['encode cached masks/s']:.0f} "
                         f"masks/s cached vs {top['encode per-mask masks/s']:.0f} per-mask ({top['encode speed-up']}), "
                         f"decode {top['decode speed-up']}")
        elif r.name == "pretokenize_throughput":
            row = r.rows[0]
            lines.append(f"{r.name} ({r.kind}): {row['predict loop masks/s']:.0f} masks/s in the predict loop, "
                         f"{row['end-to-end masks/s']:.0f} end to end")
        elif r.name == "sft_step":
            lines += [f"{r.name} ({r.kind}): {row['model']}: {row['samples/s']:.2f} samples/s, {row['tokens/s']:.0f} tokens/s"
                      for row in r.rows]
        elif r.name == "grpo_rollout":
            lines += [f"{r.name} ({r.kind}): {row['model']}: {row['rollouts/s']:.1f} rollouts/s, "
                      f"{row['opt. steps/s']:.2f} opt. steps/s" for row in r.rows]
    return lines


def run_all(device: str = "auto", only: Optional[Sequence[str]] = None, quick: bool = False, repeats: int = 5,
            doc: Optional[Path] = DOC, header: str = HEADER) -> list[BenchResult]:
    """Run the benchmarks (``only``: a subset by name), print them, and rewrite ``doc`` (None: don't)."""
    device = resolve_device(device)
    names = [b.NAME for b in BENCHMARKS]
    unknown = sorted(set(only or ()) - set(names))
    if unknown:
        raise SystemExit(f"unknown benchmark(s) {unknown}; known: {names}")
    results = []
    for bench in BENCHMARKS:
        if only and bench.NAME not in only:
            continue
        t0 = time.perf_counter()
        print(f"== {bench.NAME} on {device} ...", flush=True)
        result = bench.run(device, quick=quick, repeats=repeats)
        print(result.markdown() + f"\n({time.perf_counter() - t0:.0f} s)\n", flush=True)
        results.append(result)
    print("\n".join(["== summary", *summary_lines(results)]))
    if doc is not None:
        new = {f"{r.name}:{kind_of(r.device)}": r.markdown() for r in results}
        update_doc(Path(doc), header, order(), new, defaults())
        print(f"wrote {doc}")
    return results


def main(argv: Optional[Sequence[str]] = None) -> list[BenchResult]:
    ap = standard_args(__doc__.splitlines()[0])  # --device --repeats --quick (implies --no-write) --threads
    ap.add_argument("--only", nargs="*", default=None, help=f"benchmarks to run: {[b.NAME for b in BENCHMARKS]}")
    ap.add_argument("--doc", default=str(DOC), help="the Markdown file to rewrite")
    ap.add_argument("--no-write", action="store_true", help="print only (also implied by --quick)")
    args = ap.parse_args(argv)
    offline()
    apply_threads(args.threads)
    doc = None if (args.no_write or args.quick) else Path(args.doc)
    return run_all(args.device, args.only, args.quick, args.repeats, doc)


if __name__ == "__main__":
    main()
