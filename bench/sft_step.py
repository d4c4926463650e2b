"""SFT step throughput: samples/s and tokens/s of ``SFTLightningModule`` (forward + backward + AdamW).

One fixed, collated batch of referring-segmentation conversations (an image, a prompt, a JSON answer
with a mask span), built by the project's own ``build_training_example`` / ``training_collator``;
the loss is the module's forward (next-token loss on the answer), the optimiser the module's own
``configure_optimizers`` (AdamW parameter groups). Timed: ``steps`` optimiser steps per repeat.

* CPU: a micro random Qwen2.5-VL (full fine-tuning, fp32), once with its small BPE vocabulary and once
  with the real vocabulary's 151,936 embedding rows; and the model ``make sft`` trains (the tiny block
  of ``configs/sft/tiny.yaml``, 128-px images → 64 visual tokens, 8 samples) in fp32 and in bf16-mixed
  (fp32 weights, bf16 autocast: Lightning's ``precision: bf16-mixed``).
* GPU: a Qwen2.5-VL-3B-sized random model (36 layers × 2048, vision 32 × 1280, 151,936 rows) with the
  release's recipe: LoRA r=128 / α=256 on every language linear, embeddings trainable, vision frozen,
  bf16 weights + bf16 autocast, gradient checkpointing, 4 samples per step; peak memory reported.

FLOPs of a step (forward + backward) are counted once by ``torch.utils.flop_counter.FlopCounterMode``
(matrix products and attention, what the multiply units do; with gradient checkpointing the recomputed
forward is counted too); GFLOP/s = that / step time, to compare with the device's peak.

    python bench/sft_step.py [--device cpu|cuda] [--repeats 5] [--quick]
"""

from __future__ import annotations

import sys
from contextlib import nullcontext
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
    measure,
    peak_memory_gib,
    random_image,
    reset_peak_memory,
    resolve_device,
    script_main,
)

NAME = "sft_step"
TITLE = "SFT step (SFTLightningModule: forward + backward + AdamW)"
COLUMNS = ["model", "params (M)", "trainable (M)", "precision", "batch", "tokens/sample", "step (s)", "samples/s",
           "tokens/s", "GFLOP/step", "GFLOP/s", "peak GiB", "spread"]

LABELS = ["red blob", "small green circle", "blue square on the left", "large yellow triangle"]


@dataclass
class SFTCase:
    """One row of the table."""

    label: str
    size: str = "tiny"  # benchkit.QWEN_VL_SIZES key, or "embedded" (configs/sft/tiny.yaml's model)
    vocab_rows: Optional[int] = None  # None: the BPE tokenizer's own size
    lora_r: int = 0  # 0: full fine-tuning of the language model
    bf16: bool = False  # bf16 weights + bf16 autocast (else fp32)
    mixed: bool = False  # fp32 weights + bf16 autocast (bf16-mixed)
    freeze_vision: bool = True  # the release freezes the vision tower; the embedded default trains it
    gradient_checkpointing: bool = False
    batch: int = 4
    image_px: int = 112
    steps: int = 5  # optimiser steps per timed repeat


def conversations(n: int, image_px: int) -> list[tuple[list[dict], list]]:
    """``n`` (conversation, [image]) pairs: a referring prompt and a one-mask JSON answer."""
    from samtok.tokenizer.codec import MaskCodec

    codec = MaskCodec()
    out = []
    for k in range(n):
        label = LABELS[k % len(LABELS)]
        span = codec.format(17 + k, 201 + k)
        answer = f'```json\n[{{"mask_2d": "{span}", "label": "{label}"}}]\n```'
        conv = [{"role": "user", "content": f"<image>Please segment the {label} in this image."},
                {"role": "assistant", "content": answer}]
        out.append((conv, [random_image(image_px, seed=k)]))
    return out


def training_batch(processor, n: int, image_px: int) -> dict:
    from samtok.mllm.sequences import build_training_example, training_collator

    examples = [build_training_example(processor, conv, imgs) for conv, imgs in conversations(n, image_px)]
    return training_collator(processor)(examples)


def to_device(batch: dict, device: str) -> dict:
    return {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}


def prepare_module(case: SFTCase, device: str):
    """(SFTLightningModule, optimizer, processor) for ``case`` on ``device``."""
    from samtok.mllm.sft import LoraSettings, OptimSettings, SFTLightningModule, prepare_model_for_training

    dtype = torch.bfloat16 if case.bf16 and not case.mixed else torch.float32
    model, processor = build_random_qwen_vl(case.size, device, dtype, vocab_rows=case.vocab_rows)
    lora = LoraSettings(enabled=case.lora_r > 0, r=max(1, case.lora_r), alpha=2 * max(1, case.lora_r), dropout=0.05)
    model = prepare_model_for_training(model, lora, freeze_vision=case.freeze_vision,
                                       gradient_checkpointing=case.gradient_checkpointing)
    model.train()
    module = SFTLightningModule(model, processor.tokenizer, OptimSettings(), total_steps=1000).to(device)
    optimizer = module.configure_optimizers()["optimizer"]
    return module, optimizer, processor


def run_case(case: SFTCase, device: str, repeats: int) -> dict:
    module, optimizer, processor = prepare_module(case, device)
    batch = to_device(training_batch(processor, case.batch, case.image_px), device)
    def autocast():
        return torch.autocast(device_type="cuda" if device == "cuda" else "cpu", dtype=torch.bfloat16) \
            if case.bf16 or case.mixed else nullcontext()

    def one_step():
        with autocast():
            loss = module.loss(module(batch).logits, batch["labels"])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def steps():
        for _ in range(case.steps):
            one_step()

    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        one_step()
    flops = counter.get_total_flops()

    reset_peak_memory(device)
    t = measure(steps, device, repeats=repeats)
    step = t.median / case.steps
    tokens = int(batch["attention_mask"].sum())
    params = sum(p.numel() for p in module.parameters())
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    peak = peak_memory_gib(device)
    return {"model": case.label, "params (M)": params / 1e6, "trainable (M)": trainable / 1e6,
            "precision": "bf16-mixed" if case.mixed else "bf16" if case.bf16 else "fp32", "batch": case.batch,
            "tokens/sample": tokens / case.batch, "step (s)": step, "samples/s": case.batch / step,
            "tokens/s": tokens / step, "GFLOP/step": flops / 1e9, "GFLOP/s": flops / 1e9 / step,
            "peak GiB": peak if peak is not None else "n/a (CPU)", "spread": f"{t.spread:.2f}x"}


def default_cases(device: str, quick: bool) -> list[SFTCase]:
    if device == "cuda" and not quick:
        return [SFTCase("Qwen2.5-VL-3B-sized, LoRA r=128 (+ embeddings), grad. ckpt", size="qwen2_5_vl_3b",
                        vocab_rows=QWEN2_5_VOCAB_ROWS, lora_r=128, bf16=True, gradient_checkpointing=True, batch=4,
                        image_px=448, steps=5)]
    if quick:
        return [SFTCase("tiny, full fine-tuning", batch=2, steps=1)]
    return [SFTCase("tiny (BPE vocabulary), full fine-tuning", steps=10),
            SFTCase("tiny with 151,936 vocabulary rows, full fine-tuning", vocab_rows=QWEN2_5_VOCAB_ROWS, steps=3),
            SFTCase("the embedded default's model (configs/sft/tiny.yaml), full fine-tuning", size="embedded",
                    freeze_vision=False, batch=8, image_px=128, steps=5),
            SFTCase("the same, bf16 autocast", size="embedded", mixed=True, freeze_vision=False, batch=8, image_px=128,
                    steps=5)]


def run(device: str = "auto", quick: bool = False, repeats: int = 5,
        cases: Optional[Sequence[SFTCase]] = None) -> BenchResult:
    device = resolve_device(device)
    rows = []
    for case in cases or default_cases(device, quick):
        rows.append(run_case(case, device, repeats))
        if device == "cuda":
            torch.cuda.empty_cache()  # the case's model is gone: free its blocks before the next one
    notes = ["Random weights (no checkpoint); one collated batch reused every step: the data pipeline is not timed.",
             "tokens = non-padding tokens of the batch (image tokens included); samples/s = batch / step time.",
             f"Median of {repeats} timed repeats after one warm-up; spread = slowest / fastest repeat."]
    if device == "cuda":
        notes.append("Single GPU, no DeepSpeed: ZeRO-2 across GPUs shards optimiser states (see docs/distributed.md).")
    return BenchResult(NAME, TITLE, device, device_description(device), COLUMNS, rows, notes,
                       command=command_line(NAME, device, repeats))


def main(argv: Optional[Sequence[str]] = None) -> list[BenchResult]:
    return script_main(run, __doc__, argv)


if __name__ == "__main__":
    main()
