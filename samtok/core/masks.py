"""Binary masks: COCO RLE / polygon conversions (through pycocotools), boxes, resizing, IoU.

Conventions used everywhere in the project:

* a mask is a 2-D boolean ``numpy`` array or ``torch`` tensor of shape ``(H, W)``;
* a box is ``(x0, y0, x1, y1)`` with *inclusive* pixel indices of the extreme foreground pixels
  (the ``torchvision.ops.masks_to_boxes`` convention the SAMTok release uses);
* an RLE is the COCO dict ``{"size": [H, W], "counts": str}`` (compressed) or with ``counts`` a
  list of run lengths (uncompressed, column-major).

pycocotools' C decoder trusts its input: run lengths that do not add up to ``H*W`` make it write
past its buffer. Every RLE is therefore validated here, in Python, before it reaches pycocotools.
"""

from __future__ import annotations

import sys
from typing import Any, Iterable, Sequence

import numpy as np
from pycocotools import mask as coco_mask

from samtok.core.errors import SamtokError


class MaskFormatError(SamtokError):
    """A mask or segmentation is malformed; the message says where and what was expected."""


def _where(where: str) -> str:
    return f"{where}: " if where else ""


# --------------------------------------------------------------------------------------------
# validation


def as_bool_mask(mask: Any, where: str = "mask", allow_soft: bool = False) -> np.ndarray:
    """Return ``mask`` as a 2-D boolean numpy array, or raise :class:`MaskFormatError`.

    Accepts bool arrays, integer/float arrays holding only two values ``{0, v}`` (e.g. 0/1, 0/255)
    and torch tensors. With ``allow_soft`` a float mask in [0, 1] is thresholded at 0.5.
    """
    torch = sys.modules.get("torch")  # a tensor can only exist if torch is already imported
    if torch is not None and isinstance(mask, torch.Tensor):
        mask = mask.detach().cpu().numpy()
    arr = np.asarray(mask)
    if arr.ndim == 3 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.ndim != 2:
        raise MaskFormatError(f"{_where(where)}expected a 2-D (H, W) mask, got shape {tuple(arr.shape)}")
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise MaskFormatError(f"{_where(where)}mask has zero size {tuple(arr.shape)}")
    if arr.dtype == bool:
        return arr
    if np.issubdtype(arr.dtype, np.floating) and not np.isfinite(arr).all():
        raise MaskFormatError(f"{_where(where)}mask contains NaN or infinite values")
    values = np.unique(arr)
    if len(values) <= 2 and values.min() >= 0 and (len(values) == 1 or values[0] == 0):
        return arr > 0
    if allow_soft and np.issubdtype(arr.dtype, np.floating) and values.min() >= 0 and values.max() <= 1:
        return arr >= 0.5
    raise MaskFormatError(
        f"{_where(where)}mask must be binary (0 and one positive value); found {len(values)} distinct "
        f"values in [{values.min()}, {values.max()}]"
    )


def check_nonempty(mask: np.ndarray, where: str = "mask") -> None:
    if not mask.any():
        raise MaskFormatError(f"{_where(where)}mask is empty (no foreground pixel)")


# --------------------------------------------------------------------------------------------
# RLE


def encode_rle(mask: Any) -> dict:
    """Compressed COCO RLE of a binary mask, with ``counts`` as ``str`` (JSON-ready)."""
    m = as_bool_mask(mask)
    rle = coco_mask.encode(np.asfortranarray(m.astype(np.uint8)))
    return {"size": [int(rle["size"][0]), int(rle["size"][1])], "counts": rle["counts"].decode("ascii")}


def encode_uncompressed_rle(mask: Any) -> dict:
    """Uncompressed COCO RLE (list of column-major run lengths, starting with a background run)."""
    m = as_bool_mask(mask)
    flat = m.T.reshape(-1).astype(np.int8)
    change = np.flatnonzero(np.diff(flat)) + 1
    bounds = np.concatenate([[0], change, [flat.size]])
    runs = np.diff(bounds).tolist()
    if flat[0] == 1:
        runs = [0] + runs
    return {"size": [int(m.shape[0]), int(m.shape[1])], "counts": [int(r) for r in runs]}


def rle_string_to_counts(counts: str | bytes, where: str = "") -> list[int]:
    """Parse COCO's compressed RLE string into run lengths (pure Python, never crashes).

    Each run is a little-endian base-32 varint in chars ``'0'``..``'o'`` with a continuation bit
    (0x20) and a sign bit (0x10) on the last char; runs from the third on are deltas to the run two
    before.
    """
    if isinstance(counts, bytes):
        try:
            counts = counts.decode("ascii")
        except UnicodeDecodeError as exc:
            raise MaskFormatError(f"{_where(where)}RLE counts are not ASCII") from exc
    out: list[int] = []
    i, n = 0, len(counts)
    while i < n:
        x, k, more = 0, 0, True
        while more:
            if i >= n:
                raise MaskFormatError(f"{_where(where)}RLE counts string ends inside a run (truncated?)")
            c = ord(counts[i]) - 48
            if c < 0 or c > 63:
                raise MaskFormatError(
                    f"{_where(where)}RLE counts contain an invalid character {counts[i]!r} at {i}"
                )
            x |= (c & 0x1F) << (5 * k)
            more = bool(c & 0x20)
            i += 1
            k += 1
            if not more and (c & 0x10):
                x |= -1 << (5 * k)
            if k > 13:
                raise MaskFormatError(f"{_where(where)}RLE run at {i} is too long (corrupted counts)")
        if len(out) > 2:
            x += out[-2]
        out.append(x)
    return out


def validate_rle(rle: Any, where: str = "") -> tuple[int, int]:
    """Check an RLE dict (compressed or uncompressed); return ``(H, W)`` or raise."""
    if not isinstance(rle, dict) or "size" not in rle or "counts" not in rle:
        raise MaskFormatError(f"{_where(where)}RLE must be a dict with 'size' and 'counts', got {type(rle).__name__}")
    size = rle["size"]
    if not (isinstance(size, (list, tuple)) and len(size) == 2 and all(isinstance(v, (int, np.integer)) for v in size)):
        raise MaskFormatError(f"{_where(where)}RLE 'size' must be [height, width], got {size!r}")
    h, w = int(size[0]), int(size[1])
    if h <= 0 or w <= 0:
        raise MaskFormatError(f"{_where(where)}RLE 'size' must be positive, got {size!r}")
    counts = rle["counts"]
    if isinstance(counts, (str, bytes)):
        runs = rle_string_to_counts(counts, where)
    elif isinstance(counts, (list, tuple)):
        if not all(isinstance(v, (int, np.integer)) for v in counts):
            raise MaskFormatError(f"{_where(where)}uncompressed RLE counts must be integers")
        runs = [int(v) for v in counts]
    else:
        raise MaskFormatError(f"{_where(where)}RLE 'counts' must be a string or a list, got {type(counts).__name__}")
    if any(r < 0 for r in runs):
        raise MaskFormatError(f"{_where(where)}RLE has a negative run length (corrupted counts)")
    total = sum(runs)
    if total != h * w:
        raise MaskFormatError(
            f"{_where(where)}RLE run lengths add up to {total}, expected height*width = {h}*{w} = {h * w}"
        )
    return h, w


def decode_rle(rle: dict, where: str = "") -> np.ndarray:
    """Decode a (validated) compressed or uncompressed RLE into an ``(H, W)`` bool array."""
    h, w = validate_rle(rle, where)
    counts = rle["counts"]
    if isinstance(counts, (list, tuple)):
        obj = coco_mask.frPyObjects({"size": [h, w], "counts": [int(c) for c in counts]}, h, w)
    else:
        obj = {"size": [h, w], "counts": counts.encode("ascii") if isinstance(counts, str) else counts}
    return coco_mask.decode(obj).astype(bool)


def decode_segmentation(seg: Any, height: int, width: int, where: str = "") -> np.ndarray:
    """Decode any COCO ``segmentation`` field (polygons, compressed or uncompressed RLE) to a mask."""
    if isinstance(seg, dict):
        m = decode_rle(seg, where)
        if m.shape != (height, width):
            raise MaskFormatError(
                f"{_where(where)}RLE size {list(m.shape)} does not match the image size [{height}, {width}]"
            )
        return m
    if isinstance(seg, (list, tuple)):
        polys = []
        for k, poly in enumerate(seg):
            if not isinstance(poly, (list, tuple)) or len(poly) < 6 or len(poly) % 2:
                raise MaskFormatError(
                    f"{_where(where)}polygon {k} must be a flat list [x0, y0, x1, y1, ...] of at least 3 points"
                )
            try:
                arr = [float(v) for v in poly]
            except (TypeError, ValueError) as exc:
                raise MaskFormatError(f"{_where(where)}polygon {k} has non-numeric coordinates") from exc
            if not np.isfinite(arr).all():
                raise MaskFormatError(f"{_where(where)}polygon {k} has NaN/infinite coordinates")
            polys.append(arr)
        if not polys:
            raise MaskFormatError(f"{_where(where)}segmentation is an empty polygon list")
        rles = coco_mask.frPyObjects(polys, height, width)
        return coco_mask.decode(coco_mask.merge(rles)).astype(bool)
    raise MaskFormatError(f"{_where(where)}unsupported segmentation type {type(seg).__name__}")


def rle_area(rle: dict) -> int:
    validate_rle(rle)
    obj = rle if isinstance(rle["counts"], (str, bytes)) else coco_mask.frPyObjects(rle, *rle["size"])
    if isinstance(obj.get("counts"), str):
        obj = {"size": obj["size"], "counts": obj["counts"].encode("ascii")}
    return int(coco_mask.area(obj))


def polygons_from_mask(mask: Any, tolerance: float = 0.0) -> list[list[float]]:
    """Outer contours of a mask as COCO polygons (marching squares on the pixel grid).

    ``tolerance`` > 0 simplifies each contour with Ramer-Douglas-Peucker (in pixels).
    Holes are not represented (COCO polygons cannot express them).
    """
    from samtok.core._contours import mask_contours, simplify_polygon

    m = as_bool_mask(mask)
    polys = []
    for contour in mask_contours(m):
        pts = simplify_polygon(contour, tolerance) if tolerance > 0 else contour
        if len(pts) >= 3:
            polys.append([float(v) for xy in pts for v in xy])
    return polys


# --------------------------------------------------------------------------------------------
# boxes


def mask_to_box(mask: Any, where: str = "mask") -> tuple[int, int, int, int]:
    """Inclusive ``(x0, y0, x1, y1)`` box of the foreground; raises on an empty mask."""
    m = as_bool_mask(mask, where)
    ys = np.flatnonzero(m.any(axis=1))
    xs = np.flatnonzero(m.any(axis=0))
    if len(xs) == 0:
        raise MaskFormatError(f"{_where(where)}cannot take the box of an empty mask")
    return int(xs[0]), int(ys[0]), int(xs[-1]), int(ys[-1])


def masks_to_boxes(masks):  # torch.Tensor (N, H, W) -> (N, 4) float
    """Batched inclusive boxes for a bool tensor ``(N, H, W)``; empty masks give ``(0, 0, 0, 0)``."""
    import torch

    if masks.numel() == 0:
        return torch.zeros((masks.shape[0], 4), device=masks.device)
    n, h, w = masks.shape
    m = masks.bool()
    rows = m.any(dim=2)  # (N, H)
    cols = m.any(dim=1)  # (N, W)
    ar_h = torch.arange(h, device=masks.device)
    ar_w = torch.arange(w, device=masks.device)
    big = torch.iinfo(torch.long).max
    y0 = torch.where(rows, ar_h, big).min(dim=1).values
    y1 = torch.where(rows, ar_h, -1).max(dim=1).values
    x0 = torch.where(cols, ar_w, big).min(dim=1).values
    x1 = torch.where(cols, ar_w, -1).max(dim=1).values
    boxes = torch.stack([x0, y0, x1, y1], dim=1)
    empty = ~rows.any(dim=1)
    boxes[empty] = 0
    return boxes.float()


def box_xyxy_to_xywh(box: Sequence[float]) -> list[float]:
    """Inclusive-pixel xyxy to COCO xywh (width = x1 - x0 + 1)."""
    x0, y0, x1, y1 = box
    return [float(x0), float(y0), float(x1 - x0 + 1), float(y1 - y0 + 1)]


def box_xywh_to_xyxy(box: Sequence[float]) -> list[float]:
    x, y, w, h = box
    return [float(x), float(y), float(x + w - 1), float(y + h - 1)]


def box_center(box: Sequence[float]) -> tuple[float, float]:
    x0, y0, x1, y1 = box
    return (x0 + x1) / 2.0, (y0 + y1) / 2.0


# --------------------------------------------------------------------------------------------
# geometry and overlap


def resize_mask(mask: Any, size: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize of a bool mask to ``size = (H, W)``."""
    m = as_bool_mask(mask)
    h, w = size
    if m.shape == (h, w):
        return m.copy()
    ys = np.minimum(((np.arange(h) + 0.5) * m.shape[0] / h).astype(np.int64), m.shape[0] - 1)
    xs = np.minimum(((np.arange(w) + 0.5) * m.shape[1] / w).astype(np.int64), m.shape[1] - 1)
    return m[ys][:, xs]


def intersection_union(pred: Any, gt: Any) -> tuple[int, int]:
    """Pixel counts ``(|pred ∧ gt|, |pred ∨ gt|)`` of two same-size masks."""
    p = as_bool_mask(pred, "prediction")
    g = as_bool_mask(gt, "ground truth")
    if p.shape != g.shape:
        raise MaskFormatError(f"prediction shape {p.shape} does not match ground truth shape {g.shape}")
    return int(np.logical_and(p, g).sum()), int(np.logical_or(p, g).sum())


def mask_iou(pred: Any, gt: Any, empty_value: float = 1.0) -> float:
    """IoU of two masks; ``empty_value`` when both are empty (union = 0)."""
    i, u = intersection_union(pred, gt)
    return empty_value if u == 0 else i / u


def union_masks(masks: Iterable[Any], shape: tuple[int, int]) -> np.ndarray:
    out = np.zeros(shape, dtype=bool)
    for m in masks:
        out |= as_bool_mask(m)
    return out
