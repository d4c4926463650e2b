"""RefCOCO / RefCOCO+ / RefCOCOg in the layout of the ``refer`` toolkit (lichengunc/refer).

Layout::

    <data_root>/refcoco/refs(unc).p          refs(google).p for the Google split
    <data_root>/refcoco/instances.json       COCO instances of the images used (train2014)
    <data_root>/refcoco+/refs(unc).p, instances.json
    <data_root>/refcocog/refs(umd).p, refs(google).p, instances.json
    <data_root>/images/mscoco/images/train2014/COCO_train2014_*.jpg

``refs(*).p`` is a pickle of a list of refs::

    {"ref_id", "ann_id", "image_id", "category_id", "split", "file_name", "sent_ids",
     "sentences": [{"sent_id", "sent", "raw", "tokens"}]}

``ann_id`` is the id of the referred mask in ``instances.json``. One :class:`ReferringSample` is
produced per sentence (``sample_id`` = ``sent_id``). Pickles are loaded with a restricted
unpickler (:mod:`.safe_pickle`). ``file_name`` (the image name with an extra suffix) and
``tokens`` are ignored; ``category_id`` is ignored (the mask's own category comes from
``instances.json``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterable, Iterator, Mapping, Optional, Sequence

from samtok.data.records import ImageRecord, ReferringSample, RecordError

from .coco import CocoIndex, category_table
from .json_fields import describe, expect_type, file_id, id_text, require, require_id
from .safe_pickle import dump_plain_pickle, load_plain_pickle

SENTENCE_KEYS = ("sent", "raw")


def refer_paths(data_root: str | Path, dataset: str = "refcoco", split_by: str = "unc") -> tuple[Path, Path]:
    """``(refs pickle, instances.json)`` of a refer data root."""
    folder = Path(data_root) / dataset
    return folder / f"refs({split_by}).p", folder / "instances.json"


def default_refer_image_root(data_root: str | Path) -> Path:
    """Where the refer toolkit expects COCO train2014 images."""
    return Path(data_root) / "images" / "mscoco" / "images" / "train2014"


def split_filter(split: str | Sequence[str] | None) -> Optional[set[str]]:
    """``None`` (every split) or the set of split names asked for."""
    if split is None:
        return None
    if isinstance(split, str):
        return {s.strip() for s in split.split(",") if s.strip()}
    return set(split)


def ref_sentences(ref: dict, where: str, sentence_key: str = "sent") -> Iterator[tuple[str, str]]:
    """``(sent_id, text)`` of every sentence of a ref; ``sentence_key`` first, then the others."""
    sentences = require(ref, "sentences", list, where)
    keys = (sentence_key, *[k for k in SENTENCE_KEYS if k != sentence_key])
    for k, sent in enumerate(sentences):
        sent_where = f"{where}: sentences[{k}]"
        sent_id = require_id(sent, "sent_id", sent_where)
        text = next((sent[key] for key in keys if isinstance(sent.get(key), str)), None)
        if text is None:
            raise RecordError(f"{sent_where} (sent_id {sent_id}): missing field '{sentence_key}' (a string)")
        yield sent_id, text


def load_refs(path: str | Path) -> list:
    """The list of refs of a ``refs(*).p`` pickle (safe) or a ``.json`` file."""
    p = Path(path)
    if p.suffix == ".json":
        from .json_fields import load_json

        refs = load_json(p, "refs file")
    else:
        refs = load_plain_pickle(p)
    return expect_type(refs, list, f"{p}: top level")


def check_target(index: CocoIndex, ann_id: str, image_id: str, where: str) -> None:
    """The referred mask must exist in the instances file and belong to the ref's image."""
    owner = index.image_of_ann.get(ann_id)
    if owner is None:
        raise RecordError(f"{where}: ann_id {ann_id} is not in {index.path}")
    if owner != image_id:
        raise RecordError(f"{where}: ann_id {ann_id} belongs to image {owner}, not to image_id {image_id}")


def iter_refs(refs_path: str | Path, split: str | Sequence[str] | None) -> Iterator[tuple[dict, str, str]]:
    """``(ref, image_id, where)`` for every ref of ``refs_path`` in ``split`` (refer and gRefCOCO
    layouts alike); ``where`` names the file, the ref's index and its ``ref_id`` for error messages."""
    refs_path = Path(refs_path)
    wanted = split_filter(split)
    for k, ref in enumerate(load_refs(refs_path)):
        where = describe(refs_path, f"refs[{k}]")
        ref_id = require_id(ref, "ref_id", where)
        where = describe(refs_path, f"refs[{k}] (ref_id {ref_id})")
        if wanted is not None and require(ref, "split", str, where) not in wanted:
            continue
        yield ref, require_id(ref, "image_id", where), where


def read_refer_samples(
    refs_path: str | Path,
    instances: CocoIndex | str | Path,
    split: str | Sequence[str] | None,
    source: str,
    sentence_key: str = "sent",
) -> Iterator[ReferringSample]:
    """Stream one single-target :class:`ReferringSample` per sentence of the refs in ``split``."""
    index = instances if isinstance(instances, CocoIndex) else CocoIndex.load(instances)
    for ref, image_id, where in iter_refs(refs_path, split):
        raw_ann = require(ref, "ann_id", (int, str, list), where)
        if isinstance(raw_ann, list):  # some re-releases wrap the single target in a list
            if len(raw_ann) != 1:
                raise RecordError(f"{where}: field 'ann_id' must hold one annotation id, got {raw_ann!r}")
            raw_ann = expect_type(raw_ann[0], (int, str), f"{where}: field 'ann_id'")
        ann_id = id_text(raw_ann)
        check_target(index, ann_id, image_id, where)
        for sent_id, text in ref_sentences(ref, where, sentence_key):
            yield ReferringSample(source=source, image_id=image_id, sample_id=sent_id, expression=text,
                                  target_ids=[ann_id], generalized=False)


# --------------------------------------------------------------------------------------------
# writing


SplitOf = Callable[[ReferringSample], str]


def split_of(split: str | Mapping[str, str]) -> SplitOf:
    """One split for every sample, or a ``sample_id -> split`` mapping."""
    if isinstance(split, str):
        return lambda sample: split
    return lambda sample: split[sample.sample_id]


def group_consecutive(samples: Iterable[ReferringSample], split: SplitOf) -> list[list[ReferringSample]]:
    """Consecutive samples of the same image, targets and split share one ref (as upstream refs do)."""
    groups: list[list[ReferringSample]] = []
    for s in samples:
        last = groups[-1][0] if groups else None
        if last is not None and (last.image_id, last.target_ids, split(last)) == (s.image_id, s.target_ids, split(s)):
            groups[-1].append(s)
        else:
            groups.append([s])
    return groups


def ref_sentence_dicts(group: Sequence[ReferringSample]) -> list[dict]:
    return [
        {"tokens": s.expression.split(), "raw": s.expression, "sent_id": file_id(s.sample_id), "sent": s.expression}
        for s in group
    ]


def ref_file_name(image: Optional[ImageRecord], image_id: str, suffix_id: str) -> str:
    """refer's ``file_name``: the image name with ``_<ann_id>`` before the extension (ignored on read)."""
    name = Path(image.file_name).name if image is not None else f"{image_id}.jpg"
    stem, ext = Path(name).stem, Path(name).suffix or ".jpg"
    return f"{stem}_{suffix_id}{ext}"


def category_id_of(images_by_id: dict[str, ImageRecord], category_ids: dict[str, int], image_id: str, ann_id: str) -> int:
    image = images_by_id.get(image_id)
    if image is None:
        return 0
    try:
        return category_ids.get(image.ann(ann_id).category, 0)
    except RecordError:
        return 0


def refer_refs(
    samples: Sequence[ReferringSample],
    split: str | Mapping[str, str],
    images: Sequence[ImageRecord] = (),
    categories: Sequence[str] = (),
) -> list[dict]:
    """The refs list of single-target samples (category ids as in :func:`coco.category_table`).

    ``split`` is one split name for all, or a ``sample_id -> split`` mapping.
    """
    images_by_id = {r.image_id: r for r in images}
    category_ids = {n: k + 1 for k, n in enumerate(category_table(categories, images))}
    split_fn = split_of(split)
    refs = []
    for group in group_consecutive(samples, split_fn):
        first = group[0]
        if first.generalized or len(first.target_ids) != 1:
            raise RecordError(
                f"sample {first.sample_id}: the refer layout holds exactly one target per expression "
                f"(got {len(first.target_ids)}, generalized={first.generalized}); write it as gRefCOCO"
            )
        ann_id = first.target_ids[0]
        sentences = ref_sentence_dicts(group)
        refs.append(
            {
                "sent_ids": [s["sent_id"] for s in sentences],
                "file_name": ref_file_name(images_by_id.get(first.image_id), first.image_id, ann_id),
                "ann_id": file_id(ann_id),
                "ref_id": len(refs),
                "image_id": file_id(first.image_id),
                "split": split_fn(first),
                "sentences": sentences,
                "category_id": category_id_of(images_by_id, category_ids, first.image_id, ann_id),
            }
        )
    return refs


def write_refer_refs(
    path: str | Path,
    samples: Sequence[ReferringSample],
    split: str | Mapping[str, str],
    images: Sequence[ImageRecord] = (),
    categories: Sequence[str] = (),
) -> Path:
    """Write a ``refs(*).p`` pickle (protocol 2) of single-target samples."""
    return dump_plain_pickle(refer_refs(samples, split, images, categories), path)
