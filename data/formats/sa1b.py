"""SA-1B (Segment Anything 1B): one JSON per image, next to the image.

Layout of each extracted tar (``sa_000000/``)::

    sa_1.jpg  sa_1.json  sa_2.jpg  sa_2.json ...

    sa_1.json = {"image": {"image_id", "width", "height", "file_name"},
                 "annotations": [{"id", "segmentation": {"size": [H, W], "counts": str},
                                  "bbox", "area", "predicted_iou", "stability_score",
                                  "point_coords", "crop_box"}]}

We use ``image.*``, ``annotations[].id/segmentation/bbox/area``; the model-quality fields
(``predicted_iou``, ``stability_score``, ``point_coords``, ``crop_box``) are ignored.
Directories are streamed one file at a time (sorted by name).
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Iterator, Sequence

from samtok.data.records import ImageRecord, RecordError

from .coco import annotation_to_mask_ann, coco_annotation, relative_file_name
from .json_fields import describe, file_id, load_json, require, require_id, require_size, write_json


def sa1b_json_files(path: str | Path | Sequence[str | Path]) -> list[Path]:
    """The per-image JSON files of a folder (sorted), a single file, or a list of either."""
    if isinstance(path, (list, tuple)):
        return [f for p in path for f in sa1b_json_files(p)]
    p = Path(path)
    if p.is_dir():
        return sorted(p.glob("*.json"))
    if p.is_file():
        return [p]
    raise RecordError(f"SA-1B annotations not found: {p} (expected a folder of per-image .json files or a .json file)")


def read_sa1b_image(json_path: str | Path, source: str, image_root: str | Path | None = None,
                    skip_empty_masks: bool = False, check_masks: bool = True) -> ImageRecord:
    """Read one SA-1B per-image JSON as an :class:`ImageRecord` (image relative to its folder)."""
    p = Path(json_path)
    doc = load_json(p, "SA-1B annotation file")
    image = require(doc, "image", dict, str(p))
    where = describe(p, "image")
    image_id = require_id(image, "image_id", where)
    height, width = require_size(image, where)
    file_name = require(image, "file_name", str, where)
    annotations = require(doc, "annotations", list, str(p))
    anns = []
    for k, raw in enumerate(annotations):
        ann_where = describe(p, f"annotations[{k}]" + (f" (id {raw['id']})" if isinstance(raw, dict) and "id" in raw else ""))
        ann = annotation_to_mask_ann(raw, height, width, {}, ann_where, check_mask=check_masks, allow_empty=skip_empty_masks)
        if ann is not None:
            anns.append(ann)
    root = str(image_root) if image_root is not None else str(p.parent)
    return ImageRecord(source=source, image_id=image_id, file_name=file_name, height=height, width=width,
                       image_root=root, anns=anns)


def read_sa1b(path: str | Path | Sequence[str | Path], source: str = "sa1b", image_root: str | Path | None = None,
              skip_empty_masks: bool = False, check_masks: bool = True) -> Iterator[ImageRecord]:
    """Stream SA-1B images, one per-image JSON file at a time."""
    for json_path in sa1b_json_files(path):
        yield read_sa1b_image(json_path, source, image_root, skip_empty_masks, check_masks)


def sa1b_document(record: ImageRecord, relative_to: str | Path | None = None) -> dict:
    """The SA-1B per-image JSON object of ``record`` (quality fields absent: we have none)."""
    doc_anns = []
    for ann in record.anns:
        coco_ann = coco_annotation(ann, record, {})
        doc_anns.append({k: coco_ann[k] for k in ("id", "segmentation", "bbox", "area")})
    return {
        "image": {
            "image_id": file_id(record.image_id),
            "width": int(record.width),
            "height": int(record.height),
            "file_name": relative_file_name(record, relative_to),
        },
        "annotations": doc_anns,
    }


def write_sa1b(out_dir: str | Path, images: Iterable[ImageRecord]) -> list[Path]:
    """Write one ``<image stem>.json`` per image into ``out_dir``; returns the files written.

    ``file_name`` is written relative to ``out_dir`` (SA-1B keeps images beside their JSON).
    """
    out = Path(out_dir)
    written = []
    for record in images:
        name = Path(record.file_name).stem or str(record.image_id)
        written.append(write_json(out / f"{name}.json", sa1b_document(record, relative_to=out)))
    return written
