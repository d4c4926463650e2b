"""``samtok demo``: the whole pipeline on the embedded default, stage by stage, with a summary.

Each stage runs as its own ``samtok`` process (exactly what a user would type), so a failure names
its stage and memory is returned between stages. A stage whose result already exists is skipped
(``--fresh`` reruns everything).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from samtok.core.errors import SamtokError


@dataclass(frozen=True)
class Stage:
    name: str
    args: tuple[str, ...]
    done: str  # the file whose existence means the stage is complete
    budget_min: float  # the CPU budget for this stage


STAGES = (
    Stage("synth", ("synth", "--config", "configs/synth/default.yaml", "out_dir=runs/synth", "preview=true"),
          "runs/synth/DONE", 1),
    Stage("train-tokenizer", ("train-tokenizer", "--config", "configs/tokenizer/tiny.yaml"),
          "runs/tokenizer/final/model.safetensors", 15),
    Stage("pretokenize", ("pretokenize", "--tokenizer", "runs/tokenizer/final", "--data",
                          "configs/data/synth_mixture.yaml", "--out", "runs/pretok"), "runs/pretok/DONE", 2),
    Stage("sft", ("sft", "--config", "configs/sft/tiny.yaml"), "runs/sft/final/DONE", 15),
    Stage("rl", ("rl", "--config", "configs/rl/tiny.yaml"), "runs/rl/final/DONE", 8),
    Stage("eval", ("eval", "--config", "configs/eval/tiny.yaml"), "runs/eval/summary.md", 3),
)


def build_parser(name: str, parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--fresh", action="store_true", help="delete runs/ first and rerun every stage")
    parser.add_argument("--until", choices=[s.name for s in STAGES], help="stop after this stage")
    parser.add_argument("--only", choices=[s.name for s in STAGES], help="run just this stage")


def _samtok() -> list[str]:
    exe = Path(sys.executable).with_name("samtok")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "samtok"]


def run(name: str, args: argparse.Namespace) -> int:
    if args.fresh and Path("runs").exists():
        shutil.rmtree("runs")
    stages = [s for s in STAGES if args.only in (None, s.name)]
    if args.until:
        stages = stages[: [s.name for s in stages].index(args.until) + 1]
    timings: list[tuple[str, str, float]] = []
    t_all = time.time()
    for k, stage in enumerate(stages, 1):
        header = f"[{k}/{len(stages)}] {stage.name}"
        if Path(stage.done).exists() and args.only is None:
            print(f"{header}: already done ({stage.done}); --fresh reruns it", flush=True)
            timings.append((stage.name, "skipped", 0.0))
            continue
        print(f"{header}: samtok {' '.join(stage.args)}  (budget ~{stage.budget_min:g} min)", flush=True)
        t0 = time.time()
        rc = subprocess.call(_samtok() + list(stage.args))
        minutes = (time.time() - t0) / 60
        timings.append((stage.name, "ok" if rc == 0 else f"failed ({rc})", minutes))
        if rc != 0:
            _print_summary(timings, time.time() - t_all)
            raise SamtokError(f"stage {stage.name} failed with exit code {rc}; fix it and rerun `make demo` "
                              "(finished stages are skipped)")
    _print_summary(timings, time.time() - t_all)
    return 0


def _load(path: str) -> dict:
    p = Path(path)
    return json.loads(p.read_text()) if p.is_file() else {}


def _print_summary(timings: list[tuple[str, str, float]], seconds: float) -> None:
    print("\n── demo summary ──")
    for name, status, minutes in timings:
        print(f"  {name:16s} {status:12s} {minutes:6.1f} min")
    print(f"  {'total':16s} {'':12s} {seconds / 60:6.1f} min")
    tok = _load("runs/tokenizer/summary.json").get("stage1", {})
    if tok:
        print(f"  tokenizer: val rMaskIoU {tok.get('val/rMaskIoU', float('nan')):.3f} "
              f"(first code only {tok.get('val/rMaskIoU_first_code', float('nan')):.3f})")
    sft = _load("runs/sft/summary.json").get("generation", {})
    if sft:
        print("  sft (held-out val; in brackets: always the most frequent span / always 'No target.'):")
        for key in ("res/cIoU", "res/gIoU", "gres/gIoU", "gres/cIoU", "gres/N-acc", "gres/T-acc"):
            if isinstance(sft.get(key), (int, float)) and sft[key] == sft[key]:  # present and not NaN
                base = [sft.get(f"baseline/{b}/{key}") for b in ("majority_span", "no_target")]
                shown = " / ".join("-" if v is None or v != v else f"{v:.3f}" for v in base)
                print(f"    {key:12s} {sft[key]:.3f}  [{shown}]")
    rl = _load("runs/rl/summary.json")
    if rl.get("before") and rl.get("after"):
        print("  rl (GRES val, before -> after):")
        for key in ("gIoU", "cIoU", "N-acc", "T-acc", "mean_reward"):
            b, a = rl["before"].get(key), rl["after"].get(key)
            if isinstance(b, (int, float)) and isinstance(a, (int, float)) and a == a and b == b:
                print(f"    {key:12s} {b:.3f} -> {a:.3f} ({a - b:+.3f})")
    print("  artefacts: runs/synth/preview.png, runs/tokenizer/final/, runs/pretok/, runs/sft/final/, "
          "runs/rl/final/, runs/eval/summary.md; TensorBoard: make tensorboard")
