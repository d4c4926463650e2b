"""Shape outlines as polygons, and their rasterisation into anti-aliased coverage patches.

Every shape is an outer polygon plus optional hole polygons (the ring), built at unit scale around
the origin, then scaled to an exact target area and rotated. Rasterising draws the polygons with
PIL at 4x supersampling and box-filters back: the coverage in [0, 1] anti-aliases the RGB edges,
and ``coverage >= 0.5`` is the (binary) mask.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

SUPERSAMPLE = 4


@dataclass
class ShapeOutline:
    """Polygons ``(K, 2)`` in pixel units (x, y) around the origin; holes are cut out of ``outer``."""

    outer: np.ndarray
    holes: list[np.ndarray]

    @property
    def area(self) -> float:
        return polygon_area(self.outer) - sum(polygon_area(h) for h in self.holes)

    def transformed(self, scale: float, angle_rad: float) -> "ShapeOutline":
        c, s = np.cos(angle_rad), np.sin(angle_rad)
        rot = np.array([[c, -s], [s, c]]) * scale
        return ShapeOutline(self.outer @ rot.T, [h @ rot.T for h in self.holes])

    def extent(self) -> tuple[float, float, float, float]:
        x0, y0 = self.outer.min(axis=0)
        x1, y1 = self.outer.max(axis=0)
        return float(x0), float(y0), float(x1), float(y1)


def polygon_area(poly: np.ndarray) -> float:
    x, y = poly[:, 0], poly[:, 1]
    return 0.5 * abs(float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))))


def _ellipse(a: float, b: float, n: int = 48) -> np.ndarray:
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    return np.stack([a * np.cos(t), b * np.sin(t)], axis=1)


def _rect(a: float, b: float) -> np.ndarray:
    return np.array([[-a, -b], [a, -b], [a, b], [-a, b]], dtype=np.float64)


def unit_outline(shape: str, rng: np.random.Generator) -> ShapeOutline:
    """A random instance of ``shape`` at roughly unit scale (exact size is set by the caller)."""
    if shape == "circle":
        return ShapeOutline(_ellipse(1.0, 1.0), [])
    if shape == "ellipse":
        return ShapeOutline(_ellipse(rng.uniform(1.6, 2.2), 1.0), [])
    if shape == "square":
        return ShapeOutline(_rect(1.0, 1.0), [])
    if shape == "rectangle":
        return ShapeOutline(_rect(rng.uniform(1.6, 2.4), 1.0), [])
    if shape == "bar":
        return ShapeOutline(_rect(rng.uniform(4.0, 6.0), 1.0), [])
    if shape == "triangle":
        ang = np.deg2rad(np.array([90.0, 210.0, 330.0]) + rng.uniform(-12, 12, size=3))
        r = rng.uniform(0.9, 1.1, size=3)
        return ShapeOutline(np.stack([r * np.cos(ang), r * np.sin(ang)], axis=1), [])
    if shape == "star":
        inner = rng.uniform(0.42, 0.5)
        t = np.pi / 2 + np.arange(10) * np.pi / 5
        r = np.where(np.arange(10) % 2 == 0, 1.0, inner)
        return ShapeOutline(np.stack([r * np.cos(t), r * np.sin(t)], axis=1), [])
    if shape == "ring":
        hole = rng.uniform(0.45, 0.55)
        return ShapeOutline(_ellipse(1.0, 1.0), [_ellipse(hole, hole)])
    if shape == "blob":
        n = 20
        t = np.linspace(0, 2 * np.pi, n, endpoint=False)
        r = np.ones(n)
        for k in (2, 3, 4):
            r += rng.uniform(0.06, 0.2) * np.cos(k * t + rng.uniform(0, 2 * np.pi))
        r = np.clip(r, 0.45, None)
        return ShapeOutline(np.stack([r * np.cos(t), r * np.sin(t)], axis=1), [])
    raise ValueError(f"unknown shape {shape!r}")


def make_outline(
    shape: str, area_px: float, angle_deg: float, max_w: float, max_h: float, rng: np.random.Generator
) -> ShapeOutline:
    """``shape`` scaled to ``area_px`` pixels and rotated, shrunk if needed to fit ``max_w x max_h``."""
    unit = unit_outline(shape, rng)
    out = unit.transformed(float(np.sqrt(area_px / unit.area)), np.deg2rad(angle_deg))
    x0, y0, x1, y1 = out.extent()
    fit = min(1.0, max_w / max(x1 - x0, 1e-6), max_h / max(y1 - y0, 1e-6))
    if fit < 1.0:
        out = out.transformed(fit, 0.0)
    return out


def rasterize(outline: ShapeOutline) -> np.ndarray:
    """Coverage patch ``(h, w)`` float32 in [0, 1] of the outline's tight pixel box.

    The patch's pixel (0, 0) covers the outline's ``floor(min x), floor(min y)`` unit square;
    placing the patch anywhere is a pure integer translation.
    """
    x0, y0, x1, y1 = outline.extent()
    ox, oy = np.floor(x0), np.floor(y0)
    w = int(np.ceil(x1) - ox) + 1
    h = int(np.ceil(y1) - oy) + 1
    ss = SUPERSAMPLE
    canvas = Image.new("L", (w * ss, h * ss), 0)
    draw = ImageDraw.Draw(canvas)

    def pts(poly: np.ndarray) -> list[tuple[float, float]]:
        # continuous pixel coordinates -> supersampled pixel-centre coordinates
        return [((x - ox) * ss - 0.5, (y - oy) * ss - 0.5) for x, y in poly]

    draw.polygon(pts(outline.outer), fill=255)
    for hole in outline.holes:
        draw.polygon(pts(hole), fill=0)
    # BOX resampling by an integer factor is the exact mean of each ss x ss block (rounded to 1/255)
    return np.asarray(canvas.resize((w, h), Image.BOX), dtype=np.float32) / 255.0
