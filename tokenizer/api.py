"""``SAMTokenizer``: the user-facing mask tokenizer (mask ↔ two codes), no Lightning needed.

    tok = SAMTokenizer.from_pretrained("runs/tokenizer/final")
    codes = tok.encode(image, masks)          # LongTensor (N, 2)
    masks = tok.decode(image, codes)          # BoolTensor (N, H, W) at the image's size

The image embedding is computed once per image and shared by all its masks; masks are processed
in chunks of ``mask_batch_size``. Pre-processing follows the release: the image is resized to
S x S (PIL bicubic, aspect ratio not kept), /255, ImageNet mean/std; the mask prompt is the
original-resolution mask resized (bilinear, antialiased) to the prompt encoder's input size; the
box prompt is the mask's inclusive pixel box scaled by S/W, S/H.
"""

from __future__ import annotations

from functools import cached_property
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch
from PIL import Image

from samtok.core.images import as_rgb_array
from samtok.core.masks import MaskFormatError, as_bool_mask
from samtok.tokenizer.checkpoints import file_fingerprint, load_tokenizer_dir, save_tokenizer_dir
from samtok.tokenizer.codec import MaskCodec
from samtok.tokenizer.model import ImageFeatures, SAMTokModel


def resize_image(rgb: np.ndarray, size: int) -> torch.Tensor:
    """``(H, W, 3)`` uint8 → ``(3, S, S)`` float in [0, 1] (PIL bicubic, no aspect ratio)."""
    img = Image.fromarray(rgb)
    if img.size != (size, size):
        img = img.resize((size, size), resample=Image.BICUBIC)
    return torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1).contiguous()


def masks_as_tensor(masks: Any, height: int, width: int, where: str = "masks") -> torch.Tensor:
    """A list / array / tensor of binary masks → bool ``(N, H, W)``, checked against the image size."""
    if isinstance(masks, torch.Tensor):
        arr = masks.detach().cpu()
        if arr.dim() == 2:
            arr = arr.unsqueeze(0)
        items = list(arr)
    elif isinstance(masks, np.ndarray):
        items = list(masks[None] if masks.ndim == 2 else masks)
    else:
        items = list(masks)
    out = []
    for k, m in enumerate(items):
        b = as_bool_mask(m, where=f"{where}[{k}]")
        if b.shape != (height, width):
            raise MaskFormatError(f"{where}[{k}]: mask size {b.shape[0]}x{b.shape[1]} does not match the image size {height}x{width}")
        if not b.any():
            raise MaskFormatError(f"{where}[{k}]: the mask is empty; an empty mask has no tokens")
        out.append(torch.from_numpy(np.ascontiguousarray(b)))
    if not out:
        return torch.zeros(0, height, width, dtype=torch.bool)
    return torch.stack(out)


def boxes_for(masks: torch.Tensor, size: int) -> torch.Tensor:
    """Inclusive pixel boxes of ``(N, H, W)`` bool masks, scaled to the S x S model input."""
    from samtok.core.masks import masks_to_boxes

    n, h, w = masks.shape
    boxes = masks_to_boxes(masks)
    scale = torch.tensor([size / w, size / h, size / w, size / h])
    return boxes * scale


def as_codes(codes: Any) -> torch.Tensor:
    """Codes as ``LongTensor (N, d)``; a single pair ``(c0, c1)`` becomes ``(1, 2)``."""
    t = torch.as_tensor(codes, dtype=torch.long)
    if t.dim() == 1:
        t = t.unsqueeze(0) if t.numel() else t.reshape(0, 2)
    return t


class SAMTokenizer:
    """Encode masks into codes and decode codes into masks for one image or a batch of images."""

    def __init__(self, model: SAMTokModel, device: str | torch.device = "cpu", mask_batch_size: int = 64,
                 path: Optional[str | Path] = None, info: Optional[dict] = None):
        self.model = model.eval().to(device)
        self.device = torch.device(device)
        self.mask_batch_size = mask_batch_size
        self.codec = MaskCodec(model.cfg.quantizer.codebook_size, model.cfg.quantizer.depth)
        self.path = Path(path) if path else None
        self.info = info or {}
        self.autocast_dtype: Optional[torch.dtype] = torch.bfloat16 if self.device.type == "cuda" else None

    # ------------------------------------------------------------------ persistence
    @classmethod
    def from_pretrained(cls, path: str | Path, device: str | torch.device = "cpu", **kwargs) -> "SAMTokenizer":
        model, info = load_tokenizer_dir(path)
        return cls(model, device=device, path=path, info=info, **kwargs)

    def save_pretrained(self, path: str | Path, info: Optional[dict] = None) -> Path:
        out = save_tokenizer_dir(self.model, path, info={**self.info, **(info or {})})
        self.path = Path(out)
        self.__dict__.pop("fingerprint", None)
        return out

    @cached_property
    def fingerprint(self) -> str:
        """Hash of this tokenizer's config and weights files (identifies pre-tokenized tables)."""
        if self.path is None:
            raise ValueError("fingerprint needs a saved tokenizer (save_pretrained or from_pretrained)")
        return file_fingerprint(self.path)

    @property
    def image_size(self) -> int:
        return self.model.image_size

    # ------------------------------------------------------------------ features
    def _autocast(self):
        if self.autocast_dtype is None:
            return torch.autocast(device_type=self.device.type, enabled=False)
        return torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype)

    @torch.no_grad()
    def image_features(self, images: Sequence[Any]) -> tuple[ImageFeatures, list[tuple[int, int]]]:
        """Features of a list of images (paths, PIL, arrays) and their original ``(H, W)`` sizes."""
        rgbs = [as_rgb_array(im, where=f"image {k}") for k, im in enumerate(images)]
        sizes = [(r.shape[0], r.shape[1]) for r in rgbs]
        batch = torch.stack([resize_image(r, self.image_size) for r in rgbs]).to(self.device)
        with self._autocast():
            feats = self.model.encode_image(self.model.normalize(batch))
        return feats, sizes

    # ------------------------------------------------------------------ encode
    @torch.no_grad()
    def encode_with_features(self, feats: ImageFeatures, image_index: int, masks: torch.Tensor) -> torch.Tensor:
        """Codes ``(N, depth)`` of bool masks ``(N, H, W)`` (original size) of image ``image_index``."""
        out = []
        for chunk in masks.split(self.mask_batch_size):
            boxes = boxes_for(chunk, self.image_size).to(self.device)
            idx = torch.full((chunk.shape[0],), image_index, dtype=torch.long, device=self.device)
            m = self.model.mask_prompt(chunk.unsqueeze(1).to(self.device))
            with self._autocast():
                z = self.model.encode_masks(feats, idx, m, boxes)
            out.append(self.model.quantizer.encode(z.float()).cpu())
        if not out:
            return torch.zeros(0, self.model.quantizer.depth, dtype=torch.long)
        return torch.cat(out)

    def encode(self, image: Any, masks: Any) -> torch.Tensor:
        """Codes ``LongTensor (N, depth)`` for the binary masks ``(N, H, W)`` of one image."""
        return self.encode_batch([image], [masks])[0]

    def encode_batch(self, images: Sequence[Any], masks_per_image: Sequence[Any]) -> list[torch.Tensor]:
        if len(images) != len(masks_per_image):
            raise ValueError(f"{len(images)} images but {len(masks_per_image)} mask lists")
        feats, sizes = self.image_features(images)
        return [
            self.encode_with_features(feats, k, masks_as_tensor(m, h, w, where=f"image {k} masks"))
            for k, (m, (h, w)) in enumerate(zip(masks_per_image, sizes))
        ]

    # ------------------------------------------------------------------ decode
    @torch.no_grad()
    def decode_logits_with_features(self, feats: ImageFeatures, image_index: int, codes: torch.Tensor) -> torch.Tensor:
        """Low-res logits ``(N, S/4, S/4)`` of the best-IoU mask for ``codes (N, d)``."""
        codes = as_codes(codes)
        if codes.dim() != 2:
            raise ValueError(f"codes must be (N, d), got shape {tuple(codes.shape)}")
        k = self.model.cfg.quantizer.codebook_size
        bad = (codes[:, 0] < 0) | (codes >= k).any(dim=1) | (codes < -1).any(dim=1)
        if bad.any():
            raise ValueError(f"codes out of range [0, {k}) (or -1 after the first): {codes[bad][:3].tolist()}")
        out = []
        for chunk in codes.split(self.mask_batch_size):
            idx = torch.full((chunk.shape[0],), image_index, dtype=torch.long, device=self.device)
            with self._autocast():
                dec = self.model.decode_codes(feats, idx, chunk.to(self.device))
            out.append(dec.best_logits[:, 0].float())
        s = self.image_size // 4
        return torch.cat(out) if out else torch.zeros(0, s, s)

    def decode_with_features(self, feats: ImageFeatures, image_index: int, codes: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        logits = self.decode_logits_with_features(feats, image_index, codes)
        if logits.shape[0] == 0:
            return torch.zeros(0, *size, dtype=torch.bool)
        up = self.model.upsample_logits(logits.unsqueeze(1), size)[:, 0]
        return (up > self.model.cfg.mask_threshold).cpu()

    def decode(self, image: Any, codes: Any) -> torch.Tensor:
        """Masks ``BoolTensor (N, H, W)`` at the image's original size for ``codes (N, d)``."""
        return self.decode_batch([image], [codes])[0]

    def decode_batch(self, images: Sequence[Any], codes_per_image: Sequence[Any]) -> list[torch.Tensor]:
        feats, sizes = self.image_features(images)
        return [self.decode_with_features(feats, k, as_codes(c), size) for k, (c, size) in enumerate(zip(codes_per_image, sizes))]

    # ------------------------------------------------------------------ both
    def reconstruct(self, image: Any, masks: Any, depth: Optional[int] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Encode then decode (one image-encoder pass). ``depth=1`` decodes from the first code only."""
        feats, sizes = self.image_features([image])
        h, w = sizes[0]
        m = masks_as_tensor(masks, h, w)
        codes = self.encode_with_features(feats, 0, m)
        dec_codes = codes.clone()
        if depth is not None and depth < dec_codes.shape[1]:
            dec_codes[:, depth:] = -1
        return codes, self.decode_with_features(feats, 0, dec_codes, (h, w))

    # ------------------------------------------------------------------ text
    def spans(self, codes: torch.Tensor) -> list[str]:
        return self.codec.format_many(codes.tolist())
