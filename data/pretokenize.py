"""Pre-tokenization: every mask of a data set → its two codes, once, into an Arrow table.

    samtok pretokenize --tokenizer runs/tokenizer/final --data configs/data/synth_mixture.yaml --out runs/pretok

What is encoded (:func:`plan_units`): every mask of every image record of the data (a COCO JSON,
or all entries of a mixture), plus the zoom-in crop variant of each region a region task may show
with a second image (key ``ann_id + "@crop"``, pixels from
:func:`samtok.data.conversations.region_crop_box`). A *unit* is one image (or one crop image) with
the masks to encode on it: its image embedding is computed once and shared by all its masks.

How (:func:`pretokenize`): Lightning's predict loop. :class:`UnitDataset` reads an image, resizes it
to the tokenizer's S x S input and prepares each mask's prompt (box, dense prompt) in DataLoader
workers; ``predict_step`` runs the image encoder once per batch of images, then the mask encoder
and quantizer on the masks in chunks (:func:`encode_batch`, the same computation as
``SAMTokenizer.encode``). Each rank handles a disjoint set of units (``units[rank::world]``).

Output (``--out DIR``)::

    shards/part-*.arrow   Arrow IPC streams: source, image_id, ann_id (string), c0, c1 (int32);
                          schema metadata: the tokenizer fingerprint and crop settings
    tmp/                  shards being written (ignored, cleaned at start)
    manifest.json         written last: fingerprint, crop settings, shard list, row count
    DONE                  marker for make

Crash safety: a shard is written under ``tmp/``, flushed and fsync'ed, then renamed into
``shards/`` (atomic) and the directory fsync'ed; only names in ``shards/`` count. A run killed at
any moment (kill -9) leaves complete shards and ignorable temp files; running again reads the keys
of the committed shards and encodes only what is missing, so no row is lost or written twice.
Ranks launched for a multi-device run die with the launcher (``PR_SET_PDEATHSIG``), and every
process of a run holds ``.writers`` (shared): a new run waits until no process of an old one
holds it before it scans, so a killed run can never write behind the next one's back
(:class:`RunLocks`). The manifest and DONE are written after every rank has finished and
coverage was checked.

Reading (:func:`load_pretokenized` → ``datasets.Dataset`` sorted by key; :func:`load_code_table` →
:class:`CodeTable`, a compact lookup ``(source, image_id, ann_id) → (c0, c1)``). A table made by
another tokenizer than the one a stage is configured with is refused
(:class:`PretokenizedMismatchError`).
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Mapping, Optional, Sequence

import numpy as np

from samtok.core.errors import SamtokError
from samtok.data.conversations import CROP_SUFFIX, crop_key, crop_mask, region_crop_box
from samtok.data.records import ImageRecord
from samtok.tokenizer.codec import MaskCodec

if TYPE_CHECKING:  # pragma: no cover
    import datasets
    import pyarrow as pa

FORMAT_NAME = "samtok-pretokenized"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
DONE = "DONE"
SHARDS_DIR = "shards"
TMP_DIR = "tmp"
LOCK_FILE = ".lock"  # held (exclusive) by the launching process of a run
WRITERS_FILE = ".writers"  # held (shared) by every process of a run that may write shards
KEY_COLUMNS = ("source", "image_id", "ann_id")
COLUMNS = KEY_COLUMNS + ("c0", "c1")
META_FINGERPRINT = b"samtok.fingerprint"
META_CROP = b"samtok.crop"
_SEP = "\x1f"


class MissingCodeError(SamtokError):
    """A mask a conversation needs is not in the pre-tokenized table."""


class PretokenizedMismatchError(SamtokError):
    """A pre-tokenized table was made by another tokenizer (or with other crop settings)."""


class PretokenizedTableError(SamtokError):
    """An output folder is not a (complete) pre-tokenized table, or its shards disagree."""


# ------------------------------------------------------------------------------------------------
# keys and the lookup table


def join_key(source: str, image_id: str, ann_id: str) -> bytes:
    """One byte string per key (the unit separator never occurs in ids)."""
    return f"{source}{_SEP}{image_id}{_SEP}{ann_id}".encode("utf-8")


def split_key(key: bytes) -> tuple[str, str, str]:
    s, i, a = key.decode("utf-8").split(_SEP)
    return s, i, a


class CodeTable:
    """``(source, image_id, ann_id) → (c0, c1)`` for millions of masks in a few numpy arrays.

    Keys are a sorted fixed-width byte array (binary search per lookup): compact, and shared
    copy-on-write by forked DataLoader workers (no per-row Python objects to touch).

    Args:
        keys: sorted unique byte keys (:func:`join_key`).
        c0, c1: codes, aligned with ``keys``.
        fingerprint: the tokenizer's fingerprint (``SAMTokenizer.fingerprint``).
        crop_spec: the crop settings the ``@crop`` rows were made with.
        codebook_size: of the codec that writes spans.
    """

    def __init__(self, keys: np.ndarray, c0: np.ndarray, c1: np.ndarray, fingerprint: str = "",
                 crop_spec: Optional[dict] = None, codebook_size: int = 256, where: str = "codes"):
        self.keys = keys
        self.c0 = np.asarray(c0, dtype=np.int32)
        self.c1 = np.asarray(c1, dtype=np.int32)
        self.fingerprint = fingerprint
        self.crop_spec = crop_spec
        self.codec = MaskCodec(codebook_size)
        self.where = where

    # ---------------------------------------------------------------- construction
    @classmethod
    def from_columns(cls, source: Sequence[str], image_id: Sequence[str], ann_id: Sequence[str],
                     c0: Sequence[int], c1: Sequence[int], **kwargs: Any) -> "CodeTable":
        raw = [join_key(s, i, a) for s, i, a in zip(source, image_id, ann_id)]
        keys = np.array(raw, dtype=np.bytes_) if raw else np.array([], dtype="S1")
        order = np.argsort(keys, kind="stable")
        keys = keys[order]
        if len(keys) > 1:
            dup = np.flatnonzero(keys[1:] == keys[:-1])
            if len(dup):
                raise PretokenizedTableError(f"duplicate key {split_key(keys[dup[0]])} in the code table")
        return cls(keys, np.asarray(c0, dtype=np.int32)[order], np.asarray(c1, dtype=np.int32)[order], **kwargs)

    @classmethod
    def from_dict(cls, codes: Mapping[tuple[str, str, str], Sequence[int]], **kwargs: Any) -> "CodeTable":
        items = list(codes.items())
        return cls.from_columns([k[0] for k, _ in items], [k[1] for k, _ in items], [k[2] for k, _ in items],
                                [int(v[0]) for _, v in items], [int(v[1]) for _, v in items], **kwargs)

    @classmethod
    def from_arrow(cls, table: "pa.Table", **kwargs: Any) -> "CodeTable":
        import pyarrow as pa
        import pyarrow.compute as pc

        if table.num_rows == 0:
            return cls(np.array([], dtype="S1"), np.zeros(0, np.int32), np.zeros(0, np.int32), **kwargs)
        joined = pc.binary_join_element_wise(*(table.column(c) for c in KEY_COLUMNS), _SEP).cast(pa.binary())
        keys = np.array(joined.to_numpy(zero_copy_only=False), dtype=np.bytes_)
        c0 = table.column("c0").to_numpy()
        c1 = table.column("c1").to_numpy()
        order = np.argsort(keys, kind="stable")
        keys = keys[order]
        dup = np.flatnonzero(keys[1:] == keys[:-1])
        if len(dup):
            raise PretokenizedTableError(f"duplicate key {split_key(keys[dup[0]])} in the code table")
        return cls(keys, c0[order], c1[order], **kwargs)

    # ---------------------------------------------------------------- lookup
    def __len__(self) -> int:
        return int(len(self.keys))

    def _index(self, source: str, image_id: str, ann_id: str) -> int:
        key = join_key(source, image_id, ann_id)
        i = int(np.searchsorted(self.keys, key))
        if i < len(self.keys) and self.keys[i] == key:
            return i
        return -1

    def __contains__(self, key: tuple[str, str, str]) -> bool:
        return self._index(*key) >= 0

    def get(self, source: str, image_id: str, ann_id: str) -> tuple[int, int]:
        """The codes of a mask; :class:`MissingCodeError` when it was not pre-tokenized."""
        i = self._index(source, image_id, ann_id)
        if i < 0:
            what = "zoom-in crop of mask" if ann_id.endswith(CROP_SUFFIX) else "mask"
            raise MissingCodeError(
                f"{what} {source}/{image_id}/{ann_id.removesuffix(CROP_SUFFIX)} is not in {self.where}: run "
                "`samtok pretokenize` on the data (or mixture) this stage uses")
        return int(self.c0[i]), int(self.c1[i])

    def span(self, source: str, image_id: str, ann_id: str) -> str:
        """The mask's text: ``<|mt_start|><|mt_AAAA|><|mt_BBBB|><|mt_end|>``."""
        c0, c1 = self.get(source, image_id, ann_id)
        return self.codec.format(c0, c1)

    def check_tokenizer(self, tokenizer: str | Path | Any) -> None:
        """Refuse a table made by another tokenizer (a directory, a ``SAMTokenizer`` or a fingerprint)."""
        check_fingerprint(self.fingerprint, tokenizer, self.where)


def tokenizer_fingerprint(tokenizer: str | Path | Any) -> tuple[str, str]:
    """``(fingerprint, description)`` of a tokenizer directory, a ``SAMTokenizer`` or a fingerprint string."""
    if hasattr(tokenizer, "fingerprint"):
        return str(tokenizer.fingerprint), str(getattr(tokenizer, "path", "") or "tokenizer")
    p = Path(str(tokenizer))
    if p.is_dir():
        from samtok.tokenizer.checkpoints import file_fingerprint

        return file_fingerprint(p), str(p)
    return str(tokenizer), "fingerprint"


def check_fingerprint(table_fingerprint: str, tokenizer: str | Path | Any, where: str = "the table") -> None:
    want, desc = tokenizer_fingerprint(tokenizer)
    if table_fingerprint != want:
        raise PretokenizedMismatchError(
            f"{where} was made by the tokenizer with fingerprint {table_fingerprint}, but this stage uses "
            f"{desc} (fingerprint {want}): its mask codes would be wrong. Re-run `samtok pretokenize "
            f"--tokenizer {desc} --out NEW_DIR` and point the stage at NEW_DIR")


# ------------------------------------------------------------------------------------------------
# shards on disk


def _schema(fingerprint: str, crop_spec: Optional[dict]) -> "pa.Schema":
    import pyarrow as pa

    return pa.schema(
        [pa.field(c, pa.string()) for c in KEY_COLUMNS] + [pa.field("c0", pa.int32()), pa.field("c1", pa.int32())],
        metadata={META_FINGERPRINT: fingerprint.encode(), META_CROP: json.dumps(crop_spec, sort_keys=True).encode()},
    )


def _fsync_dir(path: Path) -> None:
    fd = os.open(str(path), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def write_shard(out_dir: str | Path, name: str, rows: Mapping[str, Sequence], fingerprint: str,
                crop_spec: Optional[dict]) -> Path:
    """Commit one shard atomically: write ``tmp/name.part``, fsync, rename to ``shards/name``, fsync the folder."""
    import pyarrow as pa

    out = Path(out_dir)
    (out / TMP_DIR).mkdir(parents=True, exist_ok=True)
    (out / SHARDS_DIR).mkdir(parents=True, exist_ok=True)
    schema = _schema(fingerprint, crop_spec)
    table = pa.table({c: rows[c] for c in COLUMNS}, schema=schema)
    tmp = out / TMP_DIR / f"{name}.part"
    with open(tmp, "wb") as fh:
        with pa.ipc.new_stream(fh, schema) as writer:
            writer.write_table(table)
        fh.flush()
        os.fsync(fh.fileno())
    final = out / SHARDS_DIR / name
    os.replace(tmp, final)
    _fsync_dir(final.parent)
    return final


def read_shard(path: str | Path) -> "pa.Table":
    import pyarrow as pa

    try:
        with pa.memory_map(str(path), "r") as source:
            return pa.ipc.open_stream(source).read_all()
    except (pa.ArrowInvalid, OSError) as exc:
        raise PretokenizedTableError(f"cannot read shard {path} ({exc}); delete it and run pretokenize again") from exc


def shard_meta(table: "pa.Table") -> tuple[str, Optional[dict]]:
    meta = table.schema.metadata or {}
    fp = meta.get(META_FINGERPRINT, b"").decode()
    crop = json.loads(meta.get(META_CROP, b"null").decode())
    return fp, crop


def committed_shards(out_dir: str | Path) -> list[Path]:
    d = Path(out_dir) / SHARDS_DIR
    return sorted(d.glob("part-*.arrow")) if d.is_dir() else []


@dataclass
class ShardScan:
    """What the committed shards of a folder hold."""

    keys: set[bytes] = field(default_factory=set)
    shards: list[tuple[Path, int]] = field(default_factory=list)  # (path, rows)
    fingerprint: Optional[str] = None
    crop_spec: Optional[dict] = None
    duplicates: int = 0


def scan_shards(out_dir: str | Path) -> ShardScan:
    """Keys, row counts and metadata of every committed shard; shards must agree on their metadata."""
    scan = ShardScan()
    for path in committed_shards(out_dir):
        table = read_shard(path)
        fp, crop = shard_meta(table)
        if scan.fingerprint is None:
            scan.fingerprint, scan.crop_spec = fp, crop
        elif (fp, crop) != (scan.fingerprint, scan.crop_spec):
            raise PretokenizedTableError(f"{path}: made by tokenizer {fp} / crops {crop}, other shards by "
                                         f"{scan.fingerprint} / {scan.crop_spec}")
        cols = [table.column(c).to_pylist() for c in KEY_COLUMNS]
        for s, i, a in zip(*cols):
            k = join_key(s, i, a)
            if k in scan.keys:
                scan.duplicates += 1
            scan.keys.add(k)
        scan.shards.append((path, table.num_rows))
    return scan


def read_manifest(out_dir: str | Path) -> dict:
    p = Path(out_dir) / MANIFEST
    if not p.is_file():
        raise PretokenizedTableError(
            f"{Path(out_dir)} is not a complete pre-tokenized table (no {MANIFEST}); run `samtok pretokenize "
            "--out` on it (an interrupted run resumes where it stopped)")
    manifest = json.loads(p.read_text())
    if manifest.get("format") != FORMAT_NAME:
        raise PretokenizedTableError(f"{p}: 'format' must be {FORMAT_NAME!r}")
    return manifest


def _read_table(out_dir: str | Path) -> tuple["pa.Table", dict]:
    import pyarrow as pa

    out = Path(out_dir)
    manifest = read_manifest(out)
    tables = []
    for shard in manifest["shards"]:
        path = out / shard["file"]
        if not path.is_file():
            raise PretokenizedTableError(f"{out}: shard {shard['file']} listed in {MANIFEST} is missing")
        t = read_shard(path)
        fp, crop = shard_meta(t)
        if fp != manifest["fingerprint"]:
            raise PretokenizedTableError(f"{path}: fingerprint {fp} differs from the manifest's {manifest['fingerprint']}")
        tables.append(t.replace_schema_metadata(None))
    table = pa.concat_tables(tables) if tables else _schema("", None).empty_table().replace_schema_metadata(None)
    table = table.sort_by([(c, "ascending") for c in KEY_COLUMNS])
    return table, manifest


def load_pretokenized(out_dir: str | Path, tokenizer: str | Path | Any = None) -> "datasets.Dataset":
    """The table as a ``datasets.Dataset`` (columns source, image_id, ann_id, c0, c1; sorted by key).

    ``ds.info.description`` is JSON with ``fingerprint`` and ``crop`` (see :func:`table_info`).
    With ``tokenizer`` (a directory, a ``SAMTokenizer`` or a fingerprint) a table made by another
    tokenizer is refused with :class:`PretokenizedMismatchError`.
    """
    import datasets

    table, manifest = _read_table(out_dir)
    if tokenizer is not None:
        check_fingerprint(manifest["fingerprint"], tokenizer, str(out_dir))
    info = datasets.DatasetInfo(description=json.dumps(
        {"format": FORMAT_NAME, "fingerprint": manifest["fingerprint"], "crop": manifest.get("crop"),
         "tokenizer": manifest.get("tokenizer", "")}, sort_keys=True))
    return datasets.Dataset(table, info=info)


def table_info(ds: "datasets.Dataset") -> dict:
    """``{"fingerprint", "crop", "tokenizer"}`` of a dataset from :func:`load_pretokenized`."""
    try:
        info = json.loads(ds.info.description or "{}")
    except json.JSONDecodeError:
        info = {}
    if info.get("format") != FORMAT_NAME:
        raise PretokenizedTableError("this dataset was not made by load_pretokenized")
    return info


def load_code_table(out_dir: str | Path, tokenizer: str | Path | Any = None, codebook_size: int = 256) -> CodeTable:
    """The lookup table of a pre-tokenized folder (fingerprint checked when ``tokenizer`` is given)."""
    table, manifest = _read_table(out_dir)
    if tokenizer is not None:
        check_fingerprint(manifest["fingerprint"], tokenizer, str(out_dir))
    return CodeTable.from_arrow(table, fingerprint=manifest["fingerprint"], crop_spec=manifest.get("crop"),
                                codebook_size=codebook_size, where=f"the pre-tokenized table {out_dir}")


# ------------------------------------------------------------------------------------------------
# what to encode


@dataclass
class EncodeUnit:
    """One image (``crop`` None) or one zoom-in crop image, and the masks to encode on it.

    ``masks`` are ``(key ann id, segmentation)``; for a crop, the key is ``ann_id@crop`` and the
    segmentation the full-image mask's (cropped and resized when loaded).
    """

    source: str
    image_id: str
    path: str
    height: int
    width: int
    masks: list[tuple[str, Any]]
    crop: Optional[tuple[int, int, int, int]] = None
    min_short_side: int = 0

    @property
    def keys(self) -> list[bytes]:
        return [join_key(self.source, self.image_id, k) for k, _ in self.masks]

    @property
    def sort_key(self) -> tuple:
        return (self.source, self.image_id, self.crop is not None, self.masks[0][0] if self.crop else "")


def plan_units(records: Iterable[ImageRecord], crops: Mapping[tuple[str, str], Sequence[str]] = (),
               crop_spec: Optional[dict] = None) -> list[EncodeUnit]:
    """One unit per image with masks and one per requested crop, sorted by key (deterministic)."""
    crops = dict(crops or {})
    spec = crop_spec or {"min_side": 140, "context": 1.5, "min_short_side": 280}
    units: list[EncodeUnit] = []
    for r in records:
        if r.anns:
            units.append(EncodeUnit(r.source, r.image_id, str(r.path), r.height, r.width,
                                    [(a.ann_id, a.segmentation) for a in r.anns]))
        for ann_id in crops.get((r.source, r.image_id), []):
            box = r.box(ann_id)
            crop = region_crop_box(box, r.width, r.height, spec["min_side"], spec["context"])
            units.append(EncodeUnit(r.source, r.image_id, str(r.path), r.height, r.width,
                                    [(crop_key(ann_id), r.ann(ann_id).segmentation)], crop=crop,
                                    min_short_side=int(spec["min_short_side"])))
    units.sort(key=lambda u: u.sort_key)
    return units


def remaining_units(units: Sequence[EncodeUnit], done: set[bytes]) -> list[EncodeUnit]:
    """The units with the masks not yet in ``done`` (units with none left are dropped)."""
    out = []
    for u in units:
        left = [(k, seg) for (k, seg), key in zip(u.masks, u.keys) if key not in done]
        if left:
            out.append(EncodeUnit(u.source, u.image_id, u.path, u.height, u.width, left, u.crop, u.min_short_side))
    return out


def shard_for_rank(units: Sequence[EncodeUnit], rank: int, world_size: int) -> list[EncodeUnit]:
    """This rank's disjoint share of the units."""
    return list(units[rank::world_size])


# ------------------------------------------------------------------------------------------------
# encoding (plain torch)


class UnitDataset:
    """Map-style dataset of units → ``{"keys", "image" (3,S,S), "boxes" (N,4), "prompts" (N,1,P,P)}``.

    Does in DataLoader workers exactly what ``SAMTokenizer.encode`` does before the networks:
    the image resized to S x S (bicubic, [0,1]), each mask's inclusive box scaled to S, and its
    dense prompt (bilinear antialiased resize to the prompt encoder's P x P input).
    """

    def __init__(self, units: Sequence[EncodeUnit], image_size: int, prompt_size: int, dummy: bool = False):
        self.units = list(units)
        self.image_size = image_size
        self.prompt_size = prompt_size
        self.dummy = dummy  # encode but return no keys (a rank with nothing to do still joins the loop)

    def __len__(self) -> int:
        return len(self.units)

    def __getitem__(self, i: int) -> dict:
        import torch
        import torch.nn.functional as F

        from samtok.core.images import load_image
        from samtok.core.masks import as_bool_mask, decode_segmentation, masks_to_boxes
        from samtok.data.conversations import ImageRef, load_image_ref
        from samtok.tokenizer.api import resize_image

        u = self.units[i]
        where = f"{u.source}/{u.image_id}"
        if u.crop is None:
            rgb = load_image(u.path)
            if rgb.shape[:2] != (u.height, u.width):
                raise PretokenizedTableError(f"{where}: image {u.path} is {rgb.shape[0]}x{rgb.shape[1]}, "
                                             f"the annotations say {u.height}x{u.width}")
        else:
            rgb = np.asarray(load_image_ref(ImageRef(u.path, u.crop, u.min_short_side)))
        h, w = rgb.shape[:2]
        boxes, prompts = [], []
        for key, seg in u.masks:
            m = as_bool_mask(decode_segmentation(seg, u.height, u.width, where=f"{where}/{key}"), where=f"{where}/{key}")
            if u.crop is not None:
                m = crop_mask(m, u.crop, u.min_short_side)
            if not m.any():
                raise PretokenizedTableError(f"{where}/{key}: empty mask (an empty mask has no tokens)")
            t = torch.from_numpy(np.ascontiguousarray(m))[None]
            scale = torch.tensor([self.image_size / w, self.image_size / h, self.image_size / w, self.image_size / h])
            boxes.append(masks_to_boxes(t)[0] * scale)
            p = t[None].float()
            if tuple(p.shape[-2:]) != (self.prompt_size, self.prompt_size):
                p = F.interpolate(p, size=(self.prompt_size, self.prompt_size), mode="bilinear",
                                  align_corners=False, antialias=True)
            prompts.append(p[0])
        return {
            "keys": [] if self.dummy else [(u.source, u.image_id, k) for k, _ in u.masks],
            "image": resize_image(rgb, self.image_size),
            "boxes": torch.stack(boxes),
            "prompts": torch.stack(prompts),
        }


def collate_units(items: Sequence[dict]) -> dict:
    import torch

    return {"keys": [it["keys"] for it in items], "images": torch.stack([it["image"] for it in items]),
            "boxes": [it["boxes"] for it in items], "prompts": [it["prompts"] for it in items]}


def encode_batch(model, batch: Mapping[str, Any], mask_batch_size: int = 64) -> list[tuple[str, str, str, int, int]]:
    """Rows ``(source, image_id, ann_id, c0, c1)`` of a collated batch: one image-encoder pass for all
    the batch's images, then the masks of each image in chunks (as ``SAMTokenizer.encode_with_features``)."""
    import torch

    device = next(model.parameters()).device
    autocast = (torch.autocast(device_type=device.type, dtype=torch.bfloat16) if device.type == "cuda"
                else torch.autocast(device_type=device.type, enabled=False))
    rows: list[tuple[str, str, str, int, int]] = []
    with torch.no_grad():
        images = batch["images"].to(device)
        with autocast:
            feats = model.encode_image(model.normalize(images))
        for k, (keys, boxes, prompts) in enumerate(zip(batch["keys"], batch["boxes"], batch["prompts"])):
            codes = []
            for b, p in zip(boxes.split(mask_batch_size), prompts.split(mask_batch_size)):
                idx = torch.full((b.shape[0],), k, dtype=torch.long, device=device)
                with autocast:
                    z = model.encode_masks(feats, idx, p.to(device), b.to(device))
                codes.append(model.quantizer.encode(z.float()).cpu())
            codes_t = torch.cat(codes)
            for (s, i, a), c in zip(keys, codes_t.tolist()):
                rows.append((s, i, a, int(c[0]), int(c[1]) if len(c) > 1 else -1))
    return rows


class ShardWriter:
    """Buffers rows and commits a shard every ``shard_rows`` rows (and at :meth:`flush`)."""

    def __init__(self, out_dir: str | Path, fingerprint: str, crop_spec: Optional[dict], shard_rows: int,
                 rank: int = 0):
        self.out_dir = Path(out_dir)
        self.fingerprint, self.crop_spec = fingerprint, crop_spec
        self.shard_rows = max(1, int(shard_rows))
        self.rank = rank
        self.buffer: list[tuple] = []
        self.committed: list[Path] = []
        self.rows_written = 0
        self._run = f"{int(time.time() * 1000):013d}-{os.getpid()}"

    def add(self, rows: Iterable[tuple]) -> None:
        self.buffer.extend(rows)
        if len(self.buffer) >= self.shard_rows:
            self.flush()

    def flush(self) -> Optional[Path]:
        if not self.buffer:
            return None
        cols = list(zip(*self.buffer))
        name = f"part-{self._run}-r{self.rank:03d}-{len(self.committed):06d}.arrow"
        path = write_shard(self.out_dir, name, dict(zip(COLUMNS, cols)), self.fingerprint, self.crop_spec)
        self.rows_written += len(self.buffer)
        self.committed.append(path)
        self.buffer = []
        return path


# ------------------------------------------------------------------------------------------------
# the job


@dataclass
class PretokenizeConfig:
    """``samtok pretokenize``: every key can be given as a flag or as ``key=value``."""

    tokenizer: str = ""  # tokenizer directory (SAMTokenizer.save_pretrained)
    data: str = ""  # a COCO instances JSON, or a mixture YAML (configs/data/*.yaml)
    out: str = ""  # output folder
    source: str = "coco"  # mask-pool name of a COCO JSON's records
    image_root: Optional[str] = None  # images of a COCO JSON (default: the JSON's folder)
    splits: list[str] = field(default_factory=list)  # mixture entries to cover (empty: all splits)
    batch_size: int = 8  # images (units) per predict step: one image-encoder pass
    mask_batch_size: int = 64  # masks per mask-encoder chunk
    shard_rows: int = 20000  # rows per committed shard (the resume granularity)
    num_workers: int = 0  # DataLoader workers per rank (image reading, mask decoding)
    accelerator: str = "auto"  # auto | cpu | gpu
    devices: str = "auto"  # "auto", a count, or a list "0,1"
    strategy: str = "auto"  # auto | ddp (one process per device, launched by Lightning)
    num_nodes: int = 1
    threads: int = 0  # torch intra-op threads on CPU (0: torch's default)
    overwrite: bool = False  # delete an existing table in `out` first
    progress: bool = True  # progress bar (masks/s) on rank 0


@dataclass
class PretokenizeResult:
    rows: int  # rows in the table
    encoded: int  # masks this run encoded (all ranks)
    seconds: float  # encoding, including loading the model and starting the Trainer
    images: int  # units encoded by this run (images + crops)
    loop_seconds: float = 0.0  # the predict loop alone (rank 0)
    loop_masks: int = 0  # masks rank 0 encoded in the loop

    @property
    def masks_per_second(self) -> float:
        """Throughput of the predict loop: all masks encoded over rank 0's loop time (ranks run in parallel)."""
        if self.loop_seconds > 0:
            return self.encoded / self.loop_seconds
        return self.encoded / self.seconds if self.seconds > 0 else 0.0


def _is_launcher() -> bool:
    """True in the process that was started by the user (not a rank Lightning launched)."""
    return int(os.environ.get("LOCAL_RANK", "0") or 0) == 0 and int(os.environ.get("NODE_RANK", "0") or 0) == 0


def _die_with_parent() -> None:
    """Linux: a launched rank is killed when its parent dies (a ``kill -9`` of the launcher must not
    leave ranks writing shards while the next run starts)."""
    import signal
    import sys

    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # pragma: no cover - no prctl
        return
    if os.getppid() == 1:  # the parent died before prctl took effect
        os._exit(1)


class RunLocks:
    """Locks on the output folder. The launcher holds ``.lock`` exclusively (one job per folder) and
    waits until no process of an earlier run holds ``.writers`` before it scans and cleans; every
    process of a run then holds ``.writers`` shared while it may write."""

    def __init__(self, out: Path, launcher: bool, wait_s: float = 60.0):
        self.out, self.launcher, self.wait_s = out, launcher, wait_s
        self.files: list = []

    def __enter__(self) -> "RunLocks":
        if self.launcher:
            lock = open(self.out / LOCK_FILE, "a+")
            self.files.append(lock)
            try:
                fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                self.close()
                raise SamtokError(f"{self.out} is being written by another pretokenize job") from exc
            writers = open(self.out / WRITERS_FILE, "a+")
            self.files.append(writers)
            deadline = time.monotonic() + self.wait_s
            while True:
                try:
                    fcntl.flock(writers.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except OSError as exc:
                    if time.monotonic() > deadline:
                        self.close()
                        raise SamtokError(f"processes of an interrupted run still write to {self.out}; "
                                          "stop them first") from exc
                    time.sleep(0.2)
            fcntl.flock(writers.fileno(), fcntl.LOCK_SH)
        else:
            _die_with_parent()
            writers = open(self.out / WRITERS_FILE, "a+")
            self.files.append(writers)
            fcntl.flock(writers.fileno(), fcntl.LOCK_SH)
        return self

    def close(self) -> None:
        for f in reversed(self.files):
            f.close()
        self.files = []

    def __exit__(self, *exc) -> None:
        self.close()


def load_plan(cfg: PretokenizeConfig) -> tuple[list[EncodeUnit], dict, str]:
    """Units to encode, the crop settings, and a description of the data."""
    data = Path(cfg.data)
    if not data.is_file():
        raise FileNotFoundError(f"--data: file not found: {data}")
    if data.suffix in (".yaml", ".yml"):
        from samtok.data.mixture import crop_requests, load_mixture, load_mixture_config

        mix = load_mixture_config(data)
        mdata = load_mixture(mix, splits=cfg.splits or None)
        spec = mix.conversation.crop_spec()
        return plan_units(mdata.images(), crop_requests(mdata), spec), spec, f"mixture {data}"
    if data.suffix == ".json":
        from samtok.data.formats.registry import open_source
        from samtok.data.mixture import merge_records

        args: dict[str, Any] = {"instances": str(data), "source": cfg.source}
        if cfg.image_root:
            args["image_root"] = cfg.image_root
        records = merge_records(open_source("coco", **args).images())
        spec = {"min_side": 140, "context": 1.5, "min_short_side": 280}
        return plan_units([records[k] for k in sorted(records)], {}, spec), spec, f"coco {data}"
    raise SamtokError(f"--data must be a COCO instances .json or a mixture .yaml, got {data}")


def _prepare_out(out: Path, fingerprint: str, crop_spec: dict, overwrite: bool) -> None:
    """Launcher only: clean temp files of killed runs, refuse a table of another tokenizer."""
    if overwrite:
        for name in (SHARDS_DIR, TMP_DIR):
            shutil.rmtree(out / name, ignore_errors=True)
        for name in (MANIFEST, DONE):
            (out / name).unlink(missing_ok=True)
    shutil.rmtree(out / TMP_DIR, ignore_errors=True)
    for stale in out.glob(f".{MANIFEST}.*.tmp"):
        stale.unlink(missing_ok=True)
    (out / SHARDS_DIR).mkdir(parents=True, exist_ok=True)
    scan = scan_shards(out)
    if scan.fingerprint is not None and scan.fingerprint != fingerprint:
        raise PretokenizedMismatchError(
            f"{out} holds codes of the tokenizer with fingerprint {scan.fingerprint}, not of this one ({fingerprint}): "
            "use another --out, or --overwrite")
    if scan.fingerprint is not None and scan.crop_spec != crop_spec:
        raise PretokenizedMismatchError(
            f"{out} holds crops made with {scan.crop_spec}, this mixture asks for {crop_spec}: use another --out, or --overwrite")


def finalize(out: Path, units: Sequence[EncodeUnit], fingerprint: str, crop_spec: dict, tokenizer: str,
             data_desc: str) -> int:
    """Check that every planned key is present exactly once, then write the manifest and DONE (last)."""
    scan = scan_shards(out)
    if scan.duplicates:
        raise PretokenizedTableError(f"{out}: {scan.duplicates} duplicate key(s) across shards")
    missing = [k for u in units for k in u.keys if k not in scan.keys]
    if missing:
        raise PretokenizedTableError(f"{out}: {len(missing)} planned mask(s) missing after the run, e.g. "
                                     f"{split_key(missing[0])}")
    rows = sum(n for _, n in scan.shards)
    manifest = {
        "format": FORMAT_NAME, "version": FORMAT_VERSION, "fingerprint": fingerprint, "crop": crop_spec,
        "tokenizer": str(tokenizer), "data": data_desc, "rows": rows, "columns": list(COLUMNS),
        "shards": [{"file": f"{SHARDS_DIR}/{p.name}", "rows": n} for p, n in scan.shards],
    }
    _atomic_write_text(out / MANIFEST, json.dumps(manifest, indent=1) + "\n")
    _atomic_write_text(out / DONE, json.dumps({"rows": rows, "fingerprint": fingerprint}) + "\n")
    return rows


def pretokenize(cfg: PretokenizeConfig) -> PretokenizeResult:
    """Run (or resume) pre-tokenization; returns counts and the throughput of this run."""
    import torch

    from samtok.core.runtime import get_logger
    from samtok.tokenizer.checkpoints import file_fingerprint, read_tokenizer_config

    log = get_logger("samtok.data.pretokenize")
    if not cfg.tokenizer or not cfg.data or not cfg.out:
        raise SamtokError("pretokenize needs --tokenizer, --data and --out")
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    read_tokenizer_config(cfg.tokenizer)  # a clear error for a folder that is not a tokenizer
    fingerprint = file_fingerprint(cfg.tokenizer)
    if cfg.strategy not in ("auto", "ddp"):
        raise SamtokError(f"pretokenize strategy must be 'auto' or 'ddp', got {cfg.strategy!r}")
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    launcher = _is_launcher()
    with RunLocks(out, launcher):
        t0 = time.perf_counter()
        units, crop_spec, data_desc = load_plan(cfg)
        if launcher:
            _prepare_out(out, fingerprint, crop_spec, cfg.overwrite)
            todo = remaining_units(units, scan_shards(out).keys)
        else:
            todo = units  # launched ranks decide in setup, after the launcher prepared the folder
        n_masks = sum(len(u.masks) for u in todo)
        log.info("%s: %d units (%d masks) planned, %d units (%d masks) to encode",
                 data_desc, len(units), sum(len(u.masks) for u in units), len(todo), n_masks)
        encoded, seconds, loop = 0, 0.0, (0, 0.0)
        distributed_env = int(os.environ.get("WORLD_SIZE", "1") or 1) > 1  # torchrun / SLURM: every rank joins
        if todo or not launcher or distributed_env:
            if launcher:
                (out / DONE).unlink(missing_ok=True)
            t1 = time.perf_counter()
            loop = _predict(cfg, units, out, fingerprint, crop_spec)
            seconds = time.perf_counter() - t1
            encoded = n_masks
        if not launcher:
            return PretokenizeResult(0, encoded, seconds, 0, loop[1], loop[0])
        rows = finalize(out, units, fingerprint, crop_spec, str(Path(cfg.tokenizer).resolve()), data_desc)
        result = PretokenizeResult(rows, encoded, seconds, len(todo), loop[1], loop[0])
        if encoded:
            log.info("encoded %d masks (%d images and crops) in %.1f s, predict loop %.1f masks/s; table: %d rows in %s",
                     encoded, len(todo), seconds, result.masks_per_second, rows, out)
        else:
            log.info("nothing to encode; table: %d rows in %s (%.1f s)", rows, out, time.perf_counter() - t0)
        return result


# ------------------------------------------------------------------------------------------------
# the Lightning wrapper


def _lightning_classes():
    """Defined on first use so that importing this module does not import Lightning."""
    import lightning as L
    from lightning.pytorch.callbacks import BasePredictionWriter

    class PretokenizeModule(L.LightningModule):
        """``predict_step``: one batch of units → rows (:func:`encode_batch`)."""

        def __init__(self, model, mask_batch_size: int):
            super().__init__()
            self.model = model.eval()
            self.mask_batch_size = mask_batch_size

        def predict_step(self, batch, batch_idx, dataloader_idx=0):
            return encode_batch(self.model, batch, self.mask_batch_size)

    class UnitDataModule(L.LightningDataModule):
        """Scans the committed shards in ``setup`` (every rank, before any rank writes: a barrier
        follows), then serves this rank's share of the remaining units."""

        def __init__(self, units, out, image_size, prompt_size, batch_size, num_workers):
            super().__init__()
            self.units, self.out = units, out
            self.image_size, self.prompt_size = image_size, prompt_size
            self.batch_size, self.num_workers = batch_size, num_workers
            self.mine: list[EncodeUnit] = []

        def setup(self, stage: str) -> None:
            todo = remaining_units(self.units, scan_shards(self.out).keys)
            self.mine = shard_for_rank(todo, self.trainer.global_rank, self.trainer.world_size)
            self.trainer.strategy.barrier("pretokenize-scan")

        def predict_dataloader(self):
            from torch.utils.data import DataLoader

            # A rank with no unit left still runs one (discarded) batch: Lightning skips the loop's
            # hooks for an empty loader, and the other ranks wait for this one at the barriers.
            dummy = not self.mine and bool(self.units)
            units = self.units[:1] if dummy else self.mine
            return DataLoader(UnitDataset(units, self.image_size, self.prompt_size, dummy=dummy), batch_size=self.batch_size,
                              shuffle=False, num_workers=self.num_workers, collate_fn=collate_units,
                              persistent_workers=False)

    class ShardCommitter(BasePredictionWriter):
        """Hands rows to a :class:`ShardWriter`; flushes and waits for every rank at the end."""

        def __init__(self, out, fingerprint, crop_spec, shard_rows, progress: bool):
            super().__init__(write_interval="batch")
            self.out, self.fingerprint, self.crop_spec, self.shard_rows = out, fingerprint, crop_spec, shard_rows
            self.progress = progress
            self.writer: Optional[ShardWriter] = None
            self.bar = None
            self.encoded = 0
            self.started = self.seconds = 0.0

        def on_predict_start(self, trainer, pl_module):
            self.started = time.perf_counter()
            self.writer = ShardWriter(self.out, self.fingerprint, self.crop_spec, self.shard_rows, trainer.global_rank)
            if self.progress and trainer.is_global_zero:
                from tqdm.auto import tqdm

                dm = trainer.datamodule
                total = sum(len(u.masks) for u in dm.mine)
                self.bar = tqdm(total=total, desc=f"pretokenize (rank 0 of {trainer.world_size})", unit="mask",
                                dynamic_ncols=True, mininterval=1.0)

        def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx):
            self.writer.add(prediction)
            self.encoded += len(prediction)
            if self.bar is not None:
                self.bar.update(len(prediction))

        def on_predict_end(self, trainer, pl_module):
            self.writer.flush()
            self.seconds = time.perf_counter() - self.started
            if self.bar is not None:
                self.bar.close()
            trainer.strategy.barrier("pretokenize-done")

    return PretokenizeModule, UnitDataModule, ShardCommitter


def _predict(cfg: PretokenizeConfig, units: Sequence[EncodeUnit], out: Path, fingerprint: str,
             crop_spec: dict) -> tuple[int, float]:
    """Run Lightning's predict loop over the units not yet committed; returns (masks this process
    encoded, seconds of its loop)."""
    import lightning as L

    from samtok.core.trainer import _devices_arg
    from samtok.tokenizer.checkpoints import load_tokenizer_dir

    PretokenizeModule, UnitDataModule, ShardCommitter = _lightning_classes()
    model, _ = load_tokenizer_dir(cfg.tokenizer)
    prompt_size = int(model.sam_prompt_encoder.mask_input_size[0])
    dm = UnitDataModule(list(units), out, model.image_size, prompt_size, cfg.batch_size, cfg.num_workers)
    committer = ShardCommitter(out, fingerprint, crop_spec, cfg.shard_rows, cfg.progress)
    strategy: Any = cfg.strategy
    if cfg.strategy == "ddp":
        from lightning.pytorch.strategies import DDPStrategy

        strategy = DDPStrategy(start_method="popen")
    trainer = L.Trainer(accelerator=cfg.accelerator, devices=_devices_arg(cfg.devices), num_nodes=cfg.num_nodes,
                        strategy=strategy, precision="32-true", logger=False, callbacks=[committer],
                        enable_progress_bar=False, enable_model_summary=False, use_distributed_sampler=False,
                        enable_checkpointing=False, default_root_dir=str(out / TMP_DIR))
    trainer.predict(PretokenizeModule(model, cfg.mask_batch_size), datamodule=dm, return_predictions=False)
    return committer.encoded, committer.seconds
