"""Training batches for the tokenizer: image visits with their masks, prompts and targets.

The records are any objects with ``path``, ``height``, ``width`` and ``anns`` (each with
``to_mask(h, w)``) — ``samtok.data.records.ImageRecord`` in practice — so this module does not
depend on the data package. Each visit of an image yields ``masks_per_visit`` of its masks, chosen
without replacement across visits (a per-image permutation, reshuffled when exhausted), as the
release samples one random mask per image visit. Empty masks are rejected.

The stream is infinite and sharded by (rank, worker): every image belongs to exactly one shard,
so per-image visit counts are exact without communication.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, Iterator, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import IterableDataset, get_worker_info

from samtok.core.images import load_image
from samtok.core.masks import MaskFormatError
from samtok.tokenizer.api import resize_image
from samtok.tokenizer.losses import resize_gt

PROMPT_ENCODER = 0  # box corners + dense mask (what the SAMTok encoder sees)
PROMPT_BOX = 1  # noisy box corners only
PROMPT_POINTS = 2  # a few positive clicks


@dataclass
class PromptMix:
    """Stage-0 prompt distribution (probabilities are normalised)."""

    encoder: float = 0.4  # box corners + dense mask: pre-trains the prompt path SAMTok's encoder uses
    box: float = 0.4
    points: float = 0.2
    box_noise: float = 0.1  # std of corner jitter, as a fraction of the box side
    max_points: int = 3


def _stable_seed(*parts: Any) -> int:
    h = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") % (2**63)


class MaskVisitStream(IterableDataset):
    """Infinite stream of image visits (a dict per visit, see :func:`collate_visits`)."""

    def __init__(
        self,
        records: Sequence[Any],
        image_size: int,
        masks_per_visit: int = 1,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        prompts: Optional[PromptMix] = None,
        min_mask_pixels: int = 1,
        gt_resize: str = "nearest",
    ):
        super().__init__()
        if not records:
            raise MaskFormatError("the tokenizer's training data has no images")
        self.records = records
        self.image_size = image_size
        self.masks_per_visit = masks_per_visit
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.prompts = prompts
        self.min_mask_pixels = min_mask_pixels
        self.gt_resize = gt_resize
        self.prompt_size = 4 * (image_size // 16)
        self.logit_size = image_size // 4

    def _shard(self) -> tuple[np.ndarray, int]:
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info else (0, 1)
        shard_id = self.rank * nw + wid
        n_shards = self.world_size * nw
        return np.arange(shard_id, len(self.records), n_shards), shard_id

    def __iter__(self) -> Iterator[dict]:
        indices, shard_id = self._shard()
        if len(indices) == 0:
            raise MaskFormatError(f"shard {shard_id} has no images: fewer images than processes x workers")
        rng = np.random.default_rng(_stable_seed(self.seed, shard_id))
        visits: dict[int, int] = {}
        epoch = 0
        while True:
            for i in rng.permutation(indices):
                k = visits.get(int(i), 0)
                visits[int(i)] = k + 1
                item = self.visit(int(i), k, rng)
                if item is not None:
                    yield item
            epoch += 1

    def _mask_order(self, index: int, n: int, cycle: int) -> np.ndarray:
        return np.random.default_rng(_stable_seed(self.seed, index, cycle)).permutation(n)

    def visit(self, index: int, visit_number: int, rng: np.random.Generator) -> Optional[dict]:
        rec = self.records[index]
        n = len(rec.anns)
        if n == 0:
            return None
        chosen = []
        for j in range(self.masks_per_visit * visit_number, self.masks_per_visit * (visit_number + 1)):
            cycle, pos = divmod(j, n)
            chosen.append(int(self._mask_order(index, n, cycle)[pos]))
        rgb = load_image(rec.path)
        h, w = rgb.shape[:2]
        if (h, w) != (rec.height, rec.width):
            raise MaskFormatError(f"{rec.path}: image is {h}x{w} but the annotation says {rec.height}x{rec.width}")
        masks = []
        for a in dict.fromkeys(chosen):  # a small image may repeat a mask within one visit
            m = rec.anns[a].to_mask(h, w, where=f"{rec.path} ann {rec.anns[a].ann_id}")
            if int(m.sum()) >= self.min_mask_pixels:
                masks.append(m)
        if not masks:
            return None
        return self.prepare(index, rgb, masks, rng)

    def prepare(self, key: int, rgb: np.ndarray, masks: list[np.ndarray], rng: np.random.Generator) -> dict:
        """Tensors for one image and its chosen masks (all at model resolution)."""
        s = self.image_size
        h, w = rgb.shape[:2]
        image = (resize_image(rgb, s) * 255).round().to(torch.uint8)
        m = torch.from_numpy(np.stack(masks)).unsqueeze(1).float()  # (M, 1, H, W)
        prompt = F.interpolate(m, size=(self.prompt_size,) * 2, mode="bilinear", align_corners=False, antialias=True)
        gt = resize_gt(m, (self.logit_size,) * 2, self.gt_resize)
        from samtok.core.masks import masks_to_boxes

        scale = torch.tensor([s / w, s / h, s / w, s / h])
        boxes = masks_to_boxes(m[:, 0].bool()) * scale
        item = {"key": key, "image": image, "mask_prompt": prompt, "gt": gt, "boxes": boxes}
        if self.prompts is not None:
            item.update(self._stage0_prompts(m[:, 0].bool(), boxes, rng, scale))
        return item

    def _stage0_prompts(self, masks: torch.Tensor, boxes: torch.Tensor, rng: np.random.Generator, scale: torch.Tensor) -> dict:
        mix = self.prompts
        p = np.array([mix.encoder, mix.box, mix.points], dtype=np.float64)
        kinds = rng.choice(3, size=masks.shape[0], p=p / p.sum())
        n_pts = max(2, mix.max_points)
        coords = torch.zeros(masks.shape[0], n_pts, 2)
        labels = -torch.ones(masks.shape[0], n_pts, dtype=torch.int32)
        for k, kind in enumerate(kinds):
            if kind in (PROMPT_ENCODER, PROMPT_BOX):
                box = boxes[k].clone()
                if kind == PROMPT_BOX and mix.box_noise > 0:
                    side = torch.stack([box[2] - box[0], box[3] - box[1]]).repeat(2).clamp_min(1.0)
                    box = box + torch.from_numpy(rng.normal(0, mix.box_noise, 4)).float() * side
                    box = box.clamp(0, self.image_size - 1)
                coords[k, :2] = box.view(2, 2)
                labels[k, :2] = torch.tensor([2, 3], dtype=torch.int32)
            else:
                ys, xs = torch.nonzero(masks[k], as_tuple=True)
                count = int(rng.integers(1, mix.max_points + 1))
                pick = torch.from_numpy(rng.integers(0, len(xs), count))
                pts = torch.stack([xs[pick].float() * scale[0], ys[pick].float() * scale[1]], dim=1)
                coords[k, :count] = pts
                labels[k, :count] = 1
        return {"prompt_kind": torch.from_numpy(kinds), "point_coords": coords, "point_labels": labels}


def collate_visits(items: list[dict]) -> dict:
    """Stack images; concatenate masks with ``image_index`` pointing at their image in the batch."""
    out = {
        "keys": torch.tensor([it["key"] for it in items], dtype=torch.long),
        "images": torch.stack([it["image"] for it in items]),
        "image_index": torch.cat([torch.full((it["gt"].shape[0],), i, dtype=torch.long) for i, it in enumerate(items)]),
    }
    for name in ("mask_prompt", "gt", "boxes", "prompt_kind", "point_coords", "point_labels"):
        if name in items[0]:
            out[name] = torch.cat([it[name] for it in items])
    return out


class ValidationImages(torch.utils.data.Dataset):
    """Fixed validation images with ALL their (non-empty) masks at original resolution."""

    def __init__(self, records: Sequence[Any], max_images: int = 100, max_masks_per_image: int = 16):
        self.records = list(records)[:max_images]
        self.max_masks = max_masks_per_image

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> dict:
        rec = self.records[i]
        rgb = load_image(rec.path)
        h, w = rgb.shape[:2]
        masks = []
        for a in rec.anns[: self.max_masks]:
            m = a.to_mask(h, w, where=f"{rec.path} ann {a.ann_id}")
            if m.any():
                masks.append(m)
        return {"index": i, "rgb": rgb, "masks": np.stack(masks) if masks else np.zeros((0, h, w), bool)}


def collate_single(items: list[dict]) -> dict:
    return items[0]
