"""The synthetic world on disk: every upstream format for one split, and reading it back.

Layout written by :func:`write_synthetic_split` under ``out_dir`` (images are the generator's)::

    instances_{split}.json        COCO instances (compressed RLE; "attributes" per annotation;
                                  InstanceSegSamples as LVIS "neg_category_ids" + "ov_seg")
    refs(synth)_{split}.p         refer pickle of the single-target ReferringSamples
    grefs(synth)_{split}.json     gRefCOCO refs of the generalized ReferringSamples
    gcg_{split}.json              GranDf training layout of the GroundedCaptionSamples
    region_captions_{split}.json  DAM annotations.json of the RegionCaptionSamples
    multiround_{split}.json       SegLLM dialogues of the MultiRoundSamples (register: instances)
    scene_graphs_{split}.json     PSG with RLE segments of the SceneGraphSamples
    conversations_{split}.json    LLaVA conversations (only when ConversationSamples are given)

:func:`read_synthetic_split` reads everything back through the real readers. What comes back
equals what went in up to these normalisations: ``file_name`` relative to ``out_dir`` and
``image_root = out_dir``; RLE ``counts`` as ``str``; missing ``bbox``/``area`` computed; samples
grouped by format in the order above (file order within a format; open-vocabulary samples, scene
graphs and region captions grouped by image). Ids should be decimal strings to be written as integers, as the
upstream formats have them (other strings are written as strings).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from samtok.data.records import (
    ConversationSample,
    GroundedCaptionSample,
    ImageRecord,
    InstanceSegSample,
    MultiRoundSample,
    RecordError,
    ReferringSample,
    RegionCaptionSample,
    SceneGraphSample,
    TaskSample,
)

from .coco import CocoIndex, instance_seg_samples, iter_image_records, write_coco_instances
from .conversation import read_conversations, write_conversations
from .gcg import read_grandf, write_grandf
from .grefcoco import read_grefcoco_samples, write_grefcoco_refs
from .multiround import read_segllm, write_segllm
from .refer import read_refer_samples, write_refer_refs
from .region_caption import read_region_captions, write_region_captions
from .scene_graph import read_psg, write_psg

WRITTEN_TYPES = (InstanceSegSample, ReferringSample, GroundedCaptionSample, RegionCaptionSample, MultiRoundSample,
                 SceneGraphSample, ConversationSample)


def synthetic_split_paths(out_dir: str | Path, split: str) -> dict[str, Path]:
    """``{format name: path}`` of one split (whether or not the files exist)."""
    root = Path(out_dir)
    return {
        "coco": root / f"instances_{split}.json",
        "refer": root / f"refs(synth)_{split}.p",
        "grefcoco": root / f"grefs(synth)_{split}.json",
        "gcg": root / f"gcg_{split}.json",
        "region_caption": root / f"region_captions_{split}.json",
        "multiround": root / f"multiround_{split}.json",
        "scene_graph": root / f"scene_graphs_{split}.json",
        "conversation": root / f"conversations_{split}.json",
    }


def _of_type(samples: Sequence[TaskSample], kind: type) -> list:
    return [s for s in samples if isinstance(s, kind)]


def write_synthetic_split(
    out_dir: Path,
    split: str,
    images: Sequence[ImageRecord],
    samples: Sequence[TaskSample],
    categories: Sequence[str],
) -> dict[str, Path]:
    """Write every format for one split under ``out_dir``; returns ``{format name: path}``.

    ``images`` hold every mask the samples refer to (``file_name`` relative to ``out_dir``, or
    absolute / under ``image_root``: it is rewritten relative to ``out_dir``). ``categories`` fix
    the COCO category ids (1-based, in this order; categories met only in masks follow).
    Raises :class:`RecordError` for a sample type no format holds, or for a sample the target
    layout cannot express (e.g. a non-generalized ReferringSample without exactly one target).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    unsupported = sorted({type(s).__name__ for s in samples if not isinstance(s, WRITTEN_TYPES)})
    if unsupported:
        raise RecordError(
            f"write_synthetic_split: no format holds {', '.join(unsupported)}"
        )
    paths = synthetic_split_paths(out, split)
    referring = _of_type(samples, ReferringSample)
    written = {
        "coco": write_coco_instances(paths["coco"], images, categories, relative_to=out,
                                     ov_samples=_of_type(samples, InstanceSegSample)),
        "refer": write_refer_refs(paths["refer"], [s for s in referring if not s.generalized], split, images, categories),
        "grefcoco": write_grefcoco_refs(paths["grefcoco"], [s for s in referring if s.generalized], split, images, categories),
        "gcg": write_grandf(paths["gcg"], _of_type(samples, GroundedCaptionSample), images, relative_to=out),
        "region_caption": write_region_captions(paths["region_caption"], _of_type(samples, RegionCaptionSample), images,
                                                relative_to=out),
        "multiround": write_segllm(paths["multiround"], _of_type(samples, MultiRoundSample), images, relative_to=out),
        "scene_graph": write_psg(
            paths["scene_graph"], _of_type(samples, SceneGraphSample), images, categories, relative_to=out,
            test_image_ids=[] if split == "train" else [r.image_id for r in images],
        ),
    }
    conversations = _of_type(samples, ConversationSample)
    if conversations:
        written["conversation"] = write_conversations(paths["conversation"], conversations)
    elif paths["conversation"].exists():
        paths["conversation"].unlink()  # a stale file from an earlier run would be read back
    return written


def read_synthetic_split(
    out_dir: Path, split: str, source: str = "synth"
) -> tuple[list[ImageRecord], list[TaskSample]]:
    """Read one split back through the real readers: ``(images, samples)``.

    Every mask id a sample names is checked to exist in ``instances_{split}.json``.
    """
    out = Path(out_dir)
    paths = synthetic_split_paths(out, split)
    index = CocoIndex.load(paths["coco"])
    images = list(iter_image_records(index, source, str(out)))
    samples: list[TaskSample] = [s for record in images for s in instance_seg_samples(index, record, derive=False)]
    samples += read_refer_samples(paths["refer"], index, split, source)
    samples += read_grefcoco_samples(paths["grefcoco"], index, split, source)
    samples += [s for _, s in read_grandf(paths["gcg"], source, image_root=out)]
    samples += [s for _, group in read_region_captions(paths["region_caption"], source, image_root=out) for s in group]
    samples += read_segllm(paths["multiround"], index, source)
    samples += [s for _, s in read_psg(paths["scene_graph"], None, source, image_root=out, with_masks=False) if s is not None]
    if paths["conversation"].exists():
        samples += read_conversations(paths["conversation"], source)
    check_sample_masks(images, samples)
    return images, samples


def check_sample_masks(images: Sequence[ImageRecord], samples: Sequence[TaskSample]) -> None:
    """Every ``(source, image_id, ann_id)`` a sample names must be a mask of ``images``."""
    masks = {(r.source, r.image_id): {a.ann_id for a in r.anns} for r in images}
    for s in samples:
        known = masks.get((s.source, s.image_id))
        if known is None and s.ann_ids:
            raise RecordError(f"{type(s).__name__} {s.sample_id}: image {s.source}/{s.image_id} is not in the images")
        missing = [a for a in s.ann_ids if a not in (known or set())]
        if missing:
            raise RecordError(f"{type(s).__name__} {s.sample_id}: masks {missing} are not masks of image {s.source}/{s.image_id}")
