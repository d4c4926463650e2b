"""PSG (Panoptic Scene Graph, Jingkang50/OpenPSG) ``psg.json``: relations between segments.

Layout::

    <root>/psg/psg.json
    <root>/coco/train2017/*.jpg, val2017/*.jpg                    images (``file_name``)
    <root>/coco/panoptic_train2017/*.png, panoptic_val2017/*.png  panoptic masks (``pan_seg_file_name``)

    psg.json = {"thing_classes": [...80], "stuff_classes": [...53], "predicate_classes": [...56],
                "test_image_ids": [...],
                "data": [{"file_name", "height", "width", "image_id", "pan_seg_file_name",
                          "segments_info": [{"id", "category_id", "iscrowd", "isthing", "area"}],
                          "annotations": [{"bbox" (x0, y0, x1, y1), "bbox_mode", "category_id"}],
                          "relations": [[subject_index, object_index, predicate_index], ...]}]}

``category_id`` indexes ``thing_classes + stuff_classes`` (0-based), predicate indexes
``predicate_classes`` (0-based), subject/object index ``segments_info``. A segment's pixels are
those of the panoptic PNG whose RGB id ``R + 256*G + 256**2*B`` equals its ``id``. Split: images
whose ``image_id`` is in ``test_image_ids`` are the test (= val) split, the others train; images
without relations are skipped for samples (as OpenPSG does). Variant (our synthetic set): each
segment carries ``"segmentation"`` (an RLE) and ``pan_seg_file_name`` may be absent.

Mapping: one :class:`SceneGraphSample` per image, ``ann_id`` = ``str(segment id)``, ``labels``
= the class names of the segments that take part in a relation. ``annotations`` (boxes) are
ignored (boxes are recomputed from masks). samtok extension: ``"sample_id"`` per image.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import numpy as np
from PIL import Image

from samtok.core.images import ImageReadError
from samtok.core.masks import encode_rle
from samtok.data.records import ImageRecord, MaskAnn, RecordError, Relation, SceneGraphSample

from .coco import json_segmentation, mask_ann_box_and_area, relative_file_name
from .json_fields import (
    check_segmentation,
    describe,
    expect_type,
    file_id,
    id_text,
    load_json,
    optional,
    require,
    require_id,
    require_size,
    write_json,
)


def panoptic_ids(png_path: Path, height: int, width: int, where: str) -> np.ndarray:
    """``(H, W)`` uint32 segment ids of a COCO-panoptic PNG (``R + 256*G + 256**2*B``)."""
    if not png_path.is_file():
        raise RecordError(f"{where}: panoptic PNG not found: {png_path}")
    try:
        with Image.open(png_path) as img:
            rgb = np.asarray(img.convert("RGB"), dtype=np.uint32)
    except (OSError, ValueError, ImageReadError) as exc:
        raise RecordError(f"{where}: cannot read panoptic PNG {png_path}: {exc}") from exc
    if rgb.shape[:2] != (height, width):
        raise RecordError(f"{where}: panoptic PNG {png_path} is {rgb.shape[1]}x{rgb.shape[0]}, the image is {width}x{height}")
    return rgb[..., 0] + 256 * rgb[..., 1] + 256 * 256 * rgb[..., 2]


def panoptic_rgb(ids: np.ndarray) -> np.ndarray:
    """The inverse of :func:`panoptic_ids`: ``(H, W, 3)`` uint8."""
    ids = ids.astype(np.uint32)
    return np.stack([ids % 256, (ids // 256) % 256, (ids // 65536) % 256], axis=-1).astype(np.uint8)


class PsgFile:
    """A loaded, checked ``psg.json``."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        doc = load_json(self.path, "PSG file")
        where = str(self.path)
        self.data = require(doc, "data", list, where)
        thing = [expect_type(c, str, f"{where}: thing_classes") for c in require(doc, "thing_classes", list, where)]
        stuff = [expect_type(c, str, f"{where}: stuff_classes") for c in optional(doc, "stuff_classes", list, where, default=[])]
        self.classes = thing + stuff
        self.predicates = [expect_type(c, str, f"{where}: predicate_classes")
                           for c in require(doc, "predicate_classes", list, where)]
        self.test_image_ids = {id_text(i) for i in optional(doc, "test_image_ids", list, where, default=[])}

    def in_split(self, image_id: str, split: Optional[str]) -> bool:
        if split is None:
            return True
        if split == "train":
            return image_id not in self.test_image_ids
        if split in ("test", "val"):
            return image_id in self.test_image_ids
        raise RecordError(f"{self.path}: unknown split {split!r} (PSG has 'train' and 'test'/'val')")

    def parse_item(
        self, k: int, source: str, image_root: str, seg_root: Path, with_masks: bool
    ) -> tuple[Optional[ImageRecord], Optional[SceneGraphSample]]:
        """Item ``k`` -> (image with segment masks if ``with_masks``, sample or ``None`` without relations)."""
        item = self.data[k]
        where = describe(self.path, f"data[{k}]")
        image_id = require_id(item, "image_id", where)
        where = describe(self.path, f"data[{k}] (image_id {image_id})")
        height, width = require_size(item, where)
        file_name = require(item, "file_name", str, where)
        segments = require(item, "segments_info", list, where)
        seg_ids: list[str] = []
        categories: list[str] = []
        for s, seg in enumerate(segments):
            s_where = f"{where}: segments_info[{s}]"
            seg_id = require_id(seg, "id", s_where)
            if seg_id in seg_ids:
                raise RecordError(f"{s_where}: duplicate segment id {seg_id}")
            cat = require(seg, "category_id", int, s_where)
            if not 0 <= cat < len(self.classes):
                raise RecordError(f"{s_where}: category_id {cat} outside thing_classes + stuff_classes ({len(self.classes)})")
            seg_ids.append(seg_id)
            categories.append(self.classes[cat])
        relations = []
        for r, rel in enumerate(require(item, "relations", list, where)):
            r_where = f"{where}: relations[{r}]"
            if not (isinstance(rel, list) and len(rel) == 3 and all(isinstance(v, int) and not isinstance(v, bool) for v in rel)):
                raise RecordError(f"{r_where}: expected [subject_index, object_index, predicate_index], got {rel!r}")
            s_idx, o_idx, p_idx = rel
            if not (0 <= s_idx < len(seg_ids) and 0 <= o_idx < len(seg_ids)):
                raise RecordError(f"{r_where}: segment index out of range (image has {len(seg_ids)} segments): {rel!r}")
            if not 0 <= p_idx < len(self.predicates):
                raise RecordError(f"{r_where}: predicate index {p_idx} outside predicate_classes ({len(self.predicates)})")
            relations.append(Relation(subject_id=seg_ids[s_idx], predicate=self.predicates[p_idx], object_id=seg_ids[o_idx]))
        sample = None
        if relations:
            labels = {a: categories[seg_ids.index(a)] for rel in relations for a in (rel.subject_id, rel.object_id)}
            sample_id = id_text(optional(item, "sample_id", (int, str), where, default=image_id))
            sample = SceneGraphSample(source=source, image_id=image_id, sample_id=sample_id, relations=relations, labels=labels)
        image = None
        if with_masks:
            anns = self._segment_anns(item, segments, seg_ids, categories, height, width, seg_root, where)
            image = ImageRecord(source=source, image_id=image_id, file_name=file_name, height=height, width=width,
                                image_root=image_root, anns=anns)
        return image, sample

    def _segment_anns(self, item: dict, segments: list, seg_ids: list[str], categories: list[str],
                      height: int, width: int, seg_root: Path, where: str) -> list[MaskAnn]:
        inline = [isinstance(seg, dict) and "segmentation" in seg for seg in segments]
        ids_map = None
        if not all(inline):
            pan = require(item, "pan_seg_file_name", str, where)
            ids_map = panoptic_ids(seg_root / pan, height, width, where)
        anns = []
        for s, seg in enumerate(segments):
            s_where = f"{where}: segments_info[{s}] (id {seg_ids[s]})"
            if inline[s]:
                rle = seg["segmentation"]
                check_segmentation(rle, height, width, f"{s_where}: field 'segmentation'")
            else:
                mask = ids_map == int(seg_ids[s])
                if not mask.any():
                    raise RecordError(f"{s_where}: segment id {seg_ids[s]} has no pixel in the panoptic PNG")
                rle = encode_rle(mask)
            area = optional(seg, "area", (int, float), s_where)
            attributes = {"iscrowd": 1} if optional(seg, "iscrowd", (int, bool), s_where, default=0) else {}
            anns.append(MaskAnn(ann_id=seg_ids[s], segmentation=rle, category=categories[s],
                                area=float(area) if area is not None else None, attributes=attributes))
        return anns


def read_psg(
    path: str | Path,
    split: Optional[str] = None,
    source: str = "psg",
    image_root: str | Path | None = None,
    seg_root: str | Path | None = None,
    with_masks: bool = True,
) -> Iterator[tuple[Optional[ImageRecord], Optional[SceneGraphSample]]]:
    """Stream ``(image, sample)`` per PSG image of ``split`` (``None``: all).

    ``image_root`` / ``seg_root`` (default: the JSON's folder) are where ``file_name`` and
    ``pan_seg_file_name`` are relative to. With ``with_masks=False`` no PNG is opened and the
    image is ``None``.
    """
    psg = PsgFile(path)
    root = str(image_root) if image_root is not None else str(psg.path.parent)
    segs = Path(seg_root) if seg_root is not None else psg.path.parent
    for k, item in enumerate(psg.data):
        image_id = require_id(item, "image_id", describe(psg.path, f"data[{k}]"))
        if psg.in_split(image_id, split):
            yield psg.parse_item(k, source, root, segs, with_masks)


# --------------------------------------------------------------------------------------------
# writing


def _class_table(categories: Sequence[str], samples: Sequence[SceneGraphSample], images: Sequence[ImageRecord]) -> list[str]:
    names = list(dict.fromkeys(categories))
    for s in samples:
        names += [v for v in s.labels.values() if v not in names]
    for r in images:
        names += [a.category for a in r.anns if a.category and a.category not in names]
    return list(dict.fromkeys(names))


def write_panoptic_png(path: str | Path, record: ImageRecord) -> Path:
    """Write ``record``'s masks as a COCO-panoptic PNG (segment id = integer ann id); masks must not overlap."""
    ids = np.zeros((record.height, record.width), dtype=np.uint32)
    for ann in record.anns:
        if not ann.ann_id.isdigit() or not 0 < int(ann.ann_id) < 256**3:
            raise RecordError(f"{record.image_id}/{ann.ann_id}: a panoptic segment id must be an integer in [1, 2^24)")
        mask = record.mask(ann.ann_id)
        if (ids[mask] != 0).any():
            raise RecordError(f"{record.image_id}/{ann.ann_id}: overlaps another mask; a panoptic PNG cannot hold overlaps")
        ids[mask] = int(ann.ann_id)
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(panoptic_rgb(ids), mode="RGB").save(p, format="PNG")
    return p


def psg_item(
    sample: SceneGraphSample,
    record: ImageRecord,
    class_ids: dict[str, int],
    predicate_ids: dict[str, int],
    file_name: str,
    pan_seg_file_name: Optional[str],
) -> dict:
    """One ``data`` item: every mask of the image is a segment; relations index them."""
    order = [a.ann_id for a in record.anns]
    segments, boxes = [], []
    for ann in record.anns:
        where = f"{record.source}/{record.image_id}/{ann.ann_id}"
        name = sample.labels.get(ann.ann_id) or ann.category
        if name not in class_ids:
            raise RecordError(f"{where}: the mask has no category or label; PSG segments need a class")
        category = class_ids[name]
        bbox, area = mask_ann_box_and_area(ann, record.height, record.width, where)
        segment: dict[str, Any] = {"id": file_id(ann.ann_id), "category_id": category,
                                   "iscrowd": 1 if ann.attributes.get("iscrowd") else 0, "isthing": 1, "area": area}
        if pan_seg_file_name is None:
            segment["segmentation"] = json_segmentation(ann.segmentation) if isinstance(ann.segmentation, dict) and isinstance(
                ann.segmentation.get("counts"), (str, bytes)) else encode_rle(record.mask(ann.ann_id))
        segments.append(segment)
        x, y, w, h = bbox
        boxes.append({"bbox": [x, y, x + w, y + h], "bbox_mode": 0, "category_id": category})
    relations = []
    for rel in sample.relations:
        for a in (rel.subject_id, rel.object_id):
            if a not in order:
                raise RecordError(f"sample {sample.sample_id}: relation names mask {a!r}, not a mask of image {record.image_id}")
        relations.append([order.index(rel.subject_id), order.index(rel.object_id), predicate_ids[rel.predicate]])
    item: dict[str, Any] = {"file_name": file_name, "height": int(record.height), "width": int(record.width),
                            "image_id": file_id(record.image_id)}
    if pan_seg_file_name is not None:
        item["pan_seg_file_name"] = pan_seg_file_name
    item.update({"segments_info": segments, "annotations": boxes, "relations": relations})
    if sample.sample_id != record.image_id:
        item["sample_id"] = sample.sample_id
    return item


def write_psg(
    path: str | Path,
    samples: Sequence[SceneGraphSample],
    images: Sequence[ImageRecord],
    categories: Sequence[str] = (),
    relative_to: str | Path | None = None,
    test_image_ids: Sequence[str] = (),
    panoptic_dir: str | Path | None = None,
) -> Path:
    """Write a ``psg.json``; segments carry RLE inline unless ``panoptic_dir`` is given.

    With ``panoptic_dir`` one COCO-panoptic PNG per image is written there (named after the
    image) and referenced by ``pan_seg_file_name`` relative to the JSON's folder.
    """
    out = Path(path)
    images_by_id = {r.image_id: r for r in images}
    classes = _class_table(categories, samples, images)
    class_ids = {n: k for k, n in enumerate(classes)}
    predicates = list(dict.fromkeys(rel.predicate for s in samples for rel in s.relations))
    predicate_ids = {p: k for k, p in enumerate(predicates)}
    data = []
    for s in samples:
        record = images_by_id.get(s.image_id)
        if record is None:
            raise RecordError(f"sample {s.sample_id}: image {s.image_id!r} is not among the images given")
        pan_name = None
        if panoptic_dir is not None:
            png = write_panoptic_png(Path(panoptic_dir) / f"{Path(record.file_name).stem}.png", record)
            pan_name = str(Path(png).resolve().relative_to(out.parent.resolve()))
        data.append(psg_item(s, record, class_ids, predicate_ids, relative_file_name(record, relative_to), pan_name))
    doc = {"data": data, "thing_classes": classes, "stuff_classes": [], "predicate_classes": predicates,
           "test_image_ids": [file_id(i) for i in test_image_ids]}
    return write_json(out, doc)
