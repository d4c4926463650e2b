"""GRPO across processes on CPU (gloo DDP), checked for real: `samtok rl`'s own recipe under torchrun.

Two processes (``torchrun --nproc_per_node 2``, ``trainer.devices=2``, ``strategy=ddp``) each run
``train_rl`` for 2 optimiser steps; a wrapper records, per rank and step, which prompts the rank
rolled out, and at the end a checksum of the policy's weights. The checks: the ranks saw different
prompts at every step (the distributed sampler splits them), the weights stayed identical across
ranks (gradients all-reduced by DDP even though GRPO optimises manually, over micro-batches), the
global batch logged is 2 x prompts x G, and only rank 0 wrote the final model.

Run ``python tests/test_distributed_rl.py --help`` for the worker entry point.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow

HERE = Path(__file__).resolve()
REPO = HERE.parents[1]
STEPS = 2
PROMPTS = 2  # per rank and step
G = 3


def worker_main(argv: list[str]) -> None:
    """One rank: the RL recipe, recording prompts per step and the final weights."""
    ap = argparse.ArgumentParser(description="torchrun worker of tests/test_distributed_rl.py")
    ap.add_argument("--config", required=True, help="RL config (JSON/YAML)")
    ap.add_argument("--work", required=True, help="where each rank writes rank<k>.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    import samtok.rl.train_rl as recipe
    from samtok.core.config import load_config
    from samtok.rl.config import GRPOConfig

    captured = {}
    build_module = recipe.build_module

    def recording_build_module(*a, **kw):
        module = build_module(*a, **kw)
        original = module.training_step
        seen = captured.setdefault("seen", [])

        def training_step(batch, batch_idx):
            seen.append({"step": int(module.global_step), "ids": [str(i) for i in batch["sample_id"]]})
            return original(batch, batch_idx)

        module.training_step = training_step
        captured["module"] = module
        return module

    recipe.build_module = recording_build_module
    recipe.train_rl(load_config(GRPOConfig, args.config))
    module = captured["module"]
    params = [p.detach().double() for p in module.model.parameters()]
    rank = int(os.environ["RANK"])
    out = {"rank": rank, "seen": captured["seen"], "checksum": [float(sum(p.sum() for p in params)),
                                                                 float(sum((p * p).sum() for p in params))],
           "global_step": int(module.global_step)}
    (Path(args.work) / f"rank{rank}.json").write_text(json.dumps(out))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from llm_setup import build_llm_setup

    from samtok.mllm.export import save_trained_model
    from samtok.mllm.models import TinyModelConfig, build_tiny

    torch.set_num_threads(1)
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("rl_ddp")
    paths = build_llm_setup(root, train_tasks=["gres", "gcg"], val_tasks=["gres"], train_images=8)
    model, proc = build_tiny(TinyModelConfig(), corpus=["Please segment the red circle in this image.", "No target."])
    save_trained_model(model, proc, root / "sft", paths["tok"], {"stage": "sft", "note": "random stand-in"})
    results = {}
    for name, micro in (("one_micro_batch", 0), ("micro_batches", 2)):
        work = root / name
        work.mkdir()
        config = work / "rl.yaml"
        config.write_text(json.dumps({
            "_base_": str(REPO / "configs" / "rl" / "tiny.yaml"),
            "model_dir": str(root / "sft"), "out_dir": str(work / "run"),
            "data": {"mixture": str(paths["mixture"]), "pretokenized": str(paths["pretok"])},
            "grpo": {"prompts_per_step": PROMPTS, "micro_batch_size": micro, "log_completions_every_n_steps": 1},
            "sampling": {"max_new_tokens": 8},
            "loss": {"num_generations": G},
            "eval": {"enabled": False},
            "trainer": {"max_steps": STEPS, "devices": "2", "strategy": "ddp", "threads": 1, "max_minutes": None,
                        "checkpoint_every_n_steps": 1, "log_every_n_steps": 1},
            "progress_bar": False,
        }))
        env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
               "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(HERE.parent)}
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(HERE), "--config", str(config), "--work", str(work)]
        proc_ = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=420, cwd=str(root))
        assert proc_.returncode == 0, proc_.stdout[-3000:] + proc_.stderr[-5000:]
        results[name] = {"ranks": [json.loads((work / f"rank{r}.json").read_text()) for r in range(2)],
                         "run": work / "run"}
    return results


@pytest.mark.parametrize("name", ["one_micro_batch", "micro_batches"])
def test_ranks_roll_out_different_prompts_and_keep_identical_weights(runs, name):
    r0, r1 = runs[name]["ranks"]
    assert r0["global_step"] == r1["global_step"] == STEPS
    for step in range(STEPS):
        a = [s["ids"] for s in r0["seen"] if s["step"] == step]
        b = [s["ids"] for s in r1["seen"] if s["step"] == step]
        assert len(a) == len(b) == 1 and len(a[0]) == len(b[0]) == PROMPTS
        assert not set(a[0]) & set(b[0]), (step, a, b)  # the sampler gave each rank its own prompts
    assert r0["checksum"] == r1["checksum"]  # gradients were all-reduced: the same update on both ranks


@pytest.mark.parametrize("name", ["one_micro_batch", "micro_batches"])
def test_rank_zero_writes_the_model_and_the_global_batch_is_logged(runs, name):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = runs[name]["run"]
    assert (run / "final" / "DONE").is_file()
    values = []
    for f in sorted((run / "tb").rglob("events.out.tfevents.*")):
        acc = EventAccumulator(str(f), size_guidance={"scalars": 0})
        acc.Reload()
        if "trainer/global_batch_size" in acc.Tags()["scalars"]:
            values += [e.value for e in acc.Scalars("trainer/global_batch_size")]
    assert values and set(values) == {2 * PROMPTS * G}


if __name__ == "__main__":
    worker_main(sys.argv[1:])
