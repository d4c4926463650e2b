"""The ``train-tokenizer`` recipe: config → data → stage 0 (SAM 2) → stage 1 (SAMTok) → export.

Stage 0 runs only when no pretrained SAM 2 checkpoint is configured (``model.sam2.checkpoint``);
its result is kept in ``out_dir/stage0/sam2.safetensors`` so that a re-run (or a resume of stage 1)
does not repeat it. Stage 1 writes the tokenizer to ``out_dir/final/`` (config.json +
model.safetensors), loadable with ``SAMTokenizer.from_pretrained`` without Lightning.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path


from samtok.core.runtime import get_logger, seed_everything
from samtok.core.trainer import TrainerConfig
from samtok.data.sources import SourceSpec
from samtok.tokenizer.data import PromptMix
from samtok.tokenizer.lightning import StageConfig
from samtok.tokenizer.losses import MaskLossConfig
from samtok.tokenizer.model import TokenizerModelConfig

log = get_logger("tokenizer.train")


@dataclass
class TokenizerDataConfig:
    train: list[SourceSpec] = field(default_factory=lambda: [SourceSpec("synthetic", {"root": "runs/synth", "split": "train"})])
    val: list[SourceSpec] = field(default_factory=lambda: [SourceSpec("synthetic", {"root": "runs/synth", "split": "val"})])
    val_max_images: int = 100  # validation images (all their masks, up to val_max_masks_per_image)
    val_max_masks_per_image: int = 16
    min_mask_pixels: int = 1  # smaller masks are skipped in training (empty masks always are)


def _stage0_default() -> StageConfig:
    return StageConfig(
        name="sam", max_steps=1000, lr=3e-4,
        train_parts=["image_encoder", "prompt_encoder", "mask_decoder", "iou_head", "object_score_head"],
        batch_images=8, masks_per_image=4, prompts=PromptMix(),
        loss=MaskLossConfig(bce_weight=2.0, dice_weight=0.5, iou_weight=1.0, multimask="min"),
    )


@dataclass
class TrainTokenizerConfig:
    model: TokenizerModelConfig = field(default_factory=TokenizerModelConfig)
    data: TokenizerDataConfig = field(default_factory=TokenizerDataConfig)
    stage0: StageConfig = field(default_factory=_stage0_default)  # only without model.sam2.checkpoint
    stage1: StageConfig = field(default_factory=StageConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    out_dir: str = "runs/tokenizer"
    resume: str = "auto"  # auto (continue from out_dir's last.ckpt if any) | never | a .ckpt path
    progress_bar: bool = True


def _records(specs: list[SourceSpec], seed: int):
    from samtok.data.sources import load_image_records

    return load_image_records(specs, seed=seed)


def run_stage(model, stage: StageConfig, cfg: TrainTokenizerConfig, train_records, val_records, run_dir: Path) -> dict:
    """Fit one stage; returns its final validation results."""
    from torch.utils.data import DataLoader

    from samtok.core.callbacks import StepProgress
    from samtok.core.trainer import build_trainer, global_batch_size, resume_checkpoint
    from samtok.tokenizer.data import MaskVisitStream, ValidationImages, collate_single, collate_visits
    from samtok.tokenizer.lightning import TokenizerLightningModule

    tcfg = TrainerConfig(**{**cfg.trainer.__dict__, "max_steps": stage.max_steps,
                            "max_minutes": stage.max_minutes or cfg.trainer.max_minutes})
    module = TokenizerLightningModule(model, stage)
    callbacks = [StepProgress(stage.max_steps, f"tokenizer {stage.name}", ("train/loss", "train/iou_lowres"))] if cfg.progress_bar else []
    trainer = build_trainer(tcfg, run_dir, per_device_batch=stage.batch_images, callbacks=callbacks,
                            batch_unit="image visits")
    log.info("stage %s: %d steps, %d image visits x %d masks per device, global batch %d visits",
             stage.name, stage.max_steps, stage.batch_images, stage.masks_per_image,
             global_batch_size(tcfg, stage.batch_images))
    stream = MaskVisitStream(
        train_records, model.image_size, masks_per_visit=stage.masks_per_image, seed=cfg.trainer.seed,
        rank=trainer.global_rank, world_size=trainer.world_size,
        prompts=stage.prompts if stage.name == "sam" else None, min_mask_pixels=cfg.data.min_mask_pixels,
        gt_resize=stage.loss.gt_resize,
    )
    train_loader = DataLoader(stream, batch_size=stage.batch_images, collate_fn=collate_visits,
                              num_workers=cfg.trainer.num_workers, persistent_workers=cfg.trainer.num_workers > 0)
    val_loader = DataLoader(ValidationImages(val_records, cfg.data.val_max_images, cfg.data.val_max_masks_per_image),
                            batch_size=1, collate_fn=collate_single)
    ckpt = resume_checkpoint(run_dir, cfg.resume)
    if ckpt:
        log.info("resuming stage %s from %s", stage.name, ckpt)
    t0 = time.time()
    trainer.fit(module, train_dataloaders=train_loader, val_dataloaders=val_loader, ckpt_path=ckpt, weights_only=True)
    if not module.val_results or trainer.global_step % max(1, cfg.trainer.val_every_n_steps or 10**9) != 0:
        trainer.validate(module, dataloaders=val_loader, verbose=False)
    results = dict(module.val_results)
    results["minutes"] = (time.time() - t0) / 60
    results["steps"] = trainer.global_step
    results["is_global_zero"] = trainer.is_global_zero
    return results


def train_tokenizer(cfg: TrainTokenizerConfig) -> dict:
    """Run the recipe; returns a summary (also written to ``out_dir/summary.json``)."""
    from samtok.tokenizer.checkpoints import save_tokenizer_dir
    from samtok.tokenizer.model import SAMTokModel
    from samtok.tokenizer.sam2_parts import load_meta_sam2_weights

    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    seed_everything(cfg.trainer.seed)
    t0 = time.time()
    train_records = _records(cfg.data.train, cfg.trainer.seed)
    val_records = _records(cfg.data.val, cfg.trainer.seed)
    n_masks = sum(len(r.anns) for r in train_records)
    log.info("data: %d train images (%d masks), %d val images", len(train_records), n_masks, len(val_records))

    model = SAMTokModel(cfg.model)
    summary: dict = {"train_images": len(train_records), "train_masks": n_masks}
    stage0_file = out / "stage0" / "sam2.safetensors"
    if cfg.model.sam2.checkpoint:
        loaded = load_meta_sam2_weights(model, cfg.model.sam2.checkpoint)
        log.info("loaded %d SAM 2 tensors from %s; stage 0 skipped", len(loaded), cfg.model.sam2.checkpoint)
    elif cfg.stage0.enabled:
        if stage0_file.is_file():
            from safetensors.torch import load_file

            state = load_file(str(stage0_file))
            model.load_state_dict(state, strict=False)
            log.info("stage 0 already done: loaded %s", stage0_file)
            summary["stage0"] = json.loads((out / "stage0" / "results.json").read_text())
        else:
            res = run_stage(model, cfg.stage0, cfg, train_records, val_records, out / "stage0")
            writer = res.pop("is_global_zero")
            if writer:  # one process writes; the others hold identical weights (DDP)
                from safetensors.torch import save_file

                sam_state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()
                             if not k.startswith(("sam_mask_encoder", "quantizer"))}
                tmp = stage0_file.with_suffix(".tmp")
                save_file(sam_state, str(tmp))
                tmp.replace(stage0_file)
                (out / "stage0" / "results.json").write_text(json.dumps(res, indent=2))
            summary["stage0"] = res
            log.info("stage 0 done in %.1f min: box-prompt val mIoU %.3f", res["minutes"], res.get("val/rMaskIoU", float("nan")))
    writer = True
    if cfg.stage1.enabled:
        res = run_stage(model, cfg.stage1, cfg, train_records, val_records, out / "stage1")
        writer = res.pop("is_global_zero")
        summary["stage1"] = res
    summary["minutes_total"] = (time.time() - t0) / 60
    if writer:
        info = {"trained_by": "samtok train-tokenizer", "summary": summary}
        save_tokenizer_dir(model, out / "final", info=info)
        tmp = out / "summary.json.tmp"
        tmp.write_text(json.dumps(summary, indent=2))
        tmp.replace(out / "summary.json")
    return summary
