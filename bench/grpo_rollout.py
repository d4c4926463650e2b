"""GRPO throughput: rollouts/s and optimisation steps/s of the RL Lightning module, G = 8.

Runs ``samtok.rl.lightning.GRPOLightningModule`` (around ``samtok.rl.algorithm.GRPOAlgorithm``) in a
real Lightning fit built by ``samtok.core.trainer.build_trainer``, on referring-segmentation prompts
(an image and "Please segment the … in this image.") with the paper's answer-matching reward and the
k3 KL to a reference (beta 0.01). Per batch the module logs its own timings; reported are the
medians over the timed batches (the first batch is the warm-up):

* rollouts/s = completions / (generation + reward + reference log-probs) time;
* optimisation steps/s = 1 / (batch time − rollout time) (log-probs, loss, backward, clip, AdamW);
* batches/s overall.

* CPU: the tiny random Qwen2.5-VL (full fine-tuning, frozen copy as reference), 2 prompts × G 8,
  32 new tokens (a random model never stops early: every completion is full length).
* GPU: a Qwen2.5-VL-3B-sized random model, LoRA r=64 (the RL default; the reference is the policy
  with adapters disabled), bf16, 8 prompts × G 8, 256 new tokens, micro-batches of 8.

Skipped (with a note) when the RL Lightning module is not importable.

    python bench/grpo_rollout.py [--device cpu|cuda] [--repeats 5] [--quick]
"""

from __future__ import annotations

import statistics
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from benchkit import (  # noqa: E402
    QWEN2_5_VOCAB_ROWS,
    BenchResult,
    command_line,
    build_random_qwen_vl,
    device_description,
    peak_memory_gib,
    random_image,
    reset_peak_memory,
    resolve_device,
    script_main,
)

NAME = "grpo_rollout"
TITLE = "GRPO (rl Lightning module): rollouts and optimisation steps"
COLUMNS = ["model", "prompts x G", "new tokens", "rollouts/s", "generation share", "opt. steps/s", "batches/s",
           "peak GiB", "spread"]


@dataclass
class GRPOCase:
    label: str
    size: str = "tiny"
    vocab_rows: Optional[int] = None
    lora_r: int = 0  # 0: full fine-tuning with a frozen copy as reference; > 0: reference = adapters disabled
    bf16: bool = False
    prompts: int = 2
    group: int = 8
    max_new_tokens: int = 32
    micro_batch_size: int = 0
    image_px: int = 112


def rl_module_available() -> Optional[str]:
    """``None`` when the RL Lightning module imports, else why not."""
    try:
        import samtok.rl.algorithm  # noqa: F401
        import samtok.rl.lightning  # noqa: F401
    except ImportError as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


def prompt_items(processor, n: int, image_px: int) -> list[dict]:
    """``n`` prompt items shaped like ``RLPromptDataset``'s (model inputs + reference answer + columns)."""
    from samtok.mllm.sequences import build_prompt_example
    from samtok.tokenizer.codec import MaskCodec

    from sft_step import LABELS

    codec = MaskCodec()
    items = []
    for k in range(n):
        label = LABELS[k % len(LABELS)]
        prompt = [{"role": "user", "content": f"<image>Please segment the {label} in this image."}]
        images = [random_image(image_px, seed=k)]
        answer = f'```json\n[{{"mask_2d": "{codec.format(17 + k, 201 + k)}", "label": "{label}"}}]\n```'
        item = {"prompt": prompt, "images": images, "ground_truth": answer, "targets": [str(k)], "task": "res",
                "sample_id": f"bench{k}", "source": "bench", "image_id": str(k), "meta": {}}
        item.update(build_prompt_example(processor, prompt, images))
        items.append(item)
    return items


def run_case(case: GRPOCase, device: str, batches: int) -> dict:
    from torch.utils.data import DataLoader

    from samtok.core.trainer import TrainerConfig, build_trainer
    from samtok.data.datamodule import RLCollator
    from samtok.mllm.generation import SamplingConfig
    from samtok.mllm.sequences import generation_collator
    from samtok.mllm.sft import LoraSettings, OptimSettings, prepare_model_for_training
    from samtok.rl.algorithm import GRPOAlgorithm, ReferencePolicy, disable_dropout
    from samtok.rl.grpo import GRPOLossConfig
    from samtok.rl.lightning import GRPOLightningModule
    from samtok.rl.rewards import build_reward_fn

    dtype = torch.bfloat16 if case.bf16 else torch.float32
    model, processor = build_random_qwen_vl(case.size, device, dtype, vocab_rows=case.vocab_rows)
    reference = ReferencePolicy.frozen_copy(model) if case.lora_r == 0 else ReferencePolicy("adapters_disabled")
    lora = LoraSettings(enabled=case.lora_r > 0, r=max(1, case.lora_r), alpha=2 * max(1, case.lora_r), dropout=0.0,
                        train_embeddings=False)
    model = prepare_model_for_training(model, lora, freeze_vision=True)
    disable_dropout(model)
    loss = GRPOLossConfig(num_generations=case.group, beta=0.01)
    sampling = SamplingConfig(max_new_tokens=case.max_new_tokens, do_sample=True, temperature=1.0)
    algo = GRPOAlgorithm(model, processor, build_reward_fn(tokenizer=processor.tokenizer), loss, sampling,
                         micro_batch_size=case.micro_batch_size, reference=reference)
    module = GRPOLightningModule(algo, OptimSettings(lr=1e-6, weight_decay=0.01), total_steps=batches,
                                 log_completions_every_n_steps=0)
    items = prompt_items(processor, case.prompts, case.image_px) * batches
    loader = DataLoader(items, batch_size=case.prompts, shuffle=False,
                        collate_fn=RLCollator(generation_collator(processor).pad_token_id))
    tcfg = TrainerConfig(accelerator="gpu" if device == "cuda" else "cpu", devices="1", max_steps=batches,
                         precision="bf16-mixed" if case.bf16 else "32-true", checkpoint_every_n_steps=0,
                         val_every_n_steps=0, log_every_n_steps=1)
    reset_peak_memory(device)
    with tempfile.TemporaryDirectory(prefix="samtok-bench-grpo-") as tmp:
        trainer = build_trainer(tcfg, tmp, per_device_batch=case.prompts * case.group, batch_unit="completions",
                                accumulate_grad_batches=1, gradient_clip_val=None, limit_val_batches=0,
                                use_distributed_sampler=False)
        trainer.fit(module, train_dataloaders=loader)
    timed = module.history[1:] or module.history  # the first batch is the warm-up
    n = case.prompts * case.group
    rollout = [sum(h.get(f"time/{k}_s", 0.0) for k in ("generation", "reward", "logprobs")) for h in timed]
    gen = [h.get("time/generation_s", 0.0) for h in timed]
    step = [h["time/step_s"] for h in timed]
    opt = [max(1e-9, s - r) for s, r in zip(step, rollout)]
    spread = max(step) / min(step) if min(step) > 0 else float("inf")
    peak = peak_memory_gib(device)
    return {"model": case.label, "prompts x G": f"{case.prompts} x {case.group}", "new tokens": case.max_new_tokens,
            "rollouts/s": n / statistics.median(rollout), "generation share":
                f"{statistics.median(gen) / statistics.median(step):.0%}",
            "opt. steps/s": 1.0 / statistics.median(opt), "batches/s": 1.0 / statistics.median(step),
            "peak GiB": peak if peak is not None else "n/a (CPU)", "spread": f"{spread:.2f}x"}


def default_cases(device: str, quick: bool) -> list[GRPOCase]:
    if device == "cuda" and not quick:
        return [GRPOCase("Qwen2.5-VL-3B-sized, LoRA r=64, bf16", size="qwen2_5_vl_3b", vocab_rows=QWEN2_5_VOCAB_ROWS,
                         lora_r=64, bf16=True, prompts=8, group=8, max_new_tokens=256, micro_batch_size=8,
                         image_px=448)]
    if quick:
        return [GRPOCase("tiny, full fine-tuning", prompts=1, group=2, max_new_tokens=4)]
    return [GRPOCase("tiny, full fine-tuning (reference: frozen copy)")]


def run(device: str = "auto", quick: bool = False, repeats: int = 5,
        cases: Optional[Sequence[GRPOCase]] = None) -> BenchResult:
    device = resolve_device(device)
    command = command_line(NAME, device, repeats)
    missing = rl_module_available()
    if missing:
        return BenchResult(NAME, TITLE, device, device_description(device), COLUMNS, [],
                           [f"Skipped: the RL Lightning module is not available ({missing})."], command=command)
    rows = [run_case(c, device, batches=max(1, repeats) + 1) for c in (cases or default_cases(device, quick))]
    notes = ["Random weights: completions never stop early, so every rollout has the full number of new tokens.",
             "rollouts/s counts completions (prompts x G) over generation + reward + reference log-probs; "
             "opt. steps/s = one optimiser step (num_iterations 1) over the rest of the batch's time.",
             f"Median over {repeats} timed batches after one warm-up batch; spread = slowest / fastest batch."]
    return BenchResult(NAME, TITLE, device, device_description(device), COLUMNS, rows, notes, command=command)


def main(argv: Optional[Sequence[str]] = None) -> list[BenchResult]:
    return script_main(run, __doc__, argv)


if __name__ == "__main__":
    main()
