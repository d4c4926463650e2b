"""Generating splits of the synthetic world, in memory or onto disk.

Determinism: image ``index`` of split ``split`` depends only on ``(seed, split, index)`` through
its own ``numpy`` seed sequence, so a split's first N images are the same whatever its size, the
splits never share a scene, and the language of each task has its own stream (turning a task off
changes nothing else).

Ids are decimal strings (the upstream formats hold integers): image ids ``1xxxxxxx`` (train),
``2xxxxxxx`` (val), ``3xxxxxxx`` (test) with the index in the low digits; annotation ids are
``image_id * 100 + k`` with ``k`` the paint order (0 = furthest back), unique in a split's COCO file.

On-disk layout (``out_dir``)::

    images/{split}/{split}_{index:06d}.png     the RGB scenes
    <files of samtok.data.formats.synthetic_layout.write_synthetic_split, per split>
    config.yaml                                 the resolved SynthConfig
    preview.png                                 with preview=true
    DONE                                        JSON summary, written last
"""

from __future__ import annotations

import io
import json
import os
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, NamedTuple, Optional, Sequence

import numpy as np
from PIL import Image

from samtok.core.config import save_config, to_dict
from samtok.core.errors import SamtokError
from samtok.core.masks import box_xyxy_to_xywh, encode_rle
from samtok.core.runtime import get_logger
from samtok.data.records import ImageRecord, MaskAnn, TaskSample
from samtok.data.synth.config import SynthConfig
from samtok.data.synth.scene import Scene, sample_scene
from samtok.data.synth.tasks import build_samples
from samtok.data.synth.world import TASK_NAMES

SOURCE = "synth"
SPLITS: tuple[str, ...] = ("train", "val", "test")
DONE_NAME = "DONE"

log = get_logger("samtok.data.synth")


@dataclass
class SynthImage:
    """One generated image: its record (masks as RLE), task samples, pixels and scene facts."""

    record: ImageRecord
    samples: list[TaskSample]
    pixels: np.ndarray  # (H, W, 3) uint8
    scene: Scene


class SynthSplit(NamedTuple):
    images: list[ImageRecord]
    samples: list[TaskSample]
    pixels: list[np.ndarray]  # (H, W, 3) uint8, parallel to ``images``


MAX_IMAGES_PER_SPLIT = 10**7
MAX_OBJECTS_PER_IMAGE = 100


def _split_code(split: str) -> int:
    # stable across processes and Python versions (unlike hash())
    return zlib.crc32(split.encode("utf-8"))


def image_id_for(split: str, index: int) -> str:
    """Decimal ids, unique across splits (train 1xxxxxxx, val 2xxxxxxx, test 3xxxxxxx): the upstream
    formats hold integer ids, and a mask key (source, image_id, ann_id) must not repeat across splits."""
    if split not in SPLITS:
        raise SamtokError(f"unknown split {split!r}; the synthetic world has {list(SPLITS)}")
    if not 0 <= index < MAX_IMAGES_PER_SPLIT:
        raise SamtokError(f"image index {index} out of range [0, {MAX_IMAGES_PER_SPLIT})")
    return str((SPLITS.index(split) + 1) * MAX_IMAGES_PER_SPLIT + index)


def ann_id_for(image_id: str, k: int) -> str:
    """Decimal annotation ids, unique in a split's COCO file: image id * 100 + k (k = paint order)."""
    return str(int(image_id) * MAX_OBJECTS_PER_IMAGE + k)


def file_name_for(split: str, index: int) -> str:
    return f"images/{split}/{split}_{index:06d}.png"


def generate_image(cfg: SynthConfig, split: str, index: int, image_root: str = "") -> SynthImage:
    """Image ``index`` of ``split``: the scene, its record (file name relative to ``out_dir``) and samples."""
    image_id = image_id_for(split, index)
    base = [int(cfg.seed) & 0xFFFFFFFF, _split_code(split), int(index)]
    scene = sample_scene(
        cfg, np.random.default_rng(np.random.SeedSequence(base + [0])), ann_id=lambda k: ann_id_for(image_id, k)
    )

    def task_rng(task: str) -> np.random.Generator:
        return np.random.default_rng(np.random.SeedSequence(base + [1 + TASK_NAMES.index(task)]))

    anns = []
    for o, m in zip(scene.facts.objects, scene.masks):
        anns.append(
            MaskAnn(
                ann_id=o.ann_id,
                segmentation=encode_rle(m),
                category=o.shape,
                bbox=box_xyxy_to_xywh(o.box),
                area=float(o.area),
                attributes={
                    "shape": o.shape,
                    "color": o.color,
                    "size": o.size,
                    "location": scene.facts.location_phrase(o),
                    "depth": o.depth,
                    "hidden_by": dict(o.hidden_by),
                },
            )
        )
    record = ImageRecord(
        source=SOURCE,
        image_id=image_id,
        file_name=file_name_for(split, index),
        height=scene.height,
        width=scene.width,
        image_root=image_root,
        anns=anns,
    )
    samples = build_samples(cfg, scene.facts, image_id, SOURCE, task_rng)
    return SynthImage(record=record, samples=samples, pixels=scene.image, scene=scene)


def iter_split(
    cfg: SynthConfig, split: str, count: Optional[int] = None, image_root: str = "", progress=None
) -> Iterator[SynthImage]:
    """Yield the images of ``split`` one by one (``count`` defaults to the config's size of the split)."""
    if split not in SPLITS:
        raise SamtokError(f"unknown split {split!r}; the synthetic world has {list(SPLITS)}")
    n = cfg.split_sizes()[split] if count is None else int(count)
    for i in range(n):
        yield generate_image(cfg, split, i, image_root=image_root)
        if progress is not None:
            progress.update(1)


def generate_split(cfg: SynthConfig, split: str, count: Optional[int] = None) -> SynthSplit:
    """A whole split in memory: ``(image records, task samples, pixel arrays)``."""
    cfg.validate()
    images, samples, pixels = [], [], []
    for item in iter_split(cfg, split, count):
        images.append(item.record)
        samples.extend(item.samples)
        pixels.append(item.pixels)
    return SynthSplit(images, samples, pixels)


# ------------------------------------------------------------------------------------------------
# disk


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def png_bytes(pixels: np.ndarray, compress_level: int = 1) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG", compress_level=compress_level)
    return buf.getvalue()


def _writer():
    try:
        from samtok.data.formats.synthetic_layout import write_synthetic_split
    except ImportError as exc:
        raise SamtokError(
            "samtok.data.formats.synthetic_layout.write_synthetic_split is not available yet "
            f"({exc}); the in-memory API (samtok.data.synth.generate_split) works without it"
        ) from exc
    return write_synthetic_split


def task_counts(samples: Sequence[TaskSample]) -> dict[str, int]:
    out: dict[str, int] = {}
    for s in samples:
        key = s.task
        if key == "gres" and getattr(s, "no_target", False):
            out["gres_no_target"] = out.get("gres_no_target", 0) + 1
        if key == "region_caption" and getattr(s, "question", ""):
            key = "region_vqa"
        out[key] = out.get(key, 0) + 1
    return dict(sorted(out.items()))


def generate(cfg: SynthConfig, splits: Sequence[str] = SPLITS) -> dict:
    """Write the data set into ``cfg.out_dir``; return the DONE summary.

    The DONE marker is removed first and written last (atomically), so a set without DONE is
    incomplete. PNGs are written atomically; stale PNGs of an earlier, larger run are removed.
    """
    cfg.validate()
    write_split = _writer()
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    done_path = out / DONE_NAME
    done_path.unlink(missing_ok=True)
    save_config(cfg, out)
    sizes = cfg.split_sizes()
    total = sum(sizes[s] for s in splits)
    bar = None
    if cfg.progress:
        from tqdm import tqdm

        bar = tqdm(total=total, desc="synth", unit="img", dynamic_ncols=True, mininterval=0.5)
    summary: dict = {"seed": cfg.seed, "source": SOURCE, "counts": {}, "files": {}}
    preview_items: list[SynthImage] = []
    try:
        for split in splits:
            img_dir = out / "images" / split
            img_dir.mkdir(parents=True, exist_ok=True)
            if bar is not None:
                bar.set_description(f"synth {split}")
            records, samples, names = [], [], set()
            n_objects = 0
            for item in iter_split(cfg, split, image_root=str(out), progress=bar):
                name = Path(item.record.file_name).name
                _atomic_write_bytes(img_dir / name, png_bytes(item.pixels, cfg.png_compress_level))
                names.add(name)
                records.append(item.record)
                samples.extend(item.samples)
                n_objects += len(item.record.anns)
                if split == "train" and cfg.preview and len(preview_items) < cfg.preview_count:
                    preview_items.append(item)
            for stale in img_dir.glob(f"{split}_*.png"):
                if stale.name not in names:
                    stale.unlink()
            # open-vocabulary samples (asked categories incl. distractors) travel in the COCO file
            # as LVIS-style neg_category_ids + an `ov_seg` key (see docs/formats.md)
            files = write_split(out, split, records, samples, list(cfg.shapes))
            summary["files"][split] = {k: str(Path(v).relative_to(out)) if Path(v).is_relative_to(out) else str(v) for k, v in files.items()}
            summary["counts"][split] = {"images": len(records), "objects": n_objects, "samples": task_counts(samples)}
    finally:
        if bar is not None:
            bar.close()
    if cfg.preview:
        if preview_items:
            write_preview(preview_items, out / "preview.png")
            summary["preview"] = "preview.png"
        else:
            log.warning("preview requested but the train split is empty: no preview.png")
    summary["config"] = to_dict(cfg)
    _atomic_write_bytes(done_path, (json.dumps(summary, indent=2, sort_keys=True) + "\n").encode("utf-8"))
    return summary


def read_done(out_dir: str | Path) -> Optional[dict]:
    """The DONE summary of a complete set, or None if the set is absent or incomplete."""
    p = Path(out_dir) / DONE_NAME
    if not p.is_file():
        return None
    return json.loads(p.read_text())


# ------------------------------------------------------------------------------------------------
# preview


def preview_panel(item: SynthImage, scale: int = 2, max_lines: int = 4):
    """One preview cell: the image (upscaled) beside its mask overlays, expressions written below."""
    from samtok.core.render import caption_below, overlay_masks

    up = lambda a: np.repeat(np.repeat(a, scale, axis=0), scale, axis=1)  # noqa: E731
    masks = [up(m) for m in item.scene.masks]
    local = {o.ann_id: str(k) for k, o in enumerate(item.scene.facts.objects)}  # short labels: paint order
    raw = up(item.pixels)
    over = np.asarray(overlay_masks(raw, masks, labels=list(local.values()), alpha=0.45))
    gap = np.full((raw.shape[0], 4, 3), 255, dtype=np.uint8)
    panel = Image.fromarray(np.concatenate([raw, gap, over], axis=1))  # the scene | its masks
    lines = []
    for s in item.samples:
        if s.task in ("res", "gres"):
            ids = ",".join(local[a] for a in s.target_ids) if s.target_ids else "none"
            lines.append(f"[{ids}] {s.expression}")
        if len(lines) >= max_lines:
            break
    return caption_below(panel, "\n".join(lines), width_chars=max(20, panel.width // 6))


def write_preview(items: Sequence[SynthImage], path: str | Path, cols: int = 3) -> Path:
    from samtok.core.render import make_grid

    grid = make_grid([preview_panel(it) for it in items], cols=cols)
    buf = io.BytesIO()
    grid.save(buf, format="PNG")
    p = Path(path)
    _atomic_write_bytes(p, buf.getvalue())
    return p
