"""The internal record types every reader produces and every stage consumes.

Two kinds of records:

* :class:`ImageRecord` — one image on disk with its masks (:class:`MaskAnn`). This is what the
  tokenizer trains on and what pre-tokenization turns into codes. A mask is identified everywhere
  by the key ``(source, image_id, ann_id)`` (all strings); ``source`` names the *mask pool* (for
  example the COCO train2014 instances shared by RefCOCO/+/g and gRefCOCO).
* task samples (:class:`ReferringSample`, :class:`GroundedCaptionSample`, ...) — language
  supervision that refers to masks by ``ann_id`` within the same ``(source, image_id)``. They hold
  no pixels; the conversation builders look masks up (for boxes) and codes up (for spans).

Readers stream: they yield records one at a time and name the file and record when something is
wrong (:class:`RecordError`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Optional

import numpy as np

from samtok.core.errors import SamtokError
from samtok.core.masks import decode_segmentation, mask_to_box

TASKS = (
    "res",  # referring segmentation: one expression -> exactly one mask
    "gres",  # generalized referring: one expression -> zero, one or several masks
    "gcg",  # grounded conversation generation: caption whose phrases are linked to masks
    "region_caption",  # a mask in the prompt -> a description
    "region_vqa",  # a mask in the prompt + a question -> an answer
    "mr_seg",  # multi-round interactive segmentation
    "scene_graph",  # relation triplets between masks
    "ov_seg",  # open-vocabulary instance segmentation (category names -> masks)
    "conversation",  # ready-made chat whose turns already contain mask spans
)


class RecordError(SamtokError):
    """A record in a data file is malformed: the message names the file and the record."""


@dataclass
class MaskAnn:
    """One mask of an image. ``segmentation`` is whatever the file holds (RLE dict or polygons)."""

    ann_id: str
    segmentation: Any
    category: str = ""
    bbox: Optional[list[float]] = None  # COCO xywh, when the file provides it
    area: Optional[float] = None
    attributes: dict = field(default_factory=dict)  # free-form (the synthetic set stores colour, shape...)

    def to_mask(self, height: int, width: int, where: str = "") -> np.ndarray:
        """Decode to an ``(H, W)`` bool array (validating the RLE / polygons first)."""
        return decode_segmentation(self.segmentation, height, width, where=where or f"ann {self.ann_id}")


@dataclass
class ImageRecord:
    """An image file and its masks."""

    source: str
    image_id: str
    file_name: str  # relative to ``image_root`` (or absolute)
    height: int
    width: int
    image_root: str = ""
    anns: list[MaskAnn] = field(default_factory=list)

    @property
    def path(self) -> Path:
        p = Path(self.file_name)
        return p if p.is_absolute() or not self.image_root else Path(self.image_root) / p

    def ann(self, ann_id: str) -> MaskAnn:
        for a in self.anns:
            if a.ann_id == ann_id:
                return a
        raise RecordError(f"{self.source}/{self.image_id}: no annotation with id {ann_id!r}")

    def mask(self, ann_id: str) -> np.ndarray:
        return self.ann(ann_id).to_mask(self.height, self.width, where=f"{self.source}/{self.image_id}/{ann_id}")

    def box(self, ann_id: str) -> tuple[int, int, int, int]:
        """Inclusive xyxy box of a mask (decoded, so it is exact even when ``bbox`` is missing)."""
        return mask_to_box(self.mask(ann_id), where=f"{self.source}/{self.image_id}/{ann_id}")


# ------------------------------------------------------------------------------------------------
# task samples


@dataclass
class TaskSample:
    """Common fields of every task sample."""

    task: ClassVar[str] = ""
    source: str  # mask pool name, to look masks and codes up
    image_id: str
    sample_id: str

    @property
    def ann_ids(self) -> list[str]:
        """Every mask this sample refers to (for pre-tokenization coverage checks)."""
        return []


@dataclass
class ReferringSample(TaskSample):
    """RES (exactly one target) or GRES (any number, possibly none) — ``task`` tells which."""

    expression: str = ""
    target_ids: list[str] = field(default_factory=list)
    generalized: bool = False

    @property
    def task(self) -> str:  # type: ignore[override]
        return "gres" if self.generalized else "res"

    @property
    def no_target(self) -> bool:
        return not self.target_ids

    @property
    def ann_ids(self) -> list[str]:
        return list(self.target_ids)


@dataclass
class Phrase:
    """A grounded phrase: characters ``[start, end)`` of the caption, linked to masks."""

    start: int
    end: int
    ann_ids: list[str] = field(default_factory=list)


@dataclass
class GroundedCaptionSample(TaskSample):
    task: ClassVar[str] = "gcg"
    caption: str = ""
    phrases: list[Phrase] = field(default_factory=list)

    @property
    def ann_ids(self) -> list[str]:
        return [a for p in self.phrases for a in p.ann_ids]


@dataclass
class RegionCaptionSample(TaskSample):
    """A region (one mask) and its description; with ``question`` it is region VQA."""

    task: ClassVar[str] = "region_caption"
    ann_id: str = ""
    caption: str = ""
    question: str = ""  # empty: captioning

    @property
    def ann_ids(self) -> list[str]:
        return [self.ann_id]


REGION_MARKER_RE = re.compile(r"<region(\d+)>")


def region_marker(k: int) -> str:
    """The placeholder for the ``k``-th mask (0-based, in ``Round.refer_ids`` order) of a request."""
    return f"<region{k}>"


@dataclass
class Round:
    """One round of a multi-round dialogue: a request (may refer to earlier masks) and its targets.

    ``refer_ids`` are masks shown in the user turn (as spans replacing ``<region{k}>`` markers in
    ``request``, in order; ``k`` counts from 0, see :func:`region_marker`); ``target_ids`` are the
    masks the assistant answers with.
    """

    request: str
    target_ids: list[str] = field(default_factory=list)
    refer_ids: list[str] = field(default_factory=list)
    answer_label: str = ""


@dataclass
class MultiRoundSample(TaskSample):
    task: ClassVar[str] = "mr_seg"
    rounds: list[Round] = field(default_factory=list)

    @property
    def ann_ids(self) -> list[str]:
        return [a for r in self.rounds for a in (*r.refer_ids, *r.target_ids)]


@dataclass
class Relation:
    subject_id: str
    predicate: str
    object_id: str


@dataclass
class SceneGraphSample(TaskSample):
    task: ClassVar[str] = "scene_graph"
    relations: list[Relation] = field(default_factory=list)
    labels: dict = field(default_factory=dict)  # ann_id -> label text

    @property
    def ann_ids(self) -> list[str]:
        return [a for r in self.relations for a in (r.subject_id, r.object_id)]


@dataclass
class InstanceSegSample(TaskSample):
    """Open-vocabulary instance segmentation: segment every instance of the asked categories."""

    task: ClassVar[str] = "ov_seg"
    categories: list[str] = field(default_factory=list)  # asked for, distractors included
    targets: dict = field(default_factory=dict)  # category -> [ann_id, ...] (absent/empty: none)

    @property
    def ann_ids(self) -> list[str]:
        return [a for ids in self.targets.values() for a in ids]


@dataclass
class ConversationSample(TaskSample):
    """A ready-made chat (LLaVA/SAMTok style) whose turns already contain mask spans as text.

    ``messages`` is a list of ``{"role": "user"|"assistant"|"system", "content": str}``; the image
    placeholder ``<image>`` marks where the image goes (at the start of the first user turn if absent).
    """

    task: ClassVar[str] = "conversation"
    messages: list[dict] = field(default_factory=list)
