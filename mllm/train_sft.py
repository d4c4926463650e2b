"""The ``sft`` recipe: config → processor/model → shared SFT datamodule → Lightning fit → final dir.

``runs/sft/final/`` is a plain Hugging Face model + processor directory (LoRA merged) with
``samtok.json`` naming the mask tokenizer; ``samtok chat`` / ``samtok eval`` load it directly.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import lightning as L
from lightning.pytorch.trainer.states import TrainerFn

from samtok.core.config import ConfigError
from samtok.core.runtime import get_logger, seed_everything
from samtok.core.trainer import TrainerConfig
from samtok.mllm.sft import (
    GenerationValSettings,
    LoraSettings,
    OptimSettings,
    SFTDataSettings,
    SFTModelSettings,
)

log = get_logger("mllm.train_sft")


@dataclass
class SFTConfig:
    model: SFTModelSettings = field(default_factory=SFTModelSettings)
    lora: LoraSettings = field(default_factory=LoraSettings)
    data: SFTDataSettings = field(default_factory=SFTDataSettings)
    optim: OptimSettings = field(default_factory=OptimSettings)
    generation_val: GenerationValSettings = field(default_factory=GenerationValSettings)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    out_dir: str = "runs/sft"
    init_from: Optional[str] = None  # continue from a model directory (an SFT / GRPO output, or a `samtok pretrain` model) instead of model.path / tiny
    resume: str = "auto"  # auto (out_dir's last.ckpt if any) | never | a .ckpt path
    corpus_samples: int = 4000  # tiny model: conversations whose text trains the BPE text tokenizer
    progress_bar: bool = True


def conversation_corpus(cfg: SFTConfig, n: int) -> list[str]:
    """Texts (prompts and answers) of the first ``n`` training conversations, for a BPE tokenizer."""
    from samtok.data.conversations import build_example
    from samtok.data.mixture import load_mixture, load_mixture_config, sample_rng
    from samtok.data.pretokenize import load_code_table

    mixture = load_mixture_config(cfg.data.mixture)
    data = load_mixture(mixture, ["train"])
    codes = load_code_table(cfg.data.pretokenized, cfg.data.tokenizer)
    texts: list[str] = []
    items = data.items(["train"], repeat=False)
    step = max(1, len(items) // max(1, n))
    for i in range(0, len(items), step):
        _, sample = items[i]
        ex = build_example(sample, data.record(sample), codes, mixture.conversation, sample_rng(mixture.seed, "corpus", i))
        if ex is not None:
            texts.extend(str(m["content"]).replace("<image>", " ") for m in ex.messages)
    return texts


def build_model_and_processor(cfg: SFTConfig):
    """(model, processor, description) with the 514 mask words in the vocabulary."""
    from samtok.mllm.models import build_tiny, load_model_and_processor
    from samtok.mllm.vocab import add_mask_vocabulary

    src = cfg.init_from or cfg.model.path
    if src:
        model, processor = load_model_and_processor(
            src, dtype=cfg.model.dtype, attn_implementation=cfg.model.attn_implementation,
            min_pixels=cfg.model.min_pixels, max_pixels=cfg.model.max_pixels,
        )
        report = add_mask_vocabulary(model, processor.tokenizer, seed=cfg.trainer.seed)
        return model, processor, {"base_model": str(src), "vocabulary": str(report),
                                  "mask_words_trained": base_has_trained_mask_words(src)}
    corpus = conversation_corpus(cfg, cfg.corpus_samples)
    model, processor = build_tiny(cfg.model.tiny, corpus=corpus)
    return model, processor, {"base_model": "tiny (random init)", "tiny": cfg.model.tiny.__dict__ | {}}


def base_has_trained_mask_words(path) -> bool:
    """A directory written by this project's SFT / GRPO / export (``samtok.json`` names its mask
    tokenizer) has trained mask words and keeps them; any other base (a released Qwen-VL, a
    ``samtok pretrain`` model) gets them initialised as ``model.mask_embedding_init`` says. A released
    QwenVL-SAMTok checkpoint has no ``samtok.json``: continue it with the default ``statistics`` init
    and ``freeze_first_code_head: false`` (a no-op on existing rows), or its trained rows are replaced."""
    from samtok.mllm.export import SAMTOK_JSON

    return (Path(path) / SAMTOK_JSON).is_file()


def apply_mask_embedding_init(model, processor, cfg: SFTConfig) -> None:
    """Optionally replace the statistics-based rows of the code words (codebooks or code geometry),
    and freeze the first codes' output rows when asked."""

    mode = cfg.model.mask_embedding_init
    if mode not in ("statistics", "codebook", "geometry"):
        raise ConfigError(f"model.mask_embedding_init must be 'statistics', 'codebook' or 'geometry', got {mode!r}")
    if cfg.model.freeze_first_code_head and cfg.optim.weight_decay != 0:
        raise ConfigError("model.freeze_first_code_head needs optim.weight_decay: 0 (decay would still move the rows)")
    if mode == "codebook":
        from samtok.mllm.vocab import init_code_rows_from_codebooks
        from samtok.tokenizer.checkpoints import load_tokenizer_dir

        mask_model, _ = load_tokenizer_dir(cfg.data.tokenizer)
        books = [cb.codes.detach() for cb in mask_model.quantizer.codebooks]
        n = init_code_rows_from_codebooks(model, processor.tokenizer, books, seed=cfg.trainer.seed)
        log.info("initialised %d code-word rows from the mask tokenizer's codebooks", n)
    elif mode == "geometry":
        from samtok.data.mixture import load_mixture, load_mixture_config
        from samtok.data.pretokenize import load_code_table
        from samtok.mllm.vocab import code_box_centroids, init_first_code_rows_from_geometry

        data = load_mixture(load_mixture_config(cfg.data.mixture), ["train"])
        table = load_code_table(cfg.data.pretokenized, cfg.data.tokenizer)
        centroids, counts = code_box_centroids(table, data.records, table.codec.codebook_size)
        init_first_code_rows_from_geometry(model, processor.tokenizer, centroids, seed=cfg.trainer.seed)
        log.info("first-code rows from the boxes of %d training masks (%d of %d codes used)",
                 int(counts.sum()), int((counts > 0).sum()), len(counts))
    if cfg.model.freeze_first_code_head:
        from samtok.mllm.vocab import code_token_ids_by_depth, freeze_rows

        head = model.get_output_embeddings()
        head = head if head is not None else model.get_input_embeddings()
        first, _ = code_token_ids_by_depth(processor.tokenizer)
        freeze_rows(head.weight, first)
        log.info("first-code output rows frozen (%d)", len(first))


def train_sft(cfg: SFTConfig) -> dict:
    from samtok.core.callbacks import StepProgress
    from samtok.core.trainer import build_trainer, global_batch_size, resume_checkpoint
    from samtok.data.datamodule import TRAINER_KWARGS, SFTDataModule
    from samtok.mllm.export import save_trained_model
    from samtok.mllm.sft import SFTLightningModule, prepare_model_for_training

    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    seed_everything(cfg.trainer.seed)
    t0 = time.time()
    model, processor, origin = build_model_and_processor(cfg)
    if not origin.get("mask_words_trained", False):  # fresh tiny model, released Qwen-VL, `samtok pretrain` model
        apply_mask_embedding_init(model, processor, cfg)
    else:
        log.info("%s has trained mask words (samtok.json): kept as they are", origin["base_model"])
    model = prepare_model_for_training(model, cfg.lora, cfg.model.freeze_vision, cfg.model.gradient_checkpointing)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    log.info("model: %s; %.2f M parameters, %.2f M trainable", origin["base_model"], total / 1e6, trainable / 1e6)

    dm = SFTDataModule(
        cfg.data.mixture, cfg.data.pretokenized, processor, max_length=cfg.data.max_length,
        batch_size=cfg.data.batch_size, num_workers=cfg.trainer.num_workers, seed=cfg.trainer.seed,
        length_grouped=cfg.data.length_grouped, packing=cfg.data.packing, tokenizer=cfg.data.tokenizer,
    )
    module = SFTLightningModule(model, processor.tokenizer, cfg.optim, total_steps=cfg.trainer.max_steps)
    callbacks = [StepProgress(cfg.trainer.max_steps, "sft", ("train/loss", "train/acc_c0"))] if cfg.progress_bar else []
    scored = cfg.generation_val.enabled and cfg.generation_val.every_validation
    curve = GenerationCurve(cfg, processor, out, t0, origin) if scored else None
    callbacks += [curve] if curve is not None else []
    trainer = build_trainer(cfg.trainer, out, per_device_batch=cfg.data.batch_size, callbacks=callbacks,
                            limit_val_batches=max(1, cfg.data.val_samples // max(1, cfg.data.batch_size)),
                            **TRAINER_KWARGS)
    log.info("global batch %d samples", global_batch_size(cfg.trainer, cfg.data.batch_size))
    ckpt = resume_checkpoint(out, cfg.resume)
    trainer.fit(module, datamodule=dm, ckpt_path=ckpt, weights_only=True)
    trainer.validate(module, datamodule=dm, verbose=False)
    minutes = (time.time() - t0) / 60
    summary = {"steps": trainer.global_step, "minutes": minutes, "teacher_forced": module.val_results,
               "train_examples": len(dm.train_set) if dm.train_set else 0}
    info = {"stage": "sft", "recipe": "samtok sft", "steps": trainer.global_step, "minutes": round(minutes, 2),
            "data": cfg.data.mixture, "lora": cfg.lora.__dict__, **origin}
    with gathered_parameters(module.model, cfg.trainer):  # every rank enters; rank 0 writes
        if trainer.is_global_zero:
            save_trained_model(module.model, processor, out / "final", cfg.data.tokenizer, info)
    if trainer.is_global_zero:
        if cfg.generation_val.enabled:
            summary["generation"] = validate_by_generation(out / "final", cfg)
            log_generation(trainer, out / "val_generation" / "model", summary["generation"])
            if curve is not None:
                earlier = [p for p in curve.points if p["step"] != summary["steps"]]  # e.g. a max_minutes stop
                summary["curve"] = earlier + [curve_point(summary["steps"], minutes, summary["generation"])]
        if cfg.generation_val.train_examples > 0:
            from samtok.mllm.validation import training_set_exact_match

            summary["training_set"] = training_set_exact_match(
                out / "final", dm.train_set, cfg.generation_val.train_examples,
                batch_size=cfg.data.batch_size, max_new_tokens=cfg.generation_val.max_new_tokens,
                device=str(trainer.strategy.root_device))
        _write_summary(out, summary)
        print_results(summary, cfg)
    return summary


def gathered_parameters(model, trainer_cfg: TrainerConfig):
    """Under DeepSpeed ZeRO-3 the weights are partitioned across ranks: gather them (collectively)
    so that rank 0 saves full tensors. A no-op otherwise."""
    from contextlib import nullcontext

    if trainer_cfg.strategy == "deepspeed" and trainer_cfg.zero_stage == 3:
        import deepspeed

        return deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None)
    return nullcontext()


CURVE_KEYS = ("res/cIoU", "res/gIoU", "res/label_echo", "res/masks_per_answer", "res/on_an_object", "res/right_object",
              "res/right_object_chance", "gres/gIoU", "gres/N-acc", "gres/T-acc")
"""The generation metrics kept per point of the curve (``summary.json`` ``curve``)."""


def curve_point(step: int, minutes: float, results: dict[str, float]) -> dict[str, float]:
    return {"step": int(step), "minutes": round(float(minutes), 2), **{k: results[k] for k in CURVE_KEYS if k in results}}


class GenerationCurve(L.Callback):
    """``generation_val.every_validation``: after each validation while fitting, the model as it is then
    is saved to ``out/curve/step_N/weights``, scored like the final one (without the constant baselines,
    which do not change) into ``out/curve/step_N``, and its weights are removed again. ``points``
    collects step, minutes since the start and :data:`CURVE_KEYS`; TensorBoard gets ``generation/*``
    at that step. Full fine-tuning only: merging LoRA for the save would end the adapters."""

    def __init__(self, cfg: SFTConfig, processor, out: Path, t0: float, origin: dict):
        if cfg.lora.enabled:
            raise ConfigError("generation_val.every_validation needs full fine-tuning (lora.enabled: false): "
                              "saving mid-training would merge the LoRA adapters into the weights")
        self.cfg, self.processor, self.out, self.t0, self.origin = cfg, processor, out, t0, origin
        self.points: list[dict[str, float]] = []

    def on_validation_end(self, trainer, pl_module) -> None:
        from samtok.mllm.export import save_trained_model

        step = trainer.global_step
        if trainer.sanity_checking or trainer.state.fn != TrainerFn.FITTING or not 0 < step < self.cfg.trainer.max_steps:
            return  # the model of the last step is scored after training, with the baselines
        minutes = (time.time() - self.t0) / 60  # wall minutes since the start, earlier curve passes included
        where = self.out / "curve" / f"step_{step:06d}"
        info = {"stage": "sft", "recipe": "samtok sft", "steps": step, **self.origin}
        with gathered_parameters(pl_module.model, self.cfg.trainer):  # every rank enters; rank 0 writes
            if trainer.is_global_zero:
                save_trained_model(pl_module.model, self.processor, where / "weights", self.cfg.data.tokenizer, info)
        if not trainer.is_global_zero:
            return
        try:
            results = validate_by_generation(where / "weights", self.cfg, out_dir=where, baselines=False)
        finally:
            shutil.rmtree(where / "weights", ignore_errors=True)  # the reports (where/model/<benchmark>) stay
        point = curve_point(step, minutes, results)
        self.points.append(point)
        if trainer.logger is not None and hasattr(trainer.logger.experiment, "add_scalar"):
            for key in CURVE_KEYS:
                if key in point:
                    trainer.logger.experiment.add_scalar(f"generation/{key}", point[key], step)


def validate_by_generation(model_dir: Path, cfg: SFTConfig, out_dir: Optional[Path] = None,
                           baselines: Optional[bool] = None) -> dict[str, float]:
    """RES/GRES metrics of the saved model on held-out data, next to constant-answer baselines
    (``baselines`` overrides ``generation_val.baselines``; reports go to ``out_dir``, default
    ``out_dir/val_generation`` of the run)."""
    from samtok.mllm.validation import ValidationSpec, generation_validation

    g = cfg.generation_val
    spec = ValidationSpec(mixture=cfg.data.mixture, tokenizer=cfg.data.tokenizer, data=dict(g.data),
                          tasks=list(g.tasks), max_samples=g.max_samples, max_new_tokens=g.max_new_tokens,
                          baselines=g.baselines if baselines is None else baselines, pretokenized=cfg.data.pretokenized)
    t0 = time.time()
    results = generation_validation(model_dir, spec, out_dir or Path(cfg.out_dir) / "val_generation")
    log.info("generation validation in %.1f min: %s", (time.time() - t0) / 60,
             ", ".join(f"{k} {v:.3f}" for k, v in sorted(results.items()) if "/" in k and "baseline" not in k))
    return results


def log_generation(trainer, reports: Path, results: dict[str, float]) -> None:
    """The generation metrics and the report figures (best / worst predictions: image, decoded
    masks, prompt and answer text) into TensorBoard at the final step."""
    import numpy as np
    from PIL import Image

    logger = trainer.logger
    if logger is None or not hasattr(logger.experiment, "add_image"):
        return
    writer, step = logger.experiment, trainer.global_step
    for key, value in results.items():
        writer.add_scalar(f"generation/{key}", value, step)
    for png in sorted(reports.glob("*/*.png")):
        if png.stem in ("best", "worst"):
            image = np.asarray(Image.open(png).convert("RGB"))
            writer.add_image(f"predictions/{png.parent.name}_{png.stem}", image, step, dataformats="HWC")
    writer.flush()


def print_results(summary: dict, cfg: SFTConfig) -> None:
    """The validation metrics next to their baselines, on stdout (also in ``summary.json``)."""
    from samtok.mllm.validation import baseline_table, code_majority

    majority = code_majority(cfg.data.pretokenized) if cfg.data.pretokenized else None
    print(f"\nSFT validation after {summary['steps']} steps ({summary['minutes']:.1f} min):")
    if summary.get("generation") or summary.get("teacher_forced"):
        print(baseline_table(summary.get("generation", {}), summary.get("teacher_forced"), majority))
    points = summary.get("curve") or []
    if points:
        keys = [k for k in CURVE_KEYS if any(k in p for p in points)]  # e.g. right_object needs an answer on an object
        print("\nheld-out generation over training (greedy; generation_val.every_validation):")
        print("| step | minutes | " + " | ".join(keys) + " |")
        print("| --- | --- | " + " | ".join("---" for _ in keys) + " |")
        for p in points:
            print(f"| {p['step']} | {p['minutes']:.1f} | " + " | ".join(f"{p[k]:.3f}" if k in p else "" for k in keys) + " |")
    t = summary.get("training_set")
    if t:
        print(f"training set ({int(t['train/examples'])} examples, training prompts, greedy): spans exact in order "
              f"{t['train/spans_in_order_exact']:.3f}, first codes {t['train/first_codes_in_order_exact']:.3f}")


def _write_summary(out: Path, summary: dict) -> None:
    tmp = out / "summary.json.tmp"
    tmp.write_text(json.dumps(summary, indent=2, default=str))
    tmp.replace(out / "summary.json")
