"""The SAMTok mask tokenizer as a plain ``nn.Module`` (no Lightning): mask → two codes → mask.

Shapes (S = SAM2 image size, h = w = S/16, C = hidden width, N = number of masks):

* :meth:`SAMTokModel.encode_image`: images ``(B, 3, S, S)`` normalised → :class:`ImageFeatures`
  (embedding ``(B, C, h, w)`` with ``no_mem_embed`` added, high-res ``(B, C/8, 4h, 4w)`` and
  ``(B, C/4, 2h, 2w)``), computed once per image and shared by all its masks;
* :meth:`SAMTokModel.encode_masks`: masks ``(N, 1, H, W)`` (any resolution, 0/1), boxes ``(N, 4)``
  in S-scaled pixel coordinates, ``image_index (N,)`` → ``z (N, C)``;
* :meth:`SAMTokModel.decode_vectors` / :meth:`decode_codes`: one prompt vector (or codes) per mask
  → mask logits ``(N, 3, 4h, 4w)``, predicted IoUs ``(N, 3)``, and the best of the three.

Parameter names follow Meta's SAM 2 and the released tokenizer (``image_encoder``, ``no_mem_embed``,
``sam_prompt_encoder``, ``sam_mask_decoder``, ``sam_mask_encoder``, ``quantizer.codebooks.{d}``),
so both files load by name (see :mod:`samtok.tokenizer.checkpoints`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from samtok.tokenizer.quantizer import QuantizerOutput, ResidualQuantizer
from samtok.tokenizer.sam2_parts import SAM2Config, build_sam2_parts

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class QuantizerConfig:
    codebook_size: int = 256  # codes per depth (256 in the release)
    depth: int = 2  # residual depths = mask words per mask (2 in the release)
    decay: float = 0.99  # EMA decay of counts and sums
    eps: float = 1e-5  # Laplace smoothing of the counts
    dead_code_threshold: float = 1.0  # EMA count under which a code is restarted (release: 1)
    restart_count: Optional[float] = None  # EMA count given to a restarted code (None: the threshold)
    restart_source: str = "batch"  # batch | buffer (recent inputs) | none
    buffer_size: int = 4096  # size of the recent-input buffer when restart_source = buffer


@dataclass
class MaskEncoderConfig:
    depth: int = 2  # two-way transformer blocks (release: 2)
    num_heads: int = 8
    mlp_dim: int = 2048


@dataclass
class TokenizerModelConfig:
    sam2: SAM2Config = field(default_factory=SAM2Config)
    mask_encoder: MaskEncoderConfig = field(default_factory=MaskEncoderConfig)
    quantizer: QuantizerConfig = field(default_factory=QuantizerConfig)
    mask_threshold: float = 0.5  # decoded mask = upsampled logit > this (a logit, not a probability)
    minus_one_as_code0: bool = False  # reproduce the release's -1 -> code 0 aliasing (parity option)
    gate_with_object_score: bool = False  # release: the object-score head never gates the mask


@dataclass
class ImageFeatures:
    """Per-image SAM 2 features reused by every mask of the image."""

    embed: torch.Tensor  # (B, C, h, w), no_mem_embed added
    high_res: tuple[torch.Tensor, torch.Tensor]  # (B, C/8, 4h, 4w), (B, C/4, 2h, 2w)

    def select(self, index: torch.Tensor) -> "ImageFeatures":
        return ImageFeatures(self.embed[index], (self.high_res[0][index], self.high_res[1][index]))

    def detach(self) -> "ImageFeatures":
        return ImageFeatures(self.embed.detach(), (self.high_res[0].detach(), self.high_res[1].detach()))


@dataclass
class DecoderOutput:
    logits: torch.Tensor  # (N, M, 4h, 4w) low-res mask logits (M = 3 multimask, or 1)
    iou_pred: torch.Tensor  # (N, M)
    object_score: torch.Tensor  # (N, 1)
    best_index: torch.Tensor  # (N,) index of the highest predicted IoU

    @property
    def best_logits(self) -> torch.Tensor:
        """(N, 1, 4h, 4w) logits of the mask with the highest predicted IoU."""
        n = self.logits.shape[0]
        return self.logits[torch.arange(n, device=self.logits.device), self.best_index].unsqueeze(1)


class MaskEncoder(nn.Module):
    """A SAM-style two-way transformer with ONE learnable query: (image + mask prompt) → z."""

    def __init__(self, dim: int, cfg: MaskEncoderConfig):
        super().__init__()
        from sam2.modeling.sam.transformer import TwoWayTransformer

        self.transformer = TwoWayTransformer(
            depth=cfg.depth, embedding_dim=dim, num_heads=cfg.num_heads, mlp_dim=cfg.mlp_dim
        )
        self.mask_tokens = nn.Embedding(1, dim)

    def forward(self, src: torch.Tensor, pos: torch.Tensor, sparse: torch.Tensor) -> torch.Tensor:
        """``src (N, C, h, w)`` (image + dense prompt), ``pos (1, C, h, w)``, ``sparse (N, P, C)`` → ``(N, C)``."""
        n = sparse.shape[0]
        tokens = torch.cat([self.mask_tokens.weight.unsqueeze(0).expand(n, -1, -1), sparse], dim=1)
        hs, _ = self.transformer(src, pos.expand(n, -1, -1, -1), tokens)
        return hs[:, 0]


class SAMTokModel(nn.Module):
    """SAM 2 parts + mask encoder + residual quantizer."""

    def __init__(self, cfg: TokenizerModelConfig):
        super().__init__()
        self.cfg = cfg
        parts = build_sam2_parts(cfg.sam2)
        self.image_encoder = parts["image_encoder"]
        self.no_mem_embed = parts["no_mem_embed"]
        self.sam_prompt_encoder = parts["sam_prompt_encoder"]
        self.sam_mask_decoder = parts["sam_mask_decoder"]
        self.hidden_dim = parts["hidden_dim"]
        if not parts["use_high_res_features"]:
            raise ValueError("SAMTok needs SAM 2's high-resolution features (use_high_res_features_in_sam)")
        self.sam_mask_encoder = MaskEncoder(self.hidden_dim, cfg.mask_encoder)
        q = cfg.quantizer
        self.quantizer = ResidualQuantizer(
            dim=self.hidden_dim, codebook_size=q.codebook_size, depth=q.depth, decay=q.decay, eps=q.eps,
            dead_code_threshold=q.dead_code_threshold, restart_count=q.restart_count,
            restart_source=q.restart_source, buffer_size=q.buffer_size,
        )
        self.register_buffer("pixel_mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    @property
    def image_size(self) -> int:
        return self.cfg.sam2.image_size

    # ------------------------------------------------------------------ image
    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """``(B, 3, S, S)`` floats in [0, 1] → ImageNet-normalised."""
        return (images - self.pixel_mean) / self.pixel_std

    def backbone(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Normalised images ``(B, 3, S, S)`` → the three FPN levels (strides 4, 8, 16).

        This is the expensive, usually frozen part; its output can be cached per image.
        """
        return list(self.image_encoder(images)["backbone_fpn"])

    def prepare_features(self, fpn: list[torch.Tensor]) -> ImageFeatures:
        """FPN levels → decoder-ready features (projections of the mask decoder, ``no_mem_embed``)."""
        feat_s0 = self.sam_mask_decoder.conv_s0(fpn[0])
        feat_s1 = self.sam_mask_decoder.conv_s1(fpn[1])
        embed = fpn[-1] + self.no_mem_embed.view(1, -1, 1, 1)
        return ImageFeatures(embed, (feat_s0, feat_s1))

    def encode_image(self, images: torch.Tensor) -> ImageFeatures:
        """Normalised images ``(B, 3, S, S)`` → features (image encoder + neck run once)."""
        return self.prepare_features(self.backbone(images))

    # ------------------------------------------------------------------ mask -> z
    def mask_prompt(self, masks: torch.Tensor) -> torch.Tensor:
        """Masks ``(N, 1, H, W)`` at any size → the prompt encoder's input size (bilinear, antialiased)."""
        size = self.sam_prompt_encoder.mask_input_size
        masks = masks.float()
        if tuple(masks.shape[-2:]) == tuple(size):
            return masks
        return F.interpolate(masks, size=size, mode="bilinear", align_corners=False, antialias=True)

    def box_prompt(self, boxes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """S-scaled boxes ``(N, 4)`` → two corner points ``(N, 2, 2)`` with labels 2 and 3."""
        corners = boxes.reshape(-1, 2, 2).float()
        labels = torch.tensor([2, 3], device=boxes.device, dtype=torch.int32).expand(corners.shape[0], 2)
        return corners, labels

    def encode_masks(
        self, feats: ImageFeatures, image_index: torch.Tensor, masks: torch.Tensor, boxes: torch.Tensor
    ) -> torch.Tensor:
        """``z (N, C)`` for masks ``(N, 1, H, W)`` of the images ``image_index (N,)``."""
        sparse, dense = self.sam_prompt_encoder(points=self.box_prompt(boxes), boxes=None, masks=self.mask_prompt(masks))
        src = feats.embed[image_index] + dense
        return self.sam_mask_encoder(src, self.sam_prompt_encoder.get_dense_pe(), sparse)

    def quantize(self, z: torch.Tensor, update: Optional[bool] = None) -> QuantizerOutput:
        return self.quantizer(z, update=update)

    # ------------------------------------------------------------------ vector / codes -> mask
    def decode_vectors(
        self,
        feats: ImageFeatures,
        image_index: torch.Tensor,
        vectors: torch.Tensor,
        multimask: bool = True,
    ) -> DecoderOutput:
        """Decode one prompt vector per mask: ``vectors (N, C)`` appended after the empty points."""
        n = vectors.shape[0]
        device = vectors.device
        empty_pts = torch.zeros(n, 1, 2, device=device)
        empty_lbl = -torch.ones(n, 1, dtype=torch.int32, device=device)
        sparse, dense = self.sam_prompt_encoder(points=(empty_pts, empty_lbl), boxes=None, masks=None)
        sparse = torch.cat([sparse, vectors.unsqueeze(1).to(sparse.dtype)], dim=1)
        return self._run_decoder(feats.select(image_index), sparse, dense, multimask)

    def decode_codes(
        self, feats: ImageFeatures, image_index: torch.Tensor, codes: torch.Tensor, multimask: bool = True
    ) -> DecoderOutput:
        """Decode ``codes (N, d)`` (``-1`` in depth ≥ 1: decode from the first code only)."""
        vectors = self.quantizer.embed_codes(codes, minus_one_as_code0=self.cfg.minus_one_as_code0)
        return self.decode_vectors(feats, image_index, vectors, multimask)

    def decode_prompts(
        self,
        feats: ImageFeatures,
        image_index: torch.Tensor,
        points: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
        boxes: Optional[torch.Tensor] = None,
        mask_inputs: Optional[torch.Tensor] = None,
        multimask: bool = True,
        use_mask: Optional[torch.Tensor] = None,
    ) -> DecoderOutput:
        """Plain promptable SAM 2 segmentation (points / S-scaled boxes / mask prompts).

        Points with label -1 are padding. ``use_mask (N,)`` selects, per mask, the dense mask
        prompt or SAM's no-mask embedding (so one batch can mix prompt kinds). Used to pre-train a
        small SAM 2 from scratch (stage 0) and for parity tests against ``SAM2Base._forward_sam_heads``.
        """
        n = image_index.shape[0]
        if points is None and boxes is None:
            points = (torch.zeros(n, 1, 2, device=image_index.device),
                      -torch.ones(n, 1, dtype=torch.int32, device=image_index.device))
        if boxes is not None:
            corners, labels = self.box_prompt(boxes)
            if points is not None:
                corners = torch.cat([points[0], corners], dim=1)
                labels = torch.cat([points[1], labels], dim=1)
            points = (corners, labels)
        masks = self.mask_prompt(mask_inputs) if mask_inputs is not None else None
        sparse, dense = self.sam_prompt_encoder(points=points, boxes=None, masks=masks)
        if masks is not None and use_mask is not None:
            no_mask = self.sam_prompt_encoder.no_mask_embed.weight.reshape(1, -1, 1, 1)
            dense = torch.where(use_mask.view(-1, 1, 1, 1), dense, no_mask.expand_as(dense))
        return self._run_decoder(feats.select(image_index), sparse, dense, multimask)

    def _run_decoder(self, feats: ImageFeatures, sparse: torch.Tensor, dense: torch.Tensor, multimask: bool) -> DecoderOutput:
        logits, iou, _, obj = self.sam_mask_decoder(
            image_embeddings=feats.embed,
            image_pe=self.sam_prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=multimask,
            repeat_image=False,
            high_res_features=list(feats.high_res),
        )
        logits = logits.float()
        if self.cfg.gate_with_object_score:
            logits = torch.where(obj[:, :, None, None] > 0, logits, torch.full_like(logits, -1024.0))
        best = iou.argmax(dim=1)
        return DecoderOutput(logits, iou.float(), obj.float(), best)

    # ------------------------------------------------------------------ helpers
    def upsample_logits(self, logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """Low-res logits ``(N, 1, 4h, 4w)`` → ``(N, 1, H, W)`` (bilinear, as the release)."""
        return F.interpolate(logits.float(), size=size, mode="bilinear", align_corners=False)

    def trainable_groups(self) -> dict[str, list[nn.Parameter]]:
        """Parameters by part, for freezing and per-part learning rates."""
        dec = self.sam_mask_decoder
        iou_head = list(dec.iou_prediction_head.parameters())
        obj_head = list(dec.pred_obj_score_head.parameters()) if hasattr(dec, "pred_obj_score_head") else []
        special = {id(p) for p in iou_head + obj_head}
        return {
            "image_encoder": list(self.image_encoder.parameters()) + [self.no_mem_embed],
            "prompt_encoder": list(self.sam_prompt_encoder.parameters()),
            "mask_decoder": [p for p in dec.parameters() if id(p) not in special],
            "iou_head": iou_head,
            "object_score_head": obj_head,
            "mask_encoder": list(self.sam_mask_encoder.parameters()),
        }


def state_dict_shapes(cfg: TokenizerModelConfig) -> dict[str, tuple[int, ...]]:
    """Names and shapes of the model's state dict without allocating it (built on the meta device).

    Hiera calls ``torch.linspace(...).item()`` while building (drop-path rates), which the meta
    device refuses, so only that call is kept on the CPU.
    """
    from unittest import mock

    real_linspace = torch.linspace

    def cpu_linspace(*args, **kwargs):
        kwargs["device"] = "cpu"
        return real_linspace(*args, **kwargs)

    with torch.device("meta"), mock.patch.object(torch, "linspace", cpu_linspace):
        model = SAMTokModel(cfg)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}
