"""Region captions in the Describe Anything (DAM) layout: image + mask + detailed caption.

Layout of one subset of ``nvidia/describe-anything-dataset`` (COCOStuff, LVIS, PACO, Mapillary,
OpenImages, SAM...) after download::

    <subset>/annotations.json
    <subset>/images/<shard>.tar        the images, packed (extract them, see docs/formats.md)

    annotations.json = {"<img_id>": [{"ann_id", "img_id", "image": "<file in the shard>",
                                      "tar_file": "<shard>.tar",
                                      "mask_rle": {"size": [H, W], "counts": str},
                                      "caption": "A ..."}, ...], ...}

This layout is not documented by NVIDIA; it is the one third-party loaders of the released
files use. A flat JSON list of region objects (each with its ``img_id``) is read too.
``tar_file`` is ignored (images are expected extracted under ``image_root``). The image size is
the mask's RLE size (all regions of an image must agree).

samtok extensions (optional): ``"question"`` (region VQA: the caption is then the answer) and
``"sample_id"`` (default ``"<img_id>_<ann_id>"``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator, Sequence

from samtok.data.records import ImageRecord, MaskAnn, RecordError, RegionCaptionSample

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
    rle_size,
    write_json,
)


def _regions_by_image(doc: Any, path: Path) -> Iterator[tuple[str, list[tuple[str, Any]]]]:
    """``(img_id, [(where, region), ...])`` for the dict layout or the flat-list variant."""
    if isinstance(doc, dict):
        for img_key, regions in doc.items():
            where = describe(path, f"[{img_key!r}]")
            regions = expect_type(regions, list, where)
            yield str(img_key), [(f"{where}[{k}]", r) for k, r in enumerate(regions)]
    elif isinstance(doc, list):
        grouped: dict[str, list[tuple[str, Any]]] = {}
        for k, region in enumerate(doc):
            where = describe(path, f"[{k}]")
            grouped.setdefault(require_id(region, "img_id", where), []).append((where, region))
        yield from grouped.items()
    else:
        raise RecordError(f"{path}: expected an object {{img_id: [regions]}} or a list of regions, got {type(doc).__name__}")


def parse_region_image(
    img_id: str, regions: list[tuple[str, Any]], source: str, image_root: str
) -> tuple[ImageRecord | None, list[RegionCaptionSample]]:
    """The regions of one image -> (image with their masks, one sample per region)."""
    anns: dict[str, MaskAnn] = {}
    samples: list[RegionCaptionSample] = []
    file_name, size = "", None
    seen_ids: dict[str, int] = {}
    for where, region in regions:
        ann_id = require_id(region, "ann_id", where)
        where = f"{where} (ann_id {ann_id})"
        if "img_id" in region and id_text(require(region, "img_id", (int, str), where)) != img_id:
            raise RecordError(f"{where}: img_id {region['img_id']!r} differs from the image key {img_id!r}")
        image = require(region, "image", str, where)
        rle = require(region, "mask_rle", dict, where)
        caption = require(region, "caption", str, where)
        question = optional(region, "question", str, where, default="")
        region_size = rle_size(rle, f"{where}: field 'mask_rle'")
        if size is None:
            size, file_name = region_size, image
        elif region_size != size:
            raise RecordError(f"{where}: mask size {list(region_size)} differs from the image's other masks {list(size)}")
        elif image != file_name:
            raise RecordError(f"{where}: image {image!r} differs from {file_name!r} of the same img_id")
        check_segmentation(rle, size[0], size[1], f"{where}: field 'mask_rle'")
        if ann_id in anns and anns[ann_id].segmentation != rle:
            raise RecordError(f"{where}: ann_id {ann_id} appears twice with different masks")
        anns.setdefault(ann_id, MaskAnn(ann_id=ann_id, segmentation=rle, category=optional(region, "category", str, where, default="")))
        default_id = f"{img_id}_{ann_id}"
        n = seen_ids.get(default_id, 0)
        seen_ids[default_id] = n + 1
        sample_id = id_text(optional(region, "sample_id", (int, str), where, default=default_id if n == 0 else f"{default_id}_{n}"))
        samples.append(RegionCaptionSample(source=source, image_id=img_id, sample_id=sample_id, ann_id=ann_id,
                                           caption=caption, question=question))
    if size is None:
        return None, []
    image_record = ImageRecord(source=source, image_id=img_id, file_name=file_name, height=size[0], width=size[1],
                               image_root=image_root, anns=list(anns.values()))
    return image_record, samples


def read_region_captions(
    path: str | Path, source: str = "dam", image_root: str | Path | None = None
) -> Iterator[tuple[ImageRecord, list[RegionCaptionSample]]]:
    """Stream ``(image, samples)`` per image of a DAM ``annotations.json`` (images without regions skipped)."""
    p = Path(path)
    doc = load_json(p, "region caption file")
    root = str(image_root) if image_root is not None else str(p.parent)
    for img_id, regions in _regions_by_image(doc, p):
        image, samples = parse_region_image(img_id, regions, source, root)
        if image is not None:
            yield image, samples


# --------------------------------------------------------------------------------------------
# writing


def region_caption_document(
    samples: Sequence[RegionCaptionSample], images: Sequence[ImageRecord], relative_to: str | Path | None = None
) -> dict:
    """The DAM ``annotations.json`` object of ``samples`` (masks looked up in ``images``)."""
    from .coco import relative_file_name
    from .gcg import rle_of

    images_by_id = {r.image_id: r for r in images}
    doc: dict[str, list[dict]] = {}
    for s in samples:
        image = images_by_id.get(s.image_id)
        if image is None:
            raise RecordError(f"sample {s.sample_id}: image {s.image_id!r} is not among the images given")
        region = {
            "ann_id": file_id(s.ann_id),
            "img_id": file_id(s.image_id),
            "image": relative_file_name(image, relative_to),
            "mask_rle": rle_of(image.ann(s.ann_id), image),
            "caption": s.caption,
        }
        if s.question:
            region["question"] = s.question
        regions = doc.setdefault(s.image_id, [])
        default_id = f"{s.image_id}_{s.ann_id}"
        n = sum(1 for r in regions if r["ann_id"] == region["ann_id"])
        if s.sample_id != (default_id if n == 0 else f"{default_id}_{n}"):
            region["sample_id"] = s.sample_id
        regions.append(region)
    return doc


def write_region_captions(
    path: str | Path,
    samples: Sequence[RegionCaptionSample],
    images: Sequence[ImageRecord],
    relative_to: str | Path | None = None,
) -> Path:
    """Write a DAM-layout ``annotations.json``; image paths relative to ``relative_to`` if given."""
    return write_json(path, region_caption_document(samples, images, relative_to))
