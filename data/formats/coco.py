"""COCO instances JSON (``instances_*.json``): reader, writer and an in-memory index.

Layout (https://cocodataset.org/#format-data)::

    {"images":      [{"id", "file_name", "height", "width", ...}],
     "annotations": [{"id", "image_id", "category_id", "segmentation", "area", "bbox", "iscrowd"}],
     "categories":  [{"id", "name", "supercategory"}]}

``segmentation`` is a list of polygons, a compressed RLE (``counts`` a string) or an uncompressed
RLE (``counts`` a list, used by COCO for ``iscrowd`` regions). Extension read and written by
samtok: an optional per-annotation ``"attributes"`` object (the synthetic set's colour, shape,
size), which COCO tools ignore.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Optional, Sequence

from samtok.core.masks import box_xyxy_to_xywh, mask_to_box
from samtok.data.records import ImageRecord, InstanceSegSample, MaskAnn, RecordError

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


@dataclass
class CocoIndex:
    """A validated COCO instances document, indexed by image.

    ``images`` keeps the file order; ``anns_by_image`` maps our string image id to the raw
    annotation dicts (file order) with their positions in ``annotations`` (for error messages).
    """

    path: Path
    images: list[dict]
    anns_by_image: dict[str, list[tuple[int, dict]]]
    category_names: dict[str, str]  # str(category id) -> name
    image_ids: dict[str, dict] = field(default_factory=dict)  # our image id -> raw image dict
    image_of_ann: dict[str, str] = field(default_factory=dict)  # our ann id -> our image id
    _by_file_name: dict[str, str] = field(default_factory=dict, repr=False)
    _by_base_name: dict[str, str] = field(default_factory=dict, repr=False)

    @classmethod
    def load(cls, path: str | Path) -> "CocoIndex":
        p = Path(path)
        doc = load_json(p, "COCO instances file")
        if not isinstance(doc, dict):
            raise RecordError(f"{p}: expected a COCO object with 'images' and 'annotations', got {type(doc).__name__}")
        images = require(doc, "images", list, str(p))
        annotations = require(doc, "annotations", list, str(p))
        categories = optional(doc, "categories", list, str(p), default=[])
        category_names: dict[str, str] = {}
        for k, cat in enumerate(categories):
            where = describe(p, f"categories[{k}]")
            category_names[require_id(cat, "id", where)] = require(cat, "name", str, where)
        image_ids: dict[str, dict] = {}
        for k, img in enumerate(images):
            where = describe(p, f"images[{k}]")
            image_id = require_id(img, "id", where)
            if image_id in image_ids:
                raise RecordError(f"{where}: duplicate image id {image_id!r}")
            require(img, "file_name", str, where)
            require_size(img, where)
            image_ids[image_id] = img
        anns_by_image: dict[str, list[tuple[int, dict]]] = {i: [] for i in image_ids}
        image_of_ann: dict[str, str] = {}
        for k, ann in enumerate(annotations):
            where = describe(p, f"annotations[{k}]")
            ann_id = require_id(ann, "id", where)
            image_id = require_id(ann, "image_id", describe(p, f"annotations[{k}] (id {ann_id})"))
            if ann_id in image_of_ann:
                raise RecordError(f"{where}: duplicate annotation id {ann_id!r}")
            if image_id not in anns_by_image:
                raise RecordError(f"{where} (id {ann_id}): image_id {image_id!r} is not in 'images'")
            image_of_ann[ann_id] = image_id
            anns_by_image[image_id].append((k, ann))
        return cls(p, images, anns_by_image, category_names, image_ids, image_of_ann)

    def find_image_id(self, file_name: str) -> Optional[str]:
        """The image id whose ``file_name`` equals ``file_name`` (or, failing that, its base name)."""
        if not self._by_file_name:
            for img in self.images:
                self._by_file_name[img["file_name"]] = id_text(img["id"])
                self._by_base_name.setdefault(Path(img["file_name"]).name, id_text(img["id"]))
        return self._by_file_name.get(file_name) or self._by_base_name.get(Path(file_name).name)

    def image_record(
        self,
        image_id: str,
        source: str,
        image_root: str = "",
        include_crowd: bool = True,
        skip_empty_masks: bool = False,
        check_masks: bool = True,
    ) -> ImageRecord:
        """Build the :class:`ImageRecord` of one image, validating its annotations."""
        img = self.image_ids[image_id]
        height, width = int(img["height"]), int(img["width"])
        anns = []
        for k, raw in self.anns_by_image[image_id]:
            ann = annotation_to_mask_ann(
                raw, height, width, self.category_names, describe(self.path, f"annotations[{k}] (id {raw['id']})"),
                check_mask=check_masks, allow_empty=skip_empty_masks,
            )
            if ann is None:
                continue
            if ann.attributes.get("iscrowd") and not include_crowd:
                continue
            anns.append(ann)
        return ImageRecord(
            source=source, image_id=image_id, file_name=img["file_name"], height=height, width=width,
            image_root=image_root, anns=anns,
        )


def annotation_to_mask_ann(
    raw: Mapping,
    height: int,
    width: int,
    category_names: Mapping[str, str],
    where: str,
    check_mask: bool = True,
    allow_empty: bool = False,
) -> Optional[MaskAnn]:
    """One COCO annotation dict -> :class:`MaskAnn` (``None`` for an allowed empty mask).

    ``iscrowd: 1`` is kept as ``attributes["iscrowd"] = 1``; the ``attributes`` extension object
    is copied into ``attributes``.
    """
    ann_id = require_id(raw, "id", where)
    if "segmentation" not in raw:
        raise RecordError(f"{where}: missing field 'segmentation'")
    seg = raw["segmentation"]
    if check_mask and not check_segmentation(seg, height, width, f"{where}: field 'segmentation'", allow_empty):
        return None
    category = ""
    if raw.get("category_id") is not None:
        cat_id = id_text(expect_type(raw["category_id"], (int, str), f"{where}: field 'category_id'"))
        if category_names:
            if cat_id not in category_names:
                raise RecordError(f"{where}: category_id {cat_id} is not in 'categories'")
            category = category_names[cat_id]
    bbox = optional(raw, "bbox", list, where)
    if bbox is not None:
        if len(bbox) != 4 or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in bbox):
            raise RecordError(f"{where}: field 'bbox' must be [x, y, width, height], got {bbox!r}")
        bbox = [float(v) for v in bbox]
    area = optional(raw, "area", (int, float), where)
    attributes = dict(optional(raw, "attributes", dict, where, default={}))
    if optional(raw, "iscrowd", (int, bool), where, default=0):
        attributes["iscrowd"] = 1
    return MaskAnn(
        ann_id=ann_id, segmentation=seg, category=category, bbox=bbox,
        area=float(area) if area is not None else None, attributes=attributes,
    )


# --------------------------------------------------------------------------------------------
# reading


def read_coco_instances(
    path: str | Path,
    source: str,
    image_root: str | Path | None = None,
    include_crowd: bool = True,
    skip_empty_masks: bool = False,
    skip_images_without_masks: bool = False,
    check_masks: bool = True,
) -> Iterator[ImageRecord]:
    """Stream the images of a COCO instances file as :class:`ImageRecord` (file order).

    ``image_root`` (default: the JSON file's folder) is where ``file_name`` is relative to.
    Masks are validated structurally (RLE run lengths, size = image size, non-empty) unless
    ``check_masks`` is false; an empty mask is an error unless ``skip_empty_masks``.
    """
    index = CocoIndex.load(path)
    root = str(image_root) if image_root is not None else str(Path(path).parent)
    yield from iter_image_records(index, source, root, include_crowd=include_crowd, skip_empty_masks=skip_empty_masks,
                                  skip_images_without_masks=skip_images_without_masks, check_masks=check_masks)


def iter_image_records(
    index: CocoIndex,
    source: str,
    image_root: str,
    image_ids: Optional[Iterable[str]] = None,
    include_crowd: bool = True,
    skip_empty_masks: bool = False,
    skip_images_without_masks: bool = False,
    check_masks: bool = True,
) -> Iterator[ImageRecord]:
    """Stream the :class:`ImageRecord` of an index (file order), optionally only ``image_ids``."""
    wanted = set(image_ids) if image_ids is not None else None
    for img in index.images:
        image_id = id_text(img["id"])
        if wanted is not None and image_id not in wanted:
            continue
        record = index.image_record(image_id, source, image_root, include_crowd=include_crowd,
                                    skip_empty_masks=skip_empty_masks, check_masks=check_masks)
        if skip_images_without_masks and not record.anns:
            continue
        yield record


def present_categories(record: ImageRecord) -> dict[str, list[str]]:
    """``category -> [ann ids]`` of the named, non-crowd masks of an image (mask order)."""
    present: dict[str, list[str]] = {}
    for ann in record.anns:
        if ann.category and not ann.attributes.get("iscrowd"):
            present.setdefault(ann.category, []).append(ann.ann_id)
    return present


def instance_seg_samples(index: CocoIndex, record: ImageRecord, derive: bool = True) -> list[InstanceSegSample]:
    """The open-vocabulary instance-segmentation samples of one image.

    * ``"ov_seg"`` (samtok extension on the image: ``[{"sample_id", "category_ids"}]``): one
      sample each, asking for those categories in that order;
    * else, with ``derive``: LVIS ``"neg_category_ids"`` (verified absent) are asked besides the
      present categories; plain COCO asks for the present categories only (none: no sample).

    Targets are every named, non-crowd mask of each asked category present in the image.
    """
    img = index.image_ids[record.image_id]
    where = describe(index.path, f"image {record.image_id}")
    present = present_categories(record)

    def names(ids: Any, field_name: str) -> list[str]:
        out = []
        for cid in expect_type(ids, list, f"{where}: field '{field_name}'"):
            key = id_text(expect_type(cid, (int, str), f"{where}: field '{field_name}'"))
            if key not in index.category_names:
                raise RecordError(f"{where}: field '{field_name}': category id {key} is not in 'categories'")
            out.append(index.category_names[key])
        return out

    if img.get("ov_seg") is not None:
        samples = []
        for k, entry in enumerate(expect_type(img["ov_seg"], list, f"{where}: field 'ov_seg'")):
            e_where = f"{where}: ov_seg[{k}]"
            asked = names(require(entry, "category_ids", list, e_where), f"ov_seg[{k}].category_ids")
            samples.append(InstanceSegSample(
                source=record.source, image_id=record.image_id, sample_id=require_id(entry, "sample_id", e_where),
                categories=asked, targets={c: list(present[c]) for c in asked if c in present}))
        return samples
    if not derive:
        return []
    absent = [c for c in names(img.get("neg_category_ids", []), "neg_category_ids") if c not in present]
    if not present and not absent:
        return []
    return [InstanceSegSample(source=record.source, image_id=record.image_id, sample_id=record.image_id,
                              categories=sorted(present) + absent, targets=present)]


# --------------------------------------------------------------------------------------------
# writing


def json_segmentation(seg: Any) -> Any:
    """A segmentation ready for JSON: RLE ``counts`` bytes become ASCII text."""
    if isinstance(seg, dict) and isinstance(seg.get("counts"), bytes):
        return {"size": [int(v) for v in seg["size"]], "counts": seg["counts"].decode("ascii")}
    if isinstance(seg, dict):
        return {"size": [int(v) for v in seg["size"]], "counts": seg["counts"]}
    return seg


def relative_file_name(record: ImageRecord, relative_to: str | Path | None) -> str:
    """``record``'s image path written relative to ``relative_to`` (or as stored when ``None``)."""
    if relative_to is None:
        return record.file_name
    path = record.path
    if not path.is_absolute() and not record.image_root:
        return record.file_name  # already relative to the output folder by convention
    return os.path.relpath(Path(path).resolve(), Path(relative_to).resolve())


def mask_ann_box_and_area(ann: MaskAnn, height: int, width: int, where: str) -> tuple[list[float], float]:
    """COCO ``bbox`` (xywh) and ``area`` of a mask: the stored values, else computed from pixels."""
    if ann.bbox is not None and ann.area is not None:
        return [float(v) for v in ann.bbox], float(ann.area)
    mask = ann.to_mask(height, width, where=where)
    area = float(ann.area) if ann.area is not None else float(mask.sum())
    if ann.bbox is not None:
        return [float(v) for v in ann.bbox], area
    bbox = box_xyxy_to_xywh(mask_to_box(mask, where=where)) if mask.any() else [0.0, 0.0, 0.0, 0.0]
    return bbox, area


def category_table(categories: Sequence[str], images: Iterable[ImageRecord]) -> list[str]:
    """Category names in id order (id = position + 1): the given ones, then any others met."""
    names = list(dict.fromkeys(categories))
    seen = set(names)
    for record in images:
        for ann in record.anns:
            if ann.category and ann.category not in seen:
                seen.add(ann.category)
                names.append(ann.category)
    return names


def coco_annotation(ann: MaskAnn, record: ImageRecord, category_ids: Mapping[str, int]) -> dict:
    """One :class:`MaskAnn` as a COCO annotation dict (with the ``attributes`` extension)."""
    where = f"{record.source}/{record.image_id}/{ann.ann_id}"
    bbox, area = mask_ann_box_and_area(ann, record.height, record.width, where)
    attributes = {k: v for k, v in ann.attributes.items() if k != "iscrowd"}
    out = {
        "id": file_id(ann.ann_id),
        "image_id": file_id(record.image_id),
        "category_id": category_ids.get(ann.category, 0),
        "segmentation": json_segmentation(ann.segmentation),
        "area": area,
        "bbox": bbox,
        "iscrowd": 1 if ann.attributes.get("iscrowd") else 0,
    }
    if attributes:
        out["attributes"] = attributes
    return out


def check_unique_ids(images: Sequence[ImageRecord]) -> None:
    """COCO ids are global: image ids, and annotation ids across all images, must be unique."""
    image_ids: set[str] = set()
    owner: dict[str, str] = {}
    for record in images:
        if record.image_id in image_ids:
            raise RecordError(f"image id {record.image_id!r} appears twice; COCO image ids must be unique")
        image_ids.add(record.image_id)
        for ann in record.anns:
            if ann.ann_id in owner:
                raise RecordError(
                    f"annotation id {ann.ann_id!r} is used by image {owner[ann.ann_id]!r} and image {record.image_id!r}; "
                    f"COCO-style files (COCO, refer, gRefCOCO, SegLLM registers) need ids unique across images"
                )
            owner[ann.ann_id] = record.image_id


def ov_seg_image_fields(
    record: ImageRecord, samples: Sequence[InstanceSegSample], category_ids: Mapping[str, int]
) -> dict:
    """LVIS ``neg_category_ids`` + the samtok ``ov_seg`` list for the samples of one image.

    A sample must ask for whole categories: its targets are every named, non-crowd mask of each
    asked category present in the image (what the reader rebuilds), else :class:`RecordError`.
    """
    present = present_categories(record)
    negatives: list[int] = []
    entries = []
    for s in samples:
        expected = {c: present[c] for c in s.categories if c in present}
        if {c: list(v) for c, v in s.targets.items() if v} != expected or set(s.targets) - set(s.categories):
            raise RecordError(
                f"InstanceSegSample {s.sample_id}: targets {s.targets} are not all the masks of the asked categories "
                f"present in image {record.image_id} ({expected}); the COCO/LVIS layout cannot hold that"
            )
        negatives += [category_ids[c] for c in s.categories if c not in present and category_ids[c] not in negatives]
        entries.append({"sample_id": file_id(s.sample_id), "category_ids": [category_ids[c] for c in s.categories]})
    return {"neg_category_ids": negatives, "ov_seg": entries} if entries else {}


def coco_instances_document(
    images: Sequence[ImageRecord],
    categories: Sequence[str] = (),
    relative_to: str | Path | None = None,
    ov_samples: Sequence[InstanceSegSample] = (),
) -> dict:
    """The COCO instances document of ``images`` (category ids are 1-based positions).

    ``ov_samples`` (open-vocabulary instance samples) are stored on their images as LVIS
    ``neg_category_ids`` plus the samtok ``ov_seg`` extension (see :func:`instance_seg_samples`).
    """
    check_unique_ids(images)
    asked = [c for s in ov_samples for c in s.categories]
    names = category_table([*categories, *asked], images)
    category_ids = {name: k + 1 for k, name in enumerate(names)}
    by_image: dict[str, list[InstanceSegSample]] = {}
    for s in ov_samples:
        by_image.setdefault(s.image_id, []).append(s)
    unknown = sorted(set(by_image) - {r.image_id for r in images})
    if unknown:
        raise RecordError(f"InstanceSegSamples name images {unknown} that are not among the images given")
    doc_images, doc_anns = [], []
    for record in images:
        doc_images.append(
            {
                "id": file_id(record.image_id),
                "file_name": relative_file_name(record, relative_to),
                "height": int(record.height),
                "width": int(record.width),
                **ov_seg_image_fields(record, by_image.get(record.image_id, []), category_ids),
            }
        )
        doc_anns.extend(coco_annotation(ann, record, category_ids) for ann in record.anns)
    return {
        "info": {"description": "written by samtok.data.formats"},
        "images": doc_images,
        "annotations": doc_anns,
        "categories": [{"id": category_ids[n], "name": n, "supercategory": ""} for n in names],
    }


def write_coco_instances(
    path: str | Path,
    images: Sequence[ImageRecord],
    categories: Sequence[str] = (),
    relative_to: str | Path | None = None,
    ov_samples: Sequence[InstanceSegSample] = (),
) -> Path:
    """Write ``images`` (and open-vocabulary samples) as a COCO instances file.

    ``file_name`` is written relative to ``relative_to`` if given.
    """
    return write_json(path, coco_instances_document(images, categories, relative_to, ov_samples))
