"""Naming a data set in a config: ``open_source(kind, **paths_and_options)``.

Each kind is a small dataclass whose fields are the keyword arguments (defaults documented in
place and in docs/formats.md); every source has ``.images()`` (the masks, as
:class:`ImageRecord`) and ``.samples()`` (the language supervision, as task samples), both
streamed. Unknown kinds and unknown or missing keywords are :class:`ConfigError`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional, Protocol, Union

from samtok.core.config import ConfigError
from samtok.data.records import ImageRecord, RecordError, TaskSample

from .coco import CocoIndex, instance_seg_samples, iter_image_records
from .conversation import conversation_image_record, read_conversations
from .gcg import read_grandf, read_grandf_eval
from .grefcoco import default_grefcoco_image_root, grefcoco_paths, read_grefcoco_samples
from .multiround import read_segllm
from .refer import default_refer_image_root, read_refer_samples, refer_paths
from .region_caption import read_region_captions
from .sa1b import read_sa1b
from .scene_graph import read_psg
from .synthetic_layout import read_synthetic_split

PathLike = Union[str, Path]


class DataSource(Protocol):
    """What :func:`open_source` returns."""

    def images(self) -> Iterator[ImageRecord]: ...

    def samples(self) -> Iterator[TaskSample]: ...


def _root(value: Optional[PathLike], default: PathLike) -> str:
    return str(value) if value is not None else str(default)


@dataclass
class CocoSource:
    """COCO (or LVIS) instances JSON. ``samples()``: open-vocabulary instance samples (see coco.py)."""

    instances: PathLike  # instances_*.json
    source: str = "coco"  # mask-pool name of the records
    image_root: Optional[PathLike] = None  # default: the JSON's folder
    include_crowd: bool = True  # keep iscrowd regions (marked attributes["iscrowd"] = 1)
    skip_empty_masks: bool = False  # drop empty masks instead of raising
    skip_images_without_masks: bool = False
    check_masks: bool = True  # validate every RLE / polygon structurally

    _index: Optional[CocoIndex] = field(default=None, init=False, repr=False)

    @property
    def index(self) -> CocoIndex:
        if self._index is None:
            self._index = CocoIndex.load(self.instances)
        return self._index

    def images(self) -> Iterator[ImageRecord]:
        yield from iter_image_records(self.index, self.source, _root(self.image_root, Path(self.instances).parent),
                                      include_crowd=self.include_crowd, skip_empty_masks=self.skip_empty_masks,
                                      skip_images_without_masks=self.skip_images_without_masks,
                                      check_masks=self.check_masks)

    def samples(self) -> Iterator[TaskSample]:
        for record in self.images():
            yield from instance_seg_samples(self.index, record)


@dataclass
class Sa1bSource:
    """SA-1B per-image JSON files. No language: ``samples()`` is empty."""

    path: Any  # a folder of sa_*.json, one .json file, or a list of either
    source: str = "sa1b"
    image_root: Optional[PathLike] = None  # default: each JSON's own folder
    skip_empty_masks: bool = False
    check_masks: bool = True

    def images(self) -> Iterator[ImageRecord]:
        yield from read_sa1b(self.path, self.source, self.image_root, self.skip_empty_masks, self.check_masks)

    def samples(self) -> Iterator[TaskSample]:
        return iter(())


@dataclass
class _ReferBase:
    data_root: Optional[PathLike] = None  # folder holding <dataset>/ and images/
    dataset: str = ""
    split_by: str = "unc"
    split: Optional[str] = None  # "train", "val", "testA", ... or "a,b"; None: every split
    refs: Optional[PathLike] = None  # explicit refs file (overrides data_root/dataset/split_by)
    instances: Optional[PathLike] = None  # explicit instances.json
    image_root: Optional[PathLike] = None
    source: str = "coco2014"  # RefCOCO/+/g and gRefCOCO share COCO train2014 mask ids
    sentence_key: str = "sent"  # or "raw" (original casing and punctuation)
    _index: Optional[CocoIndex] = field(default=None, init=False, repr=False)

    def _paths(self) -> tuple[Path, Path]:
        raise NotImplementedError

    def _default_image_root(self) -> Path:
        raise NotImplementedError

    def _read(self, refs: Path, index: CocoIndex) -> Iterator[TaskSample]:
        raise NotImplementedError

    def __post_init__(self) -> None:
        if self.refs is None or self.instances is None:
            if self.data_root is None:
                raise ConfigError(f"{self.dataset}: give data_root, or both refs and instances")
            refs, instances = self._paths()
            self.refs = self.refs if self.refs is not None else refs
            self.instances = self.instances if self.instances is not None else instances

    @property
    def index(self) -> CocoIndex:
        if self._index is None:
            self._index = CocoIndex.load(self.instances)
        return self._index

    def samples(self) -> Iterator[TaskSample]:
        yield from self._read(Path(self.refs), self.index)

    def images(self) -> Iterator[ImageRecord]:
        """The images of the split's refs (every image of instances.json when ``split`` is None)."""
        wanted = None if self.split is None else {s.image_id for s in self.samples()}
        root = _root(self.image_root, self._default_image_root() if self.data_root is not None else Path(self.instances).parent)
        yield from iter_image_records(self.index, self.source, root, image_ids=wanted)


@dataclass
class ReferSource(_ReferBase):
    """RefCOCO / RefCOCO+ / RefCOCOg (refer layout): one ReferringSample per sentence."""

    dataset: str = "refcoco"  # refcoco, refcoco+, refcocog

    def _paths(self) -> tuple[Path, Path]:
        return refer_paths(self.data_root, self.dataset, self.split_by)

    def _default_image_root(self) -> Path:
        return default_refer_image_root(self.data_root)

    def _read(self, refs: Path, index: CocoIndex) -> Iterator[TaskSample]:
        return read_refer_samples(refs, index, self.split, self.source, self.sentence_key)


@dataclass
class GRefCocoSource(_ReferBase):
    """gRefCOCO: generalized ReferringSamples (zero, one or several targets)."""

    dataset: str = "grefcoco"

    def _paths(self) -> tuple[Path, Path]:
        return grefcoco_paths(self.data_root, self.dataset, self.split_by)

    def _default_image_root(self) -> Path:
        return default_grefcoco_image_root(self.data_root)

    def _read(self, refs: Path, index: CocoIndex) -> Iterator[TaskSample]:
        return read_grefcoco_samples(refs, index, self.split, self.source, self.sentence_key)


@dataclass
class GcgSource:
    """GranDf GCG: training layout (``annotations``) or evaluation layout (``caption_gt`` + ``mask_gt``)."""

    annotations: Optional[PathLike] = None  # GranDf_HA_GCG_train.json
    caption_gt: Optional[PathLike] = None  # {val,test}_gcg_coco_caption_gt.json
    mask_gt: Optional[PathLike] = None  # {val,test}_gcg_coco_mask_gt.json
    image_root: Optional[PathLike] = None  # default: the JSON's folder
    source: str = "grandf"

    def __post_init__(self) -> None:
        if (self.annotations is None) == (self.caption_gt is None or self.mask_gt is None):
            raise ConfigError("gcg: give either annotations, or caption_gt and mask_gt")

    def _pairs(self):
        if self.annotations is not None:
            return read_grandf(self.annotations, self.source, self.image_root)
        return read_grandf_eval(self.caption_gt, self.mask_gt, self.source, self.image_root)

    def images(self) -> Iterator[ImageRecord]:
        return (image for image, _ in self._pairs())

    def samples(self) -> Iterator[TaskSample]:
        return (sample for _, sample in self._pairs())


@dataclass
class RegionCaptionSource:
    """DAM-style region captions (``annotations.json`` of one subset)."""

    annotations: PathLike
    image_root: Optional[PathLike] = None  # default: the JSON's folder (extract the tar shards there)
    source: str = "dam"

    def images(self) -> Iterator[ImageRecord]:
        return (image for image, _ in read_region_captions(self.annotations, self.source, self.image_root))

    def samples(self) -> Iterator[TaskSample]:
        return (s for _, group in read_region_captions(self.annotations, self.source, self.image_root) for s in group)


@dataclass
class MultiRoundSource:
    """SegLLM dialogues; masks come from ``instances`` (SegLLM's register)."""

    conversations: PathLike
    instances: Optional[PathLike] = None  # COCO instances holding the mask ids (needed for images())
    image_root: Optional[PathLike] = None  # default: the instances file's folder
    source: Optional[str] = None  # default: the dataset name in the tags
    _index: Optional[CocoIndex] = field(default=None, init=False, repr=False)

    @property
    def index(self) -> Optional[CocoIndex]:
        if self._index is None and self.instances is not None:
            self._index = CocoIndex.load(self.instances)
        return self._index

    def samples(self) -> Iterator[TaskSample]:
        return read_segllm(self.conversations, self.index, self.source)

    def images(self) -> Iterator[ImageRecord]:
        if self.index is None:
            raise RecordError(f"{self.conversations}: multiround images() needs 'instances' (the masks' COCO file)")
        used: dict[str, str] = {}
        for s in self.samples():
            used.setdefault(s.image_id, s.source)
        root = _root(self.image_root, Path(self.instances).parent)
        for record in iter_image_records(self.index, "", root, image_ids=used):
            record.source = used[record.image_id]
            yield record


@dataclass
class SceneGraphSource:
    """PSG ``psg.json`` (panoptic PNGs or inline RLE segments)."""

    psg: PathLike
    split: Optional[str] = None  # "train", "test"/"val" (test_image_ids); None: all
    image_root: Optional[PathLike] = None  # default: the JSON's folder
    seg_root: Optional[PathLike] = None  # where pan_seg_file_name is relative to; default: the JSON's folder
    source: str = "psg"

    def images(self) -> Iterator[ImageRecord]:
        return (image for image, _ in read_psg(self.psg, self.split, self.source, self.image_root, self.seg_root))

    def samples(self) -> Iterator[TaskSample]:
        pairs = read_psg(self.psg, self.split, self.source, self.image_root, self.seg_root, with_masks=False)
        return (s for _, s in pairs if s is not None)


@dataclass
class ConversationSource:
    """LLaVA / SAMTok conversation JSON (or JSON lines) with mask spans already in the text."""

    path: PathLike
    image_root: Optional[PathLike] = None  # default: the file's folder
    source: str = "llava"
    check_spans: bool = True  # refuse malformed mask spans
    codebook_size: int = 256

    def samples(self) -> Iterator[TaskSample]:
        return read_conversations(self.path, self.source, self.check_spans, self.codebook_size)

    def images(self) -> Iterator[ImageRecord]:
        """One mask-less record per distinct image (size read from the image header)."""
        root = _root(self.image_root, Path(self.path).parent)
        seen: set[str] = set()
        for s in self.samples():
            if s.image_id and s.image_id not in seen:
                seen.add(s.image_id)
                yield conversation_image_record(s.image_id, self.source, root)


@dataclass
class SyntheticSource:
    """One split of the synthetic world (see synthetic_layout.py), read through the real readers."""

    root: PathLike
    split: str = "train"
    source: str = "synth"

    def images(self) -> Iterator[ImageRecord]:
        return iter(read_synthetic_split(Path(self.root), self.split, self.source)[0])

    def samples(self) -> Iterator[TaskSample]:
        return iter(read_synthetic_split(Path(self.root), self.split, self.source)[1])


KINDS: dict[str, type] = {
    "coco": CocoSource,
    "sa1b": Sa1bSource,
    "refer": ReferSource,
    "grefcoco": GRefCocoSource,
    "gcg": GcgSource,
    "region_caption": RegionCaptionSource,
    "multiround": MultiRoundSource,
    "scene_graph": SceneGraphSource,
    "conversation": ConversationSource,
    "synthetic": SyntheticSource,
}


def source_options(kind: str) -> list[str]:
    """The keyword arguments a kind accepts."""
    return [f.name for f in dataclasses.fields(KINDS[kind]) if f.init]


def open_source(kind: str, **paths_and_options: Any) -> DataSource:
    """The data source of ``kind`` built from its keyword arguments (see docs/formats.md)."""
    if kind not in KINDS:
        raise ConfigError(f"unknown data format kind {kind!r}; known kinds: {', '.join(KINDS)}")
    allowed = source_options(kind)
    unknown = sorted(set(paths_and_options) - set(allowed))
    if unknown:
        raise ConfigError(f"data format {kind!r}: unknown option(s) {unknown}; accepted: {allowed}")
    required = [f.name for f in dataclasses.fields(KINDS[kind])
                if f.init and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    missing = [name for name in required if name not in paths_and_options]
    if missing:
        raise ConfigError(f"data format {kind!r}: missing option(s) {missing}; accepted: {allowed}")
    return KINDS[kind](**paths_and_options)
