"""A data mixture: which data sets, which of their tasks, how often, and how conversations look.

    entries:
      - name: refcoco                     # unique; also seeds this entry's random choices
        kind: refer                       # a kind of samtok.data.formats.open_source (docs/formats.md)
        args: {data_root: /data/refer, dataset: refcoco, split_by: unc, split: train}
        tasks: [res]                      # task samples of the source to use (empty: all it yields)
        repeat: 1.0                       # the release's name%NNN rate: 2.0 = twice, 0.5 = a seeded half
        split: train                      # train | val | test: which stage reads the entry
    conversation: {...}                   # ConversationConfig (samtok.data.conversations)
    seed: 0

:func:`load_mixture` opens every entry (each distinct ``kind`` + ``args`` once), merges the image
records of all entries by ``(source, image_id)`` (the masks of one pool are shared), keeps the
samples of the listed tasks, and applies ``max_samples`` and ``repeat`` with seeded choices.
Pre-tokenization (:mod:`samtok.data.pretokenize`) covers every mask of every record plus the
zoom-in crops the region samples need (:func:`crop_requests`); the datamodules
(:mod:`samtok.data.datamodule`) read the samples. See docs/data.md.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

import numpy as np

from samtok.core.config import ConfigError, load_config
from samtok.data.conversations import (
    TASK_NAMES,
    ConversationBuildError,
    ConversationConfig,
    TurnGroup,
    add_distractor_categories,
    group_turns,
    needs_crop,
    sample_task,
)
from samtok.data.records import (
    ConversationSample,
    ImageRecord,
    InstanceSegSample,
    RecordError,
    RegionCaptionSample,
    TaskSample,
)
from samtok.data.sources import apply_repeat

SPLITS = ("train", "val", "test")


@dataclass
class MixtureEntry:
    """One data set of the mixture (see the module docstring)."""

    name: str = ""  # unique within the mixture
    kind: str = "synthetic"  # an open_source kind: coco | sa1b | refer | grefcoco | gcg | region_caption | multiround | scene_graph | conversation | synthetic
    args: dict[str, Any] = field(default_factory=dict)  # keyword arguments of that kind (paths, split, source...)
    tasks: list[str] = field(default_factory=list)  # res gres gcg region_caption region_vqa mr_seg scene_graph ov_seg conversation; empty: all
    repeat: float = 1.0  # sampling rate (the release's name%NNN / 100)
    split: str = "train"  # train | val | test
    max_samples: Optional[int] = None  # keep a seeded subset of this many samples (before repeat)
    turns_per_image: int = 1  # train entries of res/gres: an image's requests asked in one conversation of up to N turns


@dataclass
class MixtureConfig:
    """A list of entries plus the conversation options shared by all of them."""

    entries: list[MixtureEntry] = field(default_factory=list)
    conversation: ConversationConfig = field(default_factory=ConversationConfig)
    seed: int = 0  # seeds repeats, subsets, distractors and (in the datamodules) templates

    def validate(self) -> "MixtureConfig":
        from samtok.data.formats.registry import KINDS

        names = [e.name for e in self.entries]
        if any(not n for n in names):
            raise ConfigError("mixture: every entry needs a name")
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ConfigError(f"mixture: entry names must be unique, repeated: {dup}")
        for e in self.entries:
            if e.kind not in KINDS:
                raise ConfigError(f"mixture entry {e.name!r}: unknown kind {e.kind!r}; known: {', '.join(KINDS)}")
            bad = [t for t in e.tasks if t not in TASK_NAMES]
            if bad:
                raise ConfigError(f"mixture entry {e.name!r}: unknown task(s) {bad}; known: {', '.join(TASK_NAMES)}")
            if e.split not in SPLITS:
                raise ConfigError(f"mixture entry {e.name!r}: split must be one of {SPLITS}, got {e.split!r}")
            if e.repeat < 0:
                raise ConfigError(f"mixture entry {e.name!r}: repeat must be >= 0, got {e.repeat}")
            if e.max_samples is not None and e.max_samples < 0:
                raise ConfigError(f"mixture entry {e.name!r}: max_samples must be >= 0")
            if e.turns_per_image < 1:
                raise ConfigError(f"mixture entry {e.name!r}: turns_per_image must be >= 1, got {e.turns_per_image}")
            if e.turns_per_image > 1 and (e.split != "train" or not e.tasks or set(e.tasks) - {"res", "gres"}):
                raise ConfigError(f"mixture entry {e.name!r}: turns_per_image > 1 needs split: train and tasks "
                                  f"among [res, gres] (got split {e.split!r}, tasks {e.tasks}); held-out "
                                  "prompts are always asked one per conversation")
        self.conversation.validate()
        return self

    def entries_of(self, splits: Optional[Sequence[str]]) -> list[MixtureEntry]:
        return [e for e in self.entries if splits is None or e.split in splits]


def load_mixture_config(path: str | Path, overrides: Sequence[str] = ()) -> MixtureConfig:
    """A validated :class:`MixtureConfig` from YAML (+ ``key=value`` overrides)."""
    return load_config(MixtureConfig, path, overrides).validate()


def stable_seed(*parts: Any) -> int:
    """A 63-bit seed from any printable parts (the same on every machine and process)."""
    h = hashlib.blake2b(repr(parts).encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(h, "little") % (2**63)


def sample_rng(seed: int, *parts: Any) -> np.random.Generator:
    """The generator for one item: depends only on the seed and the item's identity."""
    return np.random.default_rng(stable_seed(seed, *parts))


# ------------------------------------------------------------------------------------------------


@dataclass
class EntryData:
    """One entry's samples after task filtering, ``max_samples`` and distractors (before repeat)."""

    entry: MixtureEntry
    samples: list[TaskSample]

    def repeated(self, seed: int) -> list[TaskSample | TurnGroup]:
        """The samples (grouped by image when ``turns_per_image`` > 1, before the repeat) with the repeat applied."""
        units: list = self.samples
        if self.entry.turns_per_image > 1:
            try:
                units = group_turns(self.samples, self.entry.turns_per_image)
            except ConversationBuildError as e:
                raise ConfigError(f"mixture entry {self.entry.name!r}: {e}") from None
        return apply_repeat(units, self.entry.repeat, stable_seed(seed, "repeat", self.entry.name))


@dataclass
class MixtureData:
    """Image records (merged by ``(source, image_id)``) and the entries' samples."""

    config: MixtureConfig
    records: dict[tuple[str, str], ImageRecord]
    entries: list[EntryData]

    def record(self, sample: TaskSample) -> ImageRecord:
        key = (sample.source, sample.image_id)
        if key not in self.records:
            raise RecordError(f"{type(sample).__name__} {sample.sample_id}: image {key[0]}/{key[1]} is in no entry's images")
        return self.records[key]

    def items(self, splits: Optional[Sequence[str]] = ("train",), repeat: bool = True) -> list[tuple[str, TaskSample]]:
        """``(entry name, sample)`` of the entries of ``splits``, repeats applied, in entry order."""
        out = []
        for ed in self.entries:
            if splits is not None and ed.entry.split not in splits:
                continue
            samples = ed.repeated(self.config.seed) if repeat else ed.samples
            out += [(ed.entry.name, s) for s in samples]
        return out

    def images(self) -> list[ImageRecord]:
        return [self.records[k] for k in sorted(self.records)]

    def summary(self) -> dict[str, dict[str, int]]:
        """Per entry: samples per task after repeat (for logs)."""
        out = {}
        for ed in self.entries:
            counts: dict[str, int] = {}
            for s in ed.repeated(self.config.seed):
                t = sample_task(s)
                counts[t] = counts.get(t, 0) + 1
            out[ed.entry.name] = counts
        return out


def merge_records(records: Iterable[ImageRecord], into: Optional[dict] = None) -> dict[tuple[str, str], ImageRecord]:
    """Records by ``(source, image_id)``; masks of several readers of one image are united by ann id.

    Two readers disagreeing on an image's size is an error (the masks could not be shared).
    """
    out = {} if into is None else into
    for r in records:
        key = (r.source, r.image_id)
        have = out.get(key)
        if have is None:
            out[key] = ImageRecord(source=r.source, image_id=r.image_id, file_name=r.file_name, height=r.height,
                                   width=r.width, image_root=r.image_root, anns=list(r.anns))
            continue
        if (have.height, have.width) != (r.height, r.width):
            raise RecordError(f"image {key[0]}/{key[1]}: size {have.height}x{have.width} in one entry, "
                              f"{r.height}x{r.width} in another")
        known = {a.ann_id for a in have.anns}
        have.anns += [a for a in r.anns if a.ann_id not in known]
    return out


def _open_entry(entry: MixtureEntry, cache: dict) -> tuple[list[ImageRecord], list[TaskSample]]:
    key = (entry.kind, json.dumps(entry.args, sort_keys=True, default=str))
    if key not in cache:
        if entry.kind == "synthetic":
            # one read gives both (SyntheticSource.images()/samples() would each read the split)
            from samtok.data.formats.registry import SyntheticSource
            from samtok.data.formats.synthetic_layout import read_synthetic_split

            src = SyntheticSource(**entry.args)
            images, samples = read_synthetic_split(Path(src.root), src.split, src.source)
        else:
            from samtok.data.formats.registry import open_source

            src = open_source(entry.kind, **entry.args)
            images, samples = list(src.images()), list(src.samples())
        cache[key] = (images, samples)
    return cache[key]


def load_mixture(cfg: MixtureConfig, splits: Optional[Sequence[str]] = None) -> MixtureData:
    """Open the entries of ``splits`` (None: all) and collect their records and samples."""
    cfg.validate()
    cache: dict = {}
    records: dict[tuple[str, str], ImageRecord] = {}
    entries: list[EntryData] = []
    for entry in cfg.entries_of(splits):
        images, samples = _open_entry(entry, cache)
        merge_records(images, records)
        wanted = set(entry.tasks)
        chosen = [s for s in samples if not wanted or sample_task(s) in wanted]
        if entry.max_samples is not None and len(chosen) > entry.max_samples:
            rng = sample_rng(cfg.seed, "subset", entry.name)
            keep = sorted(rng.choice(len(chosen), size=entry.max_samples, replace=False).tolist())
            chosen = [chosen[i] for i in keep]
        if cfg.conversation.ov_distractors > 0 and any(isinstance(s, InstanceSegSample) for s in chosen):
            pool = sorted({a.category for r in images for a in r.anns if a.category})
            chosen = [add_distractor_categories(s, pool, cfg.conversation.ov_distractors,
                                                sample_rng(cfg.seed, "distractors", entry.name, s.sample_id))
                      if isinstance(s, InstanceSegSample) else s for s in chosen]
        entries.append(EntryData(entry, chosen))
    data = MixtureData(cfg, records, entries)
    for ed in entries:
        for s in ed.samples:
            if isinstance(s, ConversationSample) and not s.image_id:
                continue
            data.record(s)  # raises for a sample whose image no entry holds
    return data


def crop_requests(data: MixtureData, cfg: Optional[ConversationConfig] = None) -> dict[tuple[str, str], list[str]]:
    """``(source, image_id) → ann ids`` of regions that may be shown with a zoom-in view.

    A region sample's mask is listed when its box area ratio is below the larger of the training
    and evaluation thresholds, so one table serves SFT, RL and evaluation.
    """
    cfg = cfg or data.config.conversation
    out: dict[tuple[str, str], set[str]] = {}
    for ed in data.entries:
        for s in ed.samples:
            if not isinstance(s, RegionCaptionSample):
                continue
            record = data.record(s)
            if needs_crop(record.box(s.ann_id), record.width, record.height, cfg.max_crop_ratio):
                out.setdefault((s.source, s.image_id), set()).add(s.ann_id)
    return {k: sorted(v) for k, v in sorted(out.items())}
