"""gRefCOCO (generalized referring expressions: any number of targets, possibly none).

Layout (henghuiding/gRefCOCO, read by ReLA's ``grefer.py``)::

    <data_root>/grefcoco/grefs(unc).json     (ReLA also accepts grefs(unc).p)
    <data_root>/grefcoco/instances.json      COCO train2014 instances
    <data_root>/images/train2014/COCO_train2014_*.jpg

``grefs(unc).json`` is a list of refs like RefCOCO's, except that ``ann_id`` and ``category_id``
are lists, ``[-1]`` meaning "no target", and a boolean ``no_target`` is present::

    {"ref_id", "image_id", "split", "ann_id": [..] | [-1], "category_id": [..] | [-1],
     "no_target": bool, "sentences": [{"sent_id", "sent", "raw", "tokens"}], "sent_ids", "file_name"}

One :class:`ReferringSample` (``generalized=True``) per sentence; ``target_ids`` empty for a
no-target expression. Crowd regions among the targets are kept (ReLA drops them when it builds
the merged ground-truth mask; the conversation builder can do the same via
``attributes["iscrowd"]``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator, Mapping, Sequence

from samtok.data.records import ImageRecord, ReferringSample, RecordError

from .coco import CocoIndex, category_table
from .json_fields import expect_type, file_id, id_text, optional, require, write_json
from .refer import (
    category_id_of,
    check_target,
    group_consecutive,
    iter_refs,
    ref_file_name,
    ref_sentence_dicts,
    ref_sentences,
    split_of,
)

NO_TARGET_ID = -1


def grefcoco_paths(data_root: str | Path, dataset: str = "grefcoco", split_by: str = "unc") -> tuple[Path, Path]:
    """``(grefs file, instances.json)``; the ``.json`` refs file is preferred over a ``.p`` one."""
    folder = Path(data_root) / dataset
    refs = folder / f"grefs({split_by}).json"
    if not refs.exists() and (folder / f"grefs({split_by}).p").exists():
        refs = folder / f"grefs({split_by}).p"
    return refs, folder / "instances.json"


def default_grefcoco_image_root(data_root: str | Path) -> Path:
    """Where ReLA expects the COCO train2014 images."""
    return Path(data_root) / "images" / "train2014"


def ref_target_ids(ref: dict, where: str) -> list[str]:
    """Target ann ids of a gRefCOCO ref: ``[]`` for ``[-1]``; checked against ``no_target``."""
    raw = require(ref, "ann_id", (int, str, list), where)
    ids = raw if isinstance(raw, list) else [raw]
    ids = [expect_type(a, (int, str), f"{where}: field 'ann_id'") for a in ids]
    empty = not ids or all(str(a) == str(NO_TARGET_ID) for a in ids)
    if not empty and any(str(a) == str(NO_TARGET_ID) for a in ids):
        raise RecordError(f"{where}: field 'ann_id' mixes -1 (no target) with annotation ids: {raw!r}")
    no_target = optional(ref, "no_target", bool, where)
    if no_target is not None and no_target != empty:
        raise RecordError(f"{where}: 'no_target' is {no_target} but 'ann_id' is {raw!r}")
    return [] if empty else [id_text(a) for a in ids]


def read_grefcoco_samples(
    refs_path: str | Path,
    instances: CocoIndex | str | Path,
    split: str | Sequence[str] | None,
    source: str,
    sentence_key: str = "sent",
) -> Iterator[ReferringSample]:
    """Stream one generalized :class:`ReferringSample` per sentence of the refs in ``split``."""
    index = instances if isinstance(instances, CocoIndex) else CocoIndex.load(instances)
    for ref, image_id, where in iter_refs(refs_path, split):
        if image_id not in index.image_ids:
            raise RecordError(f"{where}: image_id {image_id} is not in {index.path}")
        targets = ref_target_ids(ref, where)
        for ann_id in targets:
            check_target(index, ann_id, image_id, where)
        for sent_id, text in ref_sentences(ref, where, sentence_key):
            yield ReferringSample(source=source, image_id=image_id, sample_id=sent_id, expression=text,
                                  target_ids=list(targets), generalized=True)


def grefcoco_refs(
    samples: Sequence[ReferringSample],
    split: str | Mapping[str, str],
    images: Sequence[ImageRecord] = (),
    categories: Sequence[str] = (),
) -> list[dict]:
    """The gRefCOCO refs list of ``samples`` (any number of targets each)."""
    images_by_id = {r.image_id: r for r in images}
    category_ids = {n: k + 1 for k, n in enumerate(category_table(categories, images))}
    split_fn = split_of(split)
    refs = []
    for group in group_consecutive(samples, split_fn):
        first = group[0]
        targets = list(first.target_ids)
        sentences = ref_sentence_dicts(group)
        refs.append(
            {
                "sent_ids": [s["sent_id"] for s in sentences],
                "file_name": ref_file_name(images_by_id.get(first.image_id), first.image_id, str(len(refs))),
                "ann_id": [file_id(a) for a in targets] or [NO_TARGET_ID],
                "ref_id": len(refs),
                "image_id": file_id(first.image_id),
                "split": split_fn(first),
                "sentences": sentences,
                "category_id": [category_id_of(images_by_id, category_ids, first.image_id, a) for a in targets]
                or [NO_TARGET_ID],
                "no_target": not targets,
            }
        )
    return refs


def write_grefcoco_refs(
    path: str | Path,
    samples: Sequence[ReferringSample],
    split: str | Mapping[str, str],
    images: Sequence[ImageRecord] = (),
    categories: Sequence[str] = (),
) -> Path:
    """Write a ``grefs(*).json`` file."""
    return write_json(path, grefcoco_refs(samples, split, images, categories))
