"""Thin Lightning wrapper that trains :class:`SAMTokModel` in two stages.

* stage ``sam`` (stage 0, ours): pre-trains a small SAM 2 from scratch as a promptable segmenter
  (box / point / box+mask prompts → mask, SAM-style min-over-3 loss + IoU-head MSE). The release
  starts from Meta's pretrained SAM 2 instead; offline we have none.
* stage ``samtok`` (the release's recipe): mask encoder → residual VQ → SAM 2 mask decoder, with the
  image encoder frozen (its features can then be cached per image) and the codebooks updated by EMA.

Anti-collapse options beyond the release (all off in the release preset): bypass the quantizer for
the first steps, then initialise the codebooks by k-means on recent encoder outputs; restart dead
codes from a buffer of recent inputs with a lower threshold.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import lightning as L
import torch

from samtok.tokenizer.data import PROMPT_ENCODER, PromptMix
from samtok.tokenizer.losses import MaskLossConfig, multimask_loss
from samtok.tokenizer.model import ImageFeatures, SAMTokModel

PARTS = ("image_encoder", "prompt_encoder", "mask_decoder", "iou_head", "object_score_head", "mask_encoder")


@dataclass
class StageConfig:
    """One training stage. Every default is the release's where the release defines it."""

    name: str = "samtok"  # sam (stage 0: promptable SAM 2 pre-training) | samtok
    enabled: bool = True
    max_steps: int = 1000
    max_minutes: Optional[float] = None  # wall-clock safety stop for this stage
    lr: float = 4e-5
    weight_decay: float = 0.05
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    warmup_fraction: float = 0.05
    min_lr_ratio: float = 0.0  # cosine decays to lr * min_lr_ratio
    # parts that get gradients (release: mask encoder + mask decoder without its IoU / object heads)
    train_parts: list[str] = field(default_factory=lambda: ["mask_encoder", "mask_decoder"])
    lr_multipliers: dict[str, float] = field(default_factory=dict)  # part -> lr factor
    batch_images: int = 16  # image visits per step per device (release: 16 masks per GPU)
    masks_per_image: int = 1  # masks per visit (release: 1)
    cache_image_features: bool = True  # reuse backbone features per image when the image encoder is frozen
    quantizer_bypass_steps: int = 0  # decoder gets z itself for the first steps (codebooks untouched)
    kmeans_init: bool = False  # at the end of the bypass: codebooks <- k-means of recent z
    kmeans_samples: int = 4096  # recent z kept for the k-means initialisation
    prompts: PromptMix = field(default_factory=PromptMix)  # stage "sam" only
    loss: MaskLossConfig = field(default_factory=MaskLossConfig)


class TokenizerLightningModule(L.LightningModule):
    def __init__(self, model: SAMTokModel, stage: StageConfig, total_steps: Optional[int] = None):
        super().__init__()
        if stage.name not in ("sam", "samtok"):
            raise ValueError(f"stage.name must be sam or samtok, got {stage.name!r}")
        unknown = [p for p in (*stage.train_parts, *stage.lr_multipliers) if p not in PARTS]
        if unknown:
            raise ValueError(f"unknown model parts {unknown}; known: {PARTS}")
        self.model = model
        self.stage = stage
        self.total_steps = total_steps or stage.max_steps
        self._groups = model.trainable_groups()
        for part, params in self._groups.items():
            for p in params:
                p.requires_grad_(part in stage.train_parts)
        self.freeze_backbone = "image_encoder" not in stage.train_parts
        self._feature_cache: dict[int, list[torch.Tensor]] = {}
        self._recent_z: list[torch.Tensor] = []
        self._kmeans_done = not stage.kmeans_init
        self.val_results: dict[str, float] = {}

    # ------------------------------------------------------------------ features
    def _features(self, batch: dict) -> ImageFeatures:
        images = self.model.normalize(batch["images"].float() / 255.0)
        if not self.freeze_backbone:
            return self.model.encode_image(images)
        keys = batch["keys"].tolist()
        missing = [i for i, k in enumerate(keys) if k not in self._feature_cache]
        if missing:
            with torch.no_grad():
                fpn = self.model.backbone(images[missing])
            for j, i in enumerate(missing):
                levels = [lvl[j].detach() for lvl in fpn]
                if self.stage.cache_image_features:
                    # host memory, half precision: ~1.4 MB per image at 1024 px, not GPU memory
                    self._feature_cache[keys[i]] = [lvl.to("cpu", torch.float16) for lvl in levels]
                else:
                    self._feature_cache[keys[i]] = levels
        levels = [torch.stack([self._feature_cache[k][lvl] for k in keys]).to(self.device, torch.float32)
                  for lvl in range(3)]
        if not self.stage.cache_image_features:
            self._feature_cache.clear()
        return self.model.prepare_features(levels)

    # ------------------------------------------------------------------ training
    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        feats = self._features(batch)
        idx = batch["image_index"]
        logs: dict[str, Any] = {}
        if self.stage.name == "sam":
            use_mask = batch["prompt_kind"] == PROMPT_ENCODER
            out = self.model.decode_prompts(
                feats, idx, points=(batch["point_coords"], batch["point_labels"]),
                mask_inputs=batch["mask_prompt"], use_mask=use_mask,
            )
            losses = multimask_loss(out.logits, out.iou_pred, batch["gt"], self.stage.loss)
            loss = losses["loss"]
        else:
            z = self.model.encode_masks(feats, idx, batch["mask_prompt"], batch["boxes"])
            step = self.global_step
            if step < self.stage.quantizer_bypass_steps:
                vec, commit = z, z.new_zeros(())
                if self.stage.kmeans_init:
                    self._remember_z(z)
            else:
                if not self._kmeans_done:
                    self._run_kmeans()
                qo = self.model.quantize(z)
                vec, commit = qo.quantized, qo.commitment_loss
                logs.update({f"codebook/{k}": v for k, v in qo.stats.items()})
            out = self.model.decode_vectors(feats, idx, vec)
            losses = multimask_loss(out.logits, out.iou_pred, batch["gt"], self.stage.loss)
            loss = losses["loss"] + self.stage.loss.commitment_weight * commit
            logs["train/commitment"] = commit.detach()
        bs = int(idx.shape[0])
        self.log("train/loss", loss.detach(), prog_bar=True, batch_size=bs)
        for k in ("bce", "dice", "iou_mse"):
            self.log(f"train/{k}", losses[k].detach(), batch_size=bs)
        with torch.no_grad():
            chosen = out.logits[torch.arange(bs, device=idx.device), out.best_index]
            from samtok.tokenizer.losses import actual_iou, resize_gt

            g = resize_gt(batch["gt"], chosen.shape[-2:], self.stage.loss.gt_resize)
            self.log("train/iou_lowres", actual_iou(chosen.unsqueeze(1), g).mean(), batch_size=bs)
        for k, v in logs.items():
            self.log(k, v, batch_size=bs)
        return loss

    def _remember_z(self, z: torch.Tensor) -> None:
        self._recent_z.append(z.detach().float().cpu())
        total = sum(t.shape[0] for t in self._recent_z)
        while total - self._recent_z[0].shape[0] >= self.stage.kmeans_samples:
            total -= self._recent_z.pop(0).shape[0]

    @torch.no_grad()
    def _run_kmeans(self) -> None:
        if self._recent_z:
            z = torch.cat(self._recent_z)  # on the CPU: k-means with a CPU generator, same on every rank
            g = torch.Generator(device="cpu").manual_seed(int(self.trainer.current_epoch) + 17)
            self.model.quantizer.kmeans_init(z, generator=g)
        self._recent_z.clear()
        self._kmeans_done = True

    # ------------------------------------------------------------------ validation
    def on_validation_epoch_start(self) -> None:
        from samtok.eval.metrics import MaskReconstructionMetric
        from samtok.tokenizer.api import SAMTokenizer

        self._val_tok = SAMTokenizer(self.model, device=self.device)
        self._val_tok.autocast_dtype = None
        self._val_metric = MaskReconstructionMetric()
        self._val_metric_first = MaskReconstructionMetric()  # decoding from the first code alone
        self._val_panels: list[Any] = []

    def validation_step(self, item: dict, batch_idx: int) -> None:
        masks = torch.from_numpy(item["masks"])
        if masks.shape[0] == 0:
            return
        tok = self._val_tok
        feats, sizes = tok.image_features([item["rgb"]])
        h, w = sizes[0]
        if self.stage.name == "sam":  # stage 0: box-prompted segmentation quality
            from samtok.tokenizer.api import boxes_for

            boxes = boxes_for(masks, tok.image_size).to(self.device)
            n = masks.shape[0]
            idx = torch.zeros(n, dtype=torch.long, device=self.device)
            # the same prompt layout as training: two corners, then padding up to max_points
            width = max(2, self.stage.prompts.max_points)
            coords = torch.zeros(n, width, 2, device=self.device)
            labels = -torch.ones(n, width, dtype=torch.int32, device=self.device)
            coords[:, :2] = boxes.view(n, 2, 2)
            labels[:, 0], labels[:, 1] = 2, 3
            out = self.model.decode_prompts(feats, idx, points=(coords, labels))
            pred = (self.model.upsample_logits(out.best_logits, (h, w))[:, 0] > self.model.cfg.mask_threshold).cpu()
            pred1 = pred
        else:
            codes = tok.encode_with_features(feats, 0, masks)
            pred = tok.decode_with_features(feats, 0, codes, (h, w))
            first = codes.clone()
            first[:, 1:] = -1
            pred1 = tok.decode_with_features(feats, 0, first, (h, w))
        self._val_metric.update(list(pred), list(masks))
        self._val_metric_first.update(list(pred1), list(masks))
        if len(self._val_panels) < 4:
            self._val_panels.append((item["rgb"], masks.numpy(), pred.numpy()))

    def on_validation_epoch_end(self) -> None:
        import math

        if not self._val_panels:  # no validation mask was seen
            return
        full = self._val_metric.compute()
        first = self._val_metric_first.compute()
        results = {"val/rMaskIoU": full["rMaskIoU"], "val/rMaskIoU_first_code": first["rMaskIoU"],
                   "val/masks": full["count"]}
        for k, v in full.items():
            if k.startswith("rMaskIoU[") and not math.isnan(v):
                results[f"val_area/{k[len('rMaskIoU['):-1]}"] = v
        if self.stage.name == "samtok":
            results.update(self._codes_in_use())
        self.val_results = results
        for k, v in results.items():
            self.log(k, v)
        self._log_panels()

    def _codes_in_use(self) -> dict[str, float]:
        out = {}
        for d, cb in enumerate(self.model.quantizer.codebooks):
            out[f"val/codes_alive_depth{d}"] = float((cb.cluster_size_ema > 1e-3).sum())
        return out

    def _log_panels(self) -> None:
        logger = self.logger
        if logger is None or not hasattr(logger, "experiment") or not self._val_panels:
            return
        import numpy as np

        from samtok.core.render import caption_below, make_grid, overlay_masks

        tiles = []
        for rgb, gt, pred in self._val_panels:
            tiles.append(caption_below(overlay_masks(rgb, list(gt)), "ground truth"))
            tiles.append(caption_below(overlay_masks(rgb, list(pred)), "reconstruction"))
        grid = np.asarray(make_grid(tiles, cols=2))
        logger.experiment.add_image(f"{self.stage.name}/gt_vs_reconstruction", grid, self.global_step, dataformats="HWC")

    # ------------------------------------------------------------------ optimisation
    def configure_optimizers(self):
        from samtok.core.trainer import warmup_cosine

        groups = []
        for part in PARTS:
            params = [p for p in self._groups[part] if p.requires_grad]
            if not params:
                continue
            mult = float(self.stage.lr_multipliers.get(part, 1.0))
            groups.append({"params": params, "lr": self.stage.lr * mult, "name": part})
        if not groups:
            raise ValueError(f"stage {self.stage.name}: no trainable parameters (train_parts={self.stage.train_parts})")
        opt = torch.optim.AdamW(groups, lr=self.stage.lr, betas=tuple(self.stage.betas),
                                weight_decay=self.stage.weight_decay, foreach=True)  # multi-tensor also on CPU
        total, warm, floor = self.total_steps, self.stage.warmup_fraction, self.stage.min_lr_ratio
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: warmup_cosine(s, total, warm, floor))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
