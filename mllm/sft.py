"""Supervised fine-tuning of QwenVL-SAMTok: configs, model preparation and the LightningModule.

The release recipe (spec §3): LoRA r=128, α=256, dropout 0.05 on every linear layer of the
language model; ``embed_tokens`` and ``lm_head`` fully trainable; vision tower and merger frozen;
plain next-token loss on assistant turns; AdamW lr 2e-5, weight decay 0.05, clip 1.0, 5% warm-up +
cosine, bf16, ZeRO-2, gradient checkpointing. Full fine-tuning is an option (the tiny embedded
default uses it: a random model has nothing for LoRA to preserve).
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from typing import Any, Optional

import lightning as L
import torch

from samtok.core.runtime import get_logger
from samtok.mllm.models import TinyModelConfig

log = get_logger("mllm.sft")

#: every linear layer of the language model (not the vision tower / merger), Qwen2.5-VL and Qwen3-VL
LANGUAGE_LINEARS = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"


@dataclass
class LoraSettings:
    enabled: bool = True  # False: full fine-tuning of the language model
    r: int = 128
    alpha: int = 256
    dropout: float = 0.05
    target_modules: str = LANGUAGE_LINEARS  # regex over module names (peft full match)
    train_embeddings: bool = True  # embed_tokens and lm_head fully trainable (release: yes)


@dataclass
class SFTModelSettings:
    path: Optional[str] = None  # local Qwen2.5-VL / Qwen3-VL directory; None: build `tiny` from scratch
    tiny: TinyModelConfig = field(default_factory=TinyModelConfig)
    dtype: str = "float32"  # weights dtype when loading `path` (bf16 on GPU: set trainer.precision too)
    min_pixels: Optional[int] = None  # image resize bounds; release: 4*28*28 .. 2048*28*28
    max_pixels: Optional[int] = None
    freeze_vision: bool = True  # vision tower and merger frozen (release)
    gradient_checkpointing: bool = False
    attn_implementation: Optional[str] = None  # e.g. flash_attention_2 on GPU; None: the model's default
    # rows of the 512 code words: "statistics" (the release: mean + 0.02 N(0,1) std of the text rows),
    # "codebook" (ours: the mask tokenizer's code vectors, projected; mllm.vocab.init_code_rows_from_codebooks)
    # or "geometry" (ours: first-code rows from the mean box of each code's training masks, a kernel over
    # boxes; mllm.vocab.init_first_code_rows_from_geometry). Only when the model is built from scratch.
    mask_embedding_init: str = "statistics"
    # keep the output rows of the first codes as initialised (gradient zeroed; needs optim.weight_decay 0)
    freeze_first_code_head: bool = False


@dataclass
class SFTDataSettings:
    mixture: str = "configs/data/synth_mixture.yaml"  # MixtureConfig YAML (docs/data.md)
    pretokenized: str = "runs/pretok"  # output of `samtok pretokenize` for this mixture
    tokenizer: str = "runs/tokenizer/final"  # the SAMTok tokenizer the table was made with
    batch_size: int = 4  # samples per device (release: 4)
    max_length: int = 8192  # longer samples are dropped (release: 8192)
    length_grouped: bool = True  # batches of similar length (release: yes)
    packing: bool = False
    val_samples: int = 256  # held-out samples for teacher-forced validation


@dataclass
class OptimSettings:
    lr: float = 2e-5
    weight_decay: float = 0.05
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    warmup_fraction: float = 0.05
    min_lr_ratio: float = 0.0
    # multipliers of lr per parameter group: lora, embeddings, lm_head, language, vision
    lr_multipliers: dict[str, float] = field(default_factory=dict)


def _synthetic_val() -> dict:
    return {"kind": "synthetic", "args": {"root": "runs/synth", "split": "val"}}


@dataclass
class GenerationValSettings:
    """End-of-training validation by generation (``samtok eval`` benchmarks + constant-answer baselines)."""

    enabled: bool = True
    tasks: list[str] = field(default_factory=lambda: ["refcoco", "gres"])  # samtok eval benchmark names
    data: dict = field(default_factory=_synthetic_val)  # benchmark data: {kind, args} as in configs/eval
    max_samples: int = 64  # per task
    max_new_tokens: int = 96
    baselines: bool = True  # also score "most frequent span" and "No target." answers
    train_examples: int = 0  # >0: greedy exact span match on this many TRAINING examples (the plumbing check)
    every_validation: bool = False  # also at every validation during training: a curve over steps and minutes (full fine-tuning only)


def parameter_group(name: str) -> str:
    """Which optimiser group a parameter belongs to (for lr multipliers and freezing)."""
    if "lora_" in name:
        return "lora"
    if "embed_tokens" in name:
        return "embeddings"
    if name.endswith("lm_head.weight") or ".lm_head." in name or name.startswith("lm_head"):
        return "lm_head"
    if ".visual." in name or name.startswith("visual.") or "model.visual" in name:
        return "vision"
    return "language"


def prepare_model_for_training(model, lora: LoraSettings, freeze_vision: bool, gradient_checkpointing: bool = False):
    """Apply LoRA (or full fine-tuning), freezing rules and gradient checkpointing; returns the model."""
    from samtok.mllm.models import use_linear_patch_embedding

    use_linear_patch_embedding(model)
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    if lora.enabled:
        from peft import LoraConfig, get_peft_model

        names = [n for n, _ in model.named_modules() if re.fullmatch(lora.target_modules, n)]
        if not names:
            raise ValueError(f"lora.target_modules matches no module: {lora.target_modules!r}")
        model = get_peft_model(model, LoraConfig(
            r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=lora.target_modules,
            bias="none", task_type="CAUSAL_LM",
        ))
    for name, p in model.named_parameters():
        group = parameter_group(name)
        if group == "lora":
            p.requires_grad_(True)
        elif group in ("embeddings", "lm_head"):
            p.requires_grad_(lora.train_embeddings or not lora.enabled)
        elif group == "vision":
            p.requires_grad_(not freeze_vision)
        else:
            p.requires_grad_(not lora.enabled)
    return model


def unwrap(model):
    """The transformers model under a peft wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def code_token_sets(tokenizer, codebook_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids of depth-0 and depth-1 mask words."""
    from samtok.mllm.vocab import code_token_ids_by_depth
    from samtok.tokenizer.codec import MaskCodec

    c0, c1 = code_token_ids_by_depth(tokenizer, MaskCodec(codebook_size))
    return torch.tensor(c0), torch.tensor(c1)


class SFTLightningModule(L.LightningModule):
    """Next-token loss on assistant turns; logs loss, lr, tokens/s and per-code accuracy."""

    def __init__(self, model, tokenizer, optim: OptimSettings, total_steps: int, codebook_size: int = 256):
        super().__init__()
        self.model = model
        self.optim = optim
        self.total_steps = total_steps
        c0, c1 = code_token_sets(tokenizer, codebook_size)
        self.register_buffer("c0_ids", c0, persistent=False)
        self.register_buffer("c1_ids", c1, persistent=False)
        self._t_last: Optional[float] = None
        self.val_results: dict[str, float] = {}

    def on_fit_start(self) -> None:
        # transformers' from_pretrained returns eval-mode modules and Lightning keeps module modes:
        # without this, dropout (LoRA's included) would silently stay off during training
        self.model.train()

    def forward(self, batch: dict) -> Any:
        from samtok.mllm.sequences import model_inputs

        return self.model(**model_inputs(batch, with_labels=False))

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Mean next-token loss over the answer tokens of ALL processes (equals transformers' loss on
        one process; with several, the gradient equals one process holding the whole batch)."""
        from samtok.core.trainer import distributed_token_mean
        from samtok.mllm.loss import causal_lm_loss

        n_tokens = (labels[:, 1:] != -100).sum()
        return distributed_token_mean(causal_lm_loss(logits, labels, num_items_in_batch=1), n_tokens)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        out = self(batch)
        loss = self.loss(out.logits, batch["labels"])
        n = int(batch["input_ids"].shape[0])
        self.log("train/loss", loss.detach(), prog_bar=True, batch_size=n, sync_dist=True)
        tokens = int(batch["attention_mask"].sum())
        now = time.perf_counter()
        if self._t_last is not None:
            self.log("train/tokens_per_s", tokens / max(1e-6, now - self._t_last), batch_size=n)
        self._t_last = now
        if batch_idx % 10 == 0:
            with torch.no_grad():
                for k, v in self._code_accuracy(out.logits, batch["labels"]).items():
                    self.log(f"train/{k}", v, batch_size=n)
        return loss

    @torch.no_grad()
    def _code_accuracy(self, logits: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """Teacher-forced accuracy on depth-0 and depth-1 mask words (exact match per code)."""
        pred = logits[:, :-1].argmax(-1)
        gold = labels[:, 1:]
        out = {}
        for name, ids in (("acc_c0", self.c0_ids), ("acc_c1", self.c1_ids)):
            sel = torch.isin(gold, ids)
            if sel.any():
                out[name] = (pred[sel] == gold[sel]).float().mean()
        valid = gold != -100
        if valid.any():
            out["acc_tokens"] = (pred[valid] == gold[valid]).float().mean()
        return out

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        from samtok.mllm.loss import causal_lm_loss

        out = self(batch)
        n = int(batch["input_ids"].shape[0])
        self.log("val/loss", causal_lm_loss(out.logits, batch["labels"]), batch_size=n, sync_dist=True)
        for k, v in self._code_accuracy(out.logits, batch["labels"]).items():
            self.log(f"val/{k}", v, batch_size=n, sync_dist=True)

    def on_validation_epoch_end(self) -> None:
        self.val_results = {k: float(v) for k, v in self.trainer.callback_metrics.items() if k.startswith("val/")}

    def configure_optimizers(self):
        from samtok.core.trainer import warmup_cosine

        groups: dict[str, list] = {}
        for name, p in self.model.named_parameters():
            if p.requires_grad:
                groups.setdefault(parameter_group(name), []).append(p)
        if not groups:
            raise ValueError("no trainable parameters")
        param_groups = []
        for g, params in groups.items():
            mult = float(self.optim.lr_multipliers.get(g, 1.0))
            param_groups.append({"params": params, "lr": self.optim.lr * mult, "name": g})
        opt = torch.optim.AdamW(param_groups, lr=self.optim.lr, betas=tuple(self.optim.betas),
                                weight_decay=self.optim.weight_decay, foreach=True)  # multi-tensor also on CPU
        total = self.total_steps if self.total_steps > 0 else int(self.trainer.estimated_stepping_batches)
        warm, floor = self.optim.warmup_fraction, self.optim.min_lr_ratio
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: warmup_cosine(s, total, warm, floor))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
