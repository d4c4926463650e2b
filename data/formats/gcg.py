"""GranDf / GLaMM grounded-caption (GCG) files.

Training layout (``GranDf/annotations/train/GranDf_HA_GCG_train.json``, as read by GLaMM's
``GCGBaseDataset``; images in ``GranDf_HA_images/train``): a JSON list of::

    {"file_name": "sa_123.jpg", "height": H, "width": W, "caption": "A man ... a dog ...",
     "groundings": {"A man": {"token_positives": [0, 5], "rle_masks": [rle, ...]}, ...}}

``token_positives`` are character offsets ``[start, end)`` into ``caption``; each phrase has one
or more compressed-RLE masks (GLaMM sums them into one mask). The file holds no mask ids, so the
reader makes synthetic ones: ``"<sample_id>:<phrase index>:<mask index>"``. ``height``/``width``
are taken from the entry when present, else from the RLE size. Entries without groundings are
skipped (GLaMM skips them too).

samtok extensions (optional; GLaMM ignores unknown keys): ``"image_id"`` and ``"sample_id"`` per
entry, ``"ann_ids"`` (one per RLE) per grounding — so that ids survive a write/read round trip.

Evaluation layout (``GranDf/annotations/val_test/{val,test}_gcg_coco_caption_gt.json`` +
``{val,test}_gcg_coco_mask_gt.json``): a COCO-captions file whose annotations carry ``caption``
and ``labels`` (phrases), and a COCO instances file of the masks, the i-th mask of an image
belonging to its i-th label (this is how GLaMM's evaluation pairs them). Phrase offsets are not
stored: each label is searched in the caption (case-insensitive, left to right).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

from samtok.core.masks import encode_rle
from samtok.data.records import GroundedCaptionSample, ImageRecord, MaskAnn, Phrase, RecordError

from .coco import CocoIndex, json_segmentation
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


def synthetic_ann_id(sample_id: str, phrase_index: int, mask_index: int) -> str:
    """The id given to a GranDf mask, which has none in the file."""
    return f"{sample_id}:{phrase_index}:{mask_index}"


def _entry_size(entry: dict, groundings: dict, where: str) -> tuple[int, int]:
    height = optional(entry, "height", int, where)
    width = optional(entry, "width", int, where)
    if height is not None and width is not None:
        return height, width
    for phrase, grounding in groundings.items():
        masks = grounding.get("rle_masks") if isinstance(grounding, dict) else None
        if isinstance(masks, list) and masks:
            return rle_size(masks[0], f"{where}: groundings[{phrase!r}]: rle_masks[0]")
    raise RecordError(f"{where}: no 'height'/'width' and no mask to take the image size from")


def parse_grandf_entry(
    entry: Any, where: str, source: str, image_root: str
) -> Optional[tuple[ImageRecord, GroundedCaptionSample]]:
    """One training-layout entry -> (image with the phrase masks, sample); ``None`` if ungrounded."""
    file_name = require(entry, "file_name", str, where)
    caption = require(entry, "caption", str, where)
    groundings = require(entry, "groundings", dict, where)
    if not groundings:
        return None
    image_id = id_text(optional(entry, "image_id", (int, str), where, default=Path(file_name).stem))
    sample_id = id_text(optional(entry, "sample_id", (int, str), where, default=image_id))
    where = f"{where} ({file_name})"
    height, width = _entry_size(entry, groundings, where)
    anns: list[MaskAnn] = []
    phrases: list[Phrase] = []
    for p, (text, grounding) in enumerate(groundings.items()):
        g_where = f"{where}: groundings[{text!r}]"
        span = require(grounding, "token_positives", list, g_where)
        if len(span) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) for v in span):
            raise RecordError(f"{g_where}: field 'token_positives' must be [start, end], got {span!r}")
        start, end = span
        if not 0 <= start < end <= len(caption):
            raise RecordError(f"{g_where}: token_positives {span} outside the caption (length {len(caption)})")
        masks = require(grounding, "rle_masks", list, g_where)
        if not masks:
            raise RecordError(f"{g_where}: field 'rle_masks' is empty (a grounded phrase needs a mask)")
        ann_ids = optional(grounding, "ann_ids", list, g_where)
        if ann_ids is not None and len(ann_ids) != len(masks):
            raise RecordError(f"{g_where}: 'ann_ids' has {len(ann_ids)} ids for {len(masks)} masks")
        ids = []
        for m, rle in enumerate(masks):
            m_where = f"{g_where}: rle_masks[{m}]"
            if not isinstance(rle, dict):
                raise RecordError(f"{m_where}: expected an RLE object, got {type(rle).__name__}")
            check_segmentation(rle, height, width, m_where)
            ann_id = id_text(expect_type(ann_ids[m], (int, str), f"{g_where}: ann_ids[{m}]")) if ann_ids else (
                synthetic_ann_id(sample_id, p, m))
            ids.append(ann_id)
            anns.append(MaskAnn(ann_id=ann_id, segmentation=rle, category=text))
        phrases.append(Phrase(start=start, end=end, ann_ids=ids))
    unique = {a.ann_id: a for a in anns}  # a mask grounding two phrases is listed once
    image = ImageRecord(source=source, image_id=image_id, file_name=file_name, height=height, width=width,
                        image_root=image_root, anns=list(unique.values()))
    sample = GroundedCaptionSample(source=source, image_id=image_id, sample_id=sample_id, caption=caption,
                                   phrases=phrases)
    return image, sample


def read_grandf(path: str | Path, source: str = "grandf", image_root: str | Path | None = None
                ) -> Iterator[tuple[ImageRecord, GroundedCaptionSample]]:
    """Stream ``(image, sample)`` pairs of a training-layout GranDf file (entries in file order)."""
    p = Path(path)
    entries = expect_type(load_json(p, "GranDf GCG file"), list, f"{p}: top level")
    root = str(image_root) if image_root is not None else str(p.parent)
    for k, entry in enumerate(entries):
        parsed = parse_grandf_entry(entry, describe(p, f"[{k}]"), source, root)
        if parsed is not None:
            yield parsed


def find_phrase_spans(caption: str, labels: Sequence[str], where: str) -> list[tuple[int, int]]:
    """Character spans of ``labels`` in ``caption``: each searched after the previous one.

    Case-insensitive; if a label is not found after the previous one it is searched from the start.
    """
    lower = caption.lower()
    spans, cursor = [], 0
    for k, label in enumerate(labels):
        needle = label.lower().strip()
        start = lower.find(needle, cursor)
        if start < 0:
            start = lower.find(needle)
        if start < 0 or not needle:
            raise RecordError(f"{where}: label {k} {label!r} does not occur in the caption {caption!r}")
        spans.append((start, start + len(needle)))
        cursor = start + len(needle)
    return spans


def read_grandf_eval(
    caption_gt: str | Path, mask_gt: str | Path, source: str = "grandf", image_root: str | Path | None = None
) -> Iterator[tuple[ImageRecord, GroundedCaptionSample]]:
    """Stream ``(image, sample)`` pairs of the GranDf evaluation layout (caption gt + mask gt)."""
    cap_path = Path(caption_gt)
    doc = load_json(cap_path, "GranDf caption ground-truth file")
    images = {require_id(img, "id", describe(cap_path, f"images[{k}]")): img
              for k, img in enumerate(require(doc, "images", list, str(cap_path)))}
    masks = CocoIndex.load(mask_gt)
    root = str(image_root) if image_root is not None else str(cap_path.parent)
    for k, ann in enumerate(require(doc, "annotations", list, str(cap_path))):
        where = describe(cap_path, f"annotations[{k}]")
        image_id = require_id(ann, "image_id", where)
        caption = require(ann, "caption", str, where)
        labels = [expect_type(x, str, f"{where}: labels") for x in require(ann, "labels", list, where)]
        if image_id not in masks.image_ids:
            raise RecordError(f"{where}: image_id {image_id} has no entry in {masks.path}")
        image = masks.image_record(image_id, source, root)
        if image_id in images and "file_name" in images[image_id]:
            image.file_name = images[image_id]["file_name"]
        if len(image.anns) != len(labels):
            raise RecordError(
                f"{where}: {len(labels)} labels but {len(image.anns)} masks for image {image_id} in {masks.path}"
            )
        spans = find_phrase_spans(caption, labels, where)
        phrases = [Phrase(start=s, end=e, ann_ids=[a.ann_id]) for (s, e), a in zip(spans, image.anns)]
        sample_id = id_text(ann["id"]) if isinstance(ann.get("id"), (int, str)) else image_id
        yield image, GroundedCaptionSample(source=source, image_id=image_id, sample_id=sample_id,
                                           caption=caption, phrases=phrases)


# --------------------------------------------------------------------------------------------
# writing


def rle_of(ann: MaskAnn, image: ImageRecord) -> dict:
    """The compressed RLE of a mask (polygons and uncompressed RLE are re-encoded)."""
    seg = ann.segmentation
    if isinstance(seg, dict) and isinstance(seg.get("counts"), (str, bytes)):
        return json_segmentation(seg)
    return encode_rle(image.mask(ann.ann_id))


def grandf_entry(sample: GroundedCaptionSample, image: ImageRecord, relative_file_name: str) -> dict:
    """One training-layout entry (with the samtok id extensions)."""
    groundings: dict[str, dict] = {}
    for p, phrase in enumerate(sample.phrases):
        text = sample.caption[phrase.start : phrase.end]
        if text in groundings:
            raise RecordError(
                f"sample {sample.sample_id}: phrase {p} {text!r} repeats an earlier phrase; the GranDf layout "
                f"keys groundings by phrase text, so phrases of one caption must differ"
            )
        if not phrase.ann_ids:
            raise RecordError(f"sample {sample.sample_id}: phrase {p} {text!r} has no mask")
        groundings[text] = {
            "token_positives": [phrase.start, phrase.end],
            "rle_masks": [rle_of(image.ann(a), image) for a in phrase.ann_ids],
            "ann_ids": list(phrase.ann_ids),
        }
    entry = {
        "file_name": relative_file_name,
        "height": int(image.height),
        "width": int(image.width),
        "image_id": file_id(image.image_id),
        "caption": sample.caption,
        "groundings": groundings,
    }
    if sample.sample_id != image.image_id:
        entry["sample_id"] = sample.sample_id
    return entry


def write_grandf(
    path: str | Path,
    samples: Sequence[GroundedCaptionSample],
    images: Sequence[ImageRecord],
    relative_to: str | Path | None = None,
) -> Path:
    """Write samples in the GranDf training layout; masks are looked up in ``images``."""
    from .coco import relative_file_name

    images_by_id = {r.image_id: r for r in images}
    entries = []
    for s in samples:
        image = images_by_id.get(s.image_id)
        if image is None:
            raise RecordError(f"sample {s.sample_id}: image {s.image_id!r} is not among the images given")
        entries.append(grandf_entry(s, image, relative_file_name(image, relative_to)))
    return write_json(path, entries)
