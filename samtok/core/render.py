"""Mask overlays and image grids, used by every stage (TensorBoard panels, previews, reports)."""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
from PIL import Image, ImageDraw

from samtok.core.images import as_rgb_array
from samtok.core.masks import as_bool_mask

# A fixed, high-contrast palette so the same index always gets the same colour.
PALETTE: tuple[tuple[int, int, int], ...] = (
    (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48),
    (145, 30, 180), (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212),
    (0, 128, 128), (220, 190, 255), (170, 110, 40), (255, 250, 200), (128, 0, 0),
    (170, 255, 195), (128, 128, 0), (255, 215, 180), (0, 0, 128), (128, 128, 128),
)


def color_for(index: int) -> tuple[int, int, int]:
    return PALETTE[index % len(PALETTE)]


def _edges(m: np.ndarray) -> np.ndarray:
    inner = m.copy()
    inner[1:, :] &= m[:-1, :]
    inner[:-1, :] &= m[1:, :]
    inner[:, 1:] &= m[:, :-1]
    inner[:, :-1] &= m[:, 1:]
    return m & ~inner


def overlay_masks(
    image: Any,
    masks: Sequence[Any] | np.ndarray,
    labels: Sequence[str] | None = None,
    alpha: float = 0.45,
    colors: Sequence[tuple[int, int, int]] | None = None,
    outline: bool = True,
) -> Image.Image:
    """Blend ``masks`` (each ``(H, W)``, image size) over ``image`` with outlines and labels."""
    base = as_rgb_array(image).astype(np.float32)
    h, w = base.shape[:2]
    out = base.copy()
    boxes = []
    for k, mask in enumerate(masks):
        m = as_bool_mask(mask, where=f"mask {k}")
        if m.shape != (h, w):
            raise ValueError(f"mask {k} has shape {m.shape}, image is {(h, w)}")
        c = np.array(colors[k] if colors else color_for(k), dtype=np.float32)
        out[m] = (1 - alpha) * out[m] + alpha * c
        if outline:
            out[_edges(m)] = c
        ys, xs = np.nonzero(m)
        boxes.append((int(xs.min()), int(ys.min())) if len(xs) else None)
    img = Image.fromarray(np.clip(out, 0, 255).astype(np.uint8))
    if labels:
        draw = ImageDraw.Draw(img)
        for k, (label, corner) in enumerate(zip(labels, boxes)):
            if not label or corner is None:
                continue
            x, y = corner
            tx, ty = x, max(0, y - 11)
            bbox = draw.textbbox((tx, ty), label)
            draw.rectangle(bbox, fill=(0, 0, 0))
            draw.text((tx, ty), label, fill=colors[k] if colors else color_for(k))
    return img


def caption_below(image: Image.Image, text: str, width_chars: int | None = None) -> Image.Image:
    """Return ``image`` with ``text`` (wrapped) written on a white band below it."""
    import textwrap

    width_chars = width_chars or max(12, image.width // 6)
    lines = []
    for para in text.splitlines() or [""]:
        lines.extend(textwrap.wrap(para, width_chars) or [""])
    band = 12 * len(lines) + 4
    canvas = Image.new("RGB", (image.width, image.height + band), (255, 255, 255))
    canvas.paste(image.convert("RGB"), (0, 0))
    draw = ImageDraw.Draw(canvas)
    for i, line in enumerate(lines):
        draw.text((2, image.height + 2 + 12 * i), line, fill=(0, 0, 0))
    return canvas


def make_grid(images: Sequence[Image.Image], cols: int = 4, pad: int = 4, bg=(255, 255, 255)) -> Image.Image:
    """Tile images (any sizes) into a grid, row-major, cells sized to the largest image."""
    if not images:
        raise ValueError("make_grid needs at least one image")
    cols = max(1, min(cols, len(images)))
    rows = (len(images) + cols - 1) // cols
    cw = max(im.width for im in images)
    ch = max(im.height for im in images)
    grid = Image.new("RGB", (cols * cw + (cols + 1) * pad, rows * ch + (rows + 1) * pad), bg)
    for i, im in enumerate(images):
        r, c = divmod(i, cols)
        grid.paste(im.convert("RGB"), (pad + c * (cw + pad), pad + r * (ch + pad)))
    return grid
