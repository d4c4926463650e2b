"""Small pure helpers shared by every reader and writer: JSON files and typed field access.

Every error is a :class:`~samtok.data.records.RecordError` whose message starts with *where*:
the file, then the record (index and/or id), then the field, e.g.
``instances.json: annotations[3] (id 17): field 'segmentation': ...``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np

from samtok.core.masks import MaskFormatError, rle_string_to_counts, validate_rle
from samtok.data.records import RecordError

_MISSING = object()


def describe(path: str | Path, *parts: object) -> str:
    """Join a file and record parts into the location prefix of an error message."""
    return ": ".join([str(path), *[str(p) for p in parts if p not in (None, "")]])


def load_json(path: str | Path, what: str = "JSON file") -> Any:
    """Read a whole JSON document; a missing file or bad JSON raises :class:`RecordError`."""
    p = Path(path)
    if not p.is_file():
        raise RecordError(f"{what} not found: {p}")
    try:
        with p.open("r", encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as exc:
        raise RecordError(f"{p}: not valid JSON (line {exc.lineno}, column {exc.colno}): {exc.msg}") from exc
    except UnicodeDecodeError as exc:
        raise RecordError(f"{p}: not UTF-8 text: {exc}") from exc


def iter_json_lines(path: str | Path, what: str = "JSON-lines file") -> Iterator[tuple[int, Any]]:
    """Stream ``(line_index, object)`` from a ``.jsonl`` file, skipping blank lines."""
    p = Path(path)
    if not p.is_file():
        raise RecordError(f"{what} not found: {p}")
    with p.open("r", encoding="utf-8") as f:
        for index, line in enumerate(f):
            if not line.strip():
                continue
            try:
                yield index, json.loads(line)
            except json.JSONDecodeError as exc:
                raise RecordError(f"{p}: line {index + 1}: not valid JSON: {exc.msg}") from exc


def json_default(value: Any) -> Any:
    """``json.dump`` fallback: numpy scalars and arrays become plain Python values."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"cannot write a {type(value).__name__} to JSON: {value!r}")


def write_json(path: str | Path, obj: Any) -> Path:
    """Write ``obj`` as compact JSON atomically (temp file + rename); create parent folders."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(f".{p.name}.{os.getpid()}.tmp")
    try:
        with tmp.open("w", encoding="utf-8") as f:
            json.dump(obj, f, ensure_ascii=False, separators=(",", ":"), default=json_default)
        tmp.replace(p)
    finally:
        tmp.unlink(missing_ok=True)
    return p


def write_json_lines(path: str | Path, objs: Any) -> Path:
    """Write one JSON object per line, atomically."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(f".{p.name}.{os.getpid()}.tmp")
    try:
        with tmp.open("w", encoding="utf-8") as f:
            for obj in objs:
                f.write(json.dumps(obj, ensure_ascii=False, separators=(",", ":"), default=json_default))
                f.write("\n")
        tmp.replace(p)
    finally:
        tmp.unlink(missing_ok=True)
    return p


# --------------------------------------------------------------------------------------------
# typed field access

_TYPE_NAMES = {dict: "an object", list: "a list", str: "a string", int: "an integer", float: "a number", bool: "a boolean"}


def _type_name(types: type | tuple[type, ...]) -> str:
    types = types if isinstance(types, tuple) else (types,)
    return " or ".join(_TYPE_NAMES.get(t, t.__name__) for t in types)


def expect_type(value: Any, types: type | tuple[type, ...], where: str) -> Any:
    """Return ``value`` if it has one of ``types`` (bools are not integers here), else raise."""
    types_t = types if isinstance(types, tuple) else (types,)
    bad_bool = isinstance(value, bool) and bool not in types_t
    if bad_bool or not isinstance(value, types_t):
        raise RecordError(f"{where}: expected {_type_name(types)}, got {type(value).__name__} {_short(value)}")
    return value


def require(record: Any, key: str, types: type | tuple[type, ...], where: str) -> Any:
    """``record[key]``, checked to exist and to have one of ``types``."""
    if not isinstance(record, Mapping):
        raise RecordError(f"{where}: expected an object, got {type(record).__name__}")
    if key not in record:
        raise RecordError(f"{where}: missing field '{key}'")
    return expect_type(record[key], types, f"{where}: field '{key}'")


def optional(record: Mapping, key: str, types: type | tuple[type, ...], where: str, default: Any = None) -> Any:
    """``record[key]`` if present and not ``null`` (type-checked), else ``default``."""
    value = record.get(key, _MISSING)
    if value is _MISSING or value is None:
        return default
    return expect_type(value, types, f"{where}: field '{key}'")


def require_id(record: Any, key: str, where: str) -> str:
    """An id field (integer or string in the files) as our string id."""
    return id_text(require(record, key, (int, str), where))


def id_text(value: int | str) -> str:
    """Ids are strings in our records whatever the file holds (``17`` and ``"17"`` are the same id)."""
    return str(value)


def file_id(text: str) -> int | str:
    """The inverse of :func:`id_text` for writers: decimal strings go back to integers."""
    return int(text) if text.isdigit() and (text == "0" or not text.startswith("0")) else text


def require_size(record: Mapping, where: str) -> tuple[int, int]:
    """``(height, width)`` fields, positive integers."""
    h = require(record, "height", int, where)
    w = require(record, "width", int, where)
    if h <= 0 or w <= 0:
        raise RecordError(f"{where}: image size must be positive, got height={h} width={w}")
    return h, w


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


# --------------------------------------------------------------------------------------------
# segmentations (structural checks: cheap, no pixel decoding)


def check_segmentation(seg: Any, height: int, width: int, where: str, allow_empty: bool = False) -> bool:
    """Validate a COCO ``segmentation`` without decoding it to pixels; return ``False`` if empty.

    RLE (compressed or not): run lengths must add up to ``H*W`` (checked by
    :func:`samtok.core.masks.validate_rle`) and its ``size`` must equal the image size. Polygons: a
    list of flat ``[x0, y0, ...]`` lists of at least 3 finite points. An RLE without foreground
    pixel or an empty polygon list is an empty mask: an error unless ``allow_empty``.
    """
    if isinstance(seg, dict):
        try:
            h, w = validate_rle(seg, where)
        except MaskFormatError as exc:
            raise RecordError(str(exc)) from exc
        if (h, w) != (height, width):
            raise RecordError(f"{where}: mask size [{h}, {w}] does not match the image size [{height}, {width}]")
        nonempty = rle_foreground(seg) > 0
    elif isinstance(seg, list):
        for k, poly in enumerate(seg):
            if not isinstance(poly, list) or len(poly) < 6 or len(poly) % 2:
                raise RecordError(f"{where}: polygon {k} must be a flat list [x0, y0, x1, y1, ...] of at least 3 points")
            if not _finite_numbers(poly):
                raise RecordError(f"{where}: polygon {k} has non-numeric or non-finite coordinates")
        nonempty = bool(seg)
    else:
        raise RecordError(f"{where}: segmentation must be an RLE object or a list of polygons, got {type(seg).__name__}")
    if not nonempty and not allow_empty:
        raise RecordError(f"{where}: mask is empty (no foreground pixel)")
    return nonempty


def _finite_numbers(values: list) -> bool:
    """All entries are finite numbers (vectorised: COCO has millions of polygon coordinates)."""
    try:
        arr = np.asarray(values)
    except (TypeError, ValueError):
        return False
    return arr.ndim == 1 and arr.dtype.kind in "iuf" and bool(np.isfinite(arr).all())


def rle_foreground(rle: Mapping) -> int:
    """Foreground pixel count of a validated RLE (odd runs are foreground)."""
    counts = rle["counts"]
    runs = rle_string_to_counts(counts) if isinstance(counts, (str, bytes)) else [int(c) for c in counts]
    return int(sum(runs[1::2]))


def rle_size(rle: Any, where: str) -> tuple[int, int]:
    """``(H, W)`` of an RLE dict (validated)."""
    try:
        return validate_rle(rle, where)
    except MaskFormatError as exc:
        raise RecordError(str(exc)) from exc
