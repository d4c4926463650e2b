"""Other ways to write a mask as LLM text, measured on the same masks as SAMTok's two words.

Each representation turns a binary mask into text, and the text back into a mask at the image's
size; we count the text's tokens with the LLM's own tokenizer and measure the IoU of the round trip.

* **polygon@t** — outer boundaries of the 4-connected components traced along pixel edges
  (:func:`samtok.core._contours.mask_contours`), simplified with Ramer–Douglas–Peucker at tolerance
  ``t`` pixels (:func:`~samtok.core._contours.simplify_polygon`; ``t = 0`` keeps every corner),
  written as compact JSON of flat integer coordinate lists ``[[x0,y0,x1,y1,...],[...]]`` in pixel
  units, and rasterised back with pycocotools (``frPyObjects`` + ``merge`` + ``decode``). Holes
  are lost (COCO polygons cannot express them); a component simplified below 3 vertices is dropped.
* **rle** — the compressed COCO RLE ``counts`` string (pycocotools' ASCII run lengths, column-major);
  the size is known from the image and not counted. Lossless: IoU 1.
* **grid16** — Text4Seg-style patch labels: the image is cut into 16 × 16 cells (cell borders at
  ``floor(i·H/16)``, ``floor(j·W/16)``), a cell is foreground when at least half of its pixels are,
  and the 256 labels are written ``target|others|...`` with rows separated by newlines;
  rasterised back by filling the foreground cells. **grid16_rrle** writes each row with
  Text4Seg's row-wise run-length encoding (``others *7|target *3|others *6``).

SAMTok itself needs ``depth + 2`` tokens per mask (``<|mt_start|>``, one word per code,
``<|mt_end|>``): 4 for the release's 2 × 256 codebooks (3 when decoding from the first code).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from samtok.core._contours import mask_contours, simplify_polygon
from samtok.core.masks import mask_iou

GRID_FOREGROUND = "target"
GRID_BACKGROUND = "others"


# ------------------------------------------------------------------------------------------ polygons
def mask_to_polygons(mask: np.ndarray, tolerance: float = 0.0) -> list[list[tuple[float, float]]]:
    """Outer polygons of ``mask`` (pixel-corner coordinates), RDP-simplified at ``tolerance`` px."""
    polys = []
    for contour in mask_contours(np.asarray(mask, dtype=bool)):
        pts = simplify_polygon(contour, tolerance) if tolerance > 0 else contour
        if len(pts) >= 3:
            polys.append(pts)
    return polys


def _number(v: float) -> Any:
    return int(v) if float(v).is_integer() else round(float(v), 1)


def polygon_text(polygons: Sequence[Sequence[tuple[float, float]]]) -> str:
    """``[[x0,y0,x1,y1,...],...]`` (compact JSON, integers where the coordinates are integral)."""
    return json.dumps([[_number(v) for xy in poly for v in xy] for poly in polygons], separators=(",", ":"))


def polygons_from_text(text: str) -> list[list[float]]:
    """Flat coordinate lists back from :func:`polygon_text`'s output."""
    data = json.loads(text)
    return [[float(v) for v in poly] for poly in data]


def rasterize_polygons(polygons: Sequence[Sequence[float]], height: int, width: int) -> np.ndarray:
    """``(H, W)`` bool mask of flat polygons ``[x0, y0, x1, y1, ...]`` through pycocotools."""
    from pycocotools import mask as coco_mask

    polys = [list(map(float, p)) for p in polygons if len(p) >= 6]
    if not polys:
        return np.zeros((height, width), dtype=bool)
    rles = coco_mask.frPyObjects(polys, height, width)
    return coco_mask.decode(coco_mask.merge(rles)).astype(bool)


# ------------------------------------------------------------------------------------------ RLE
def rle_text(mask: np.ndarray) -> str:
    """The compressed COCO RLE ``counts`` string of ``mask``."""
    from pycocotools import mask as coco_mask

    counts = coco_mask.encode(np.asfortranarray(np.asarray(mask, dtype=np.uint8)))["counts"]
    return counts.decode("ascii") if isinstance(counts, bytes) else str(counts)


def mask_from_rle_text(text: str, height: int, width: int) -> np.ndarray:
    from pycocotools import mask as coco_mask

    return coco_mask.decode({"size": [height, width], "counts": text.encode("ascii")}).astype(bool)


# ------------------------------------------------------------------------------------------ grid
def _edges(n_pixels: int, cells: int) -> np.ndarray:
    return (np.arange(cells + 1) * n_pixels) // cells


def grid_labels(mask: np.ndarray, cells: int = 16) -> np.ndarray:
    """``(cells, cells)`` bool: a cell is foreground when ≥ half of its pixels are (empty cells: False)."""
    m = np.asarray(mask, dtype=bool)
    h, w = m.shape
    ys, xs = _edges(h, cells), _edges(w, cells)
    out = np.zeros((cells, cells), dtype=bool)
    for i in range(cells):
        for j in range(cells):
            block = m[ys[i] : ys[i + 1], xs[j] : xs[j + 1]]
            if block.size:
                out[i, j] = 2 * int(block.sum()) >= block.size
    return out


def grid_to_mask(labels: np.ndarray, height: int, width: int) -> np.ndarray:
    """Fill the foreground cells of a ``(cells, cells)`` label grid at ``(height, width)``."""
    cells = labels.shape[0]
    ys, xs = _edges(height, cells), _edges(width, cells)
    out = np.zeros((height, width), dtype=bool)
    for i, j in zip(*np.nonzero(labels)):
        out[ys[i] : ys[i + 1], xs[j] : xs[j + 1]] = True
    return out


def grid_text(labels: np.ndarray, rrle: bool = False, fg: str = GRID_FOREGROUND, bg: str = GRID_BACKGROUND) -> str:
    """Rows of ``fg``/``bg`` words joined by ``|``, rows by newlines (``rrle``: runs as ``word *n``)."""
    rows = []
    for row in labels:
        words = [fg if v else bg for v in row]
        if not rrle:
            rows.append("|".join(words))
            continue
        runs, k = [], 0
        while k < len(words):
            j = k
            while j < len(words) and words[j] == words[k]:
                j += 1
            runs.append(f"{words[k]} *{j - k}")
            k = j
        rows.append("|".join(runs))
    return "\n".join(rows)


def grid_from_text(text: str, cells: int, fg: str = GRID_FOREGROUND) -> np.ndarray:
    """Labels back from :func:`grid_text` (plain or run-length rows)."""
    out = np.zeros((cells, cells), dtype=bool)
    for i, row in enumerate(text.split("\n")[:cells]):
        j = 0
        for item in row.split("|"):
            word, _, count = item.partition(" *")
            n = int(count) if count else 1
            if word.strip() == fg:
                out[i, j : j + n] = True
            j += n
    return out


# ------------------------------------------------------------------------------------------ measuring
@dataclass(frozen=True)
class Representation:
    """A mask-as-text scheme: ``encode(mask) -> text`` and ``decode(text, H, W) -> mask``."""

    name: str
    encode: Callable[[np.ndarray], str]
    decode: Callable[[str, int, int], np.ndarray]
    description: str = ""


def representations(polygon_tolerances: Sequence[float] = (0.0, 1.0, 2.0, 4.0), grid_cells: int = 16) -> list[Representation]:
    """The baselines of the module docstring."""
    reps = []
    for t in polygon_tolerances:
        reps.append(Representation(
            f"polygon@{t:g}",
            (lambda m, t=t: polygon_text(mask_to_polygons(m, t))),
            (lambda s, h, w: rasterize_polygons(polygons_from_text(s), h, w)),
            f"RDP-simplified outer polygons (tolerance {t:g} px), pixel coordinates as JSON",
        ))
    reps.append(Representation("rle", rle_text, mask_from_rle_text, "compressed COCO RLE counts string"))
    reps.append(Representation(
        f"grid{grid_cells}",
        (lambda m: grid_text(grid_labels(m, grid_cells))),
        (lambda s, h, w: grid_to_mask(grid_from_text(s, grid_cells), h, w)),
        f"Text4Seg {grid_cells}x{grid_cells} patch labels",
    ))
    reps.append(Representation(
        f"grid{grid_cells}_rrle",
        (lambda m: grid_text(grid_labels(m, grid_cells), rrle=True)),
        (lambda s, h, w: grid_to_mask(grid_from_text(s, grid_cells), h, w)),
        f"Text4Seg {grid_cells}x{grid_cells} patch labels, row-wise run-length encoded",
    ))
    return reps


def token_counter(tokenizer) -> Callable[[Sequence[str]], list[int]]:
    """Batched token counts of plain texts (no template, no special tokens) with an LLM tokenizer."""
    tok = getattr(tokenizer, "tokenizer", tokenizer)

    def count(texts: Sequence[str]) -> list[int]:
        if not texts:
            return []
        return [len(ids) for ids in tok(list(texts), add_special_tokens=False)["input_ids"]]

    return count


def _summary(tokens: Sequence[int], ious: Sequence[float]) -> dict[str, float]:
    t = np.asarray(tokens, dtype=np.float64)
    return {
        "tokens_mean": float(t.mean()) if len(t) else math.nan,
        "tokens_median": float(np.median(t)) if len(t) else math.nan,
        "tokens_max": float(t.max()) if len(t) else math.nan,
        "iou_mean": math.fsum(ious) / len(ious) if ious else math.nan,
        "iou_min": float(min(ious)) if ious else math.nan,
        "count": float(len(ious)),
    }


def measure_representations(
    masks: Iterable[np.ndarray],
    count_tokens: Callable[[Sequence[str]], list[int]],
    reps: Sequence[Representation] | None = None,
) -> dict[str, dict[str, float]]:
    """Per representation: token counts (mean / median / max) and round-trip IoU (mean / min) over ``masks``.

    Args:
        masks: ``(H, W)`` bool masks (each at its own image's size).
        count_tokens: texts → token counts (see :func:`token_counter`).
        reps: the representations (default :func:`representations`).
    """
    reps = list(reps) if reps is not None else representations()
    texts: dict[str, list[str]] = {r.name: [] for r in reps}
    ious: dict[str, list[float]] = {r.name: [] for r in reps}
    for mask in masks:
        m = np.asarray(mask, dtype=bool)
        h, w = m.shape
        for r in reps:
            text = r.encode(m)
            texts[r.name].append(text)
            ious[r.name].append(mask_iou(r.decode(text, h, w), m))
    return {r.name: {**_summary(count_tokens(texts[r.name]), ious[r.name]), "description": r.description}
            for r in reps}
