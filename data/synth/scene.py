"""Rendering one scene: a textured background and 1..N coloured shapes with exact visible masks.

Objects are painted back to front. A later object may hide part of an earlier one of another
colour (objects of one colour never touch, so every border is visible); the instance
mask of an object is its VISIBLE part (its own coverage >= 0.5 minus every later object's), so the
masks of a scene are disjoint and none is empty. Placement keeps every object at least
``min_visible_fraction`` of its own area and ``min_visible_area`` of the image visible; an object
that cannot be placed that way after ``placement_tries`` positions is dropped (never the first).
"""

from __future__ import annotations

import colorsys
from dataclasses import dataclass
from typing import Callable

import numpy as np

from samtok.data.synth import world
from samtok.data.synth.config import SynthConfig
from samtok.data.synth.facts import SceneFacts
from samtok.data.synth.shapes import make_outline, rasterize

# Shapes whose small versions would be unreadable at 128 px get a larger minimum area fraction.
_MIN_AREA_FRACTION = {"ring": 0.011, "star": 0.009}


@dataclass
class PlacedObject:
    shape: str
    color: str
    coverage: np.ndarray  # (h, w) float32 patch
    y: int  # top-left of the patch in the image
    x: int
    full_mask: np.ndarray  # (H, W) bool: coverage >= 0.5, before occlusion
    full_area: int


@dataclass
class Scene:
    """A rendered scene. ``masks[i]`` is the visible mask of ``facts.objects[i]`` (paint order)."""

    image: np.ndarray  # (H, W, 3) uint8
    masks: list[np.ndarray]  # (H, W) bool, disjoint, non-empty
    facts: SceneFacts

    @property
    def height(self) -> int:
        return int(self.image.shape[0])

    @property
    def width(self) -> int:
        return int(self.image.shape[1])


# ------------------------------------------------------------------------------------------------
# background


def sample_image_size(cfg: SynthConfig, rng: np.random.Generator) -> tuple[int, int]:
    """(H, W): fixed ``image_size``, or each side uniform in the range with a bounded aspect ratio."""
    if cfg.image_size_max is None or cfg.image_size_max == cfg.image_size:
        return cfg.image_size, cfg.image_size
    for _ in range(100):
        h, w = (int(v) for v in rng.integers(cfg.image_size, cfg.image_size_max + 1, size=2))
        if max(h, w) / min(h, w) <= cfg.max_aspect_ratio:
            return h, w
    return cfg.image_size, cfg.image_size


def _muted_color(rng: np.random.Generator) -> np.ndarray:
    # Low saturation, mid value: never mistaken for the saturated / white object colours.
    r, g, b = colorsys.hsv_to_rgb(rng.uniform(0, 1), rng.uniform(0.04, 0.2), rng.uniform(0.33, 0.6))
    return np.array([r, g, b]) * 255.0


def render_background(h: int, w: int, cfg: SynthConfig, rng: np.random.Generator) -> np.ndarray:
    """(H, W, 3) float32: a smooth two-colour gradient + a low-contrast pattern + noise."""
    yy = np.arange(h, dtype=np.float32)[:, None]
    xx = np.arange(w, dtype=np.float32)[None, :]
    theta = rng.uniform(0, 2 * np.pi)
    t = xx * np.float32(np.cos(theta)) + yy * np.float32(np.sin(theta))
    t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
    c0, c1 = _muted_color(rng).astype(np.float32), _muted_color(rng).astype(np.float32)
    lum = np.zeros((h, w), dtype=np.float32)  # luminance-only pattern and noise
    amp = cfg.background_pattern * rng.uniform(0.5, 1.0)
    kind = int(rng.integers(0, 4))
    if kind == 1:  # stripes
        period = rng.uniform(6, 20)
        phi = rng.uniform(0, 2 * np.pi)
        lum += amp * np.sin((2 * np.pi / period) * (xx * np.cos(phi) + yy * np.sin(phi)))
    elif kind == 2:  # checks
        cell = int(rng.integers(6, 17))
        lum += amp * ((((xx // cell) + (yy // cell)) % 2) * 2.0 - 1.0)
    elif kind == 3:  # soft waves
        lum += amp * (np.sin(xx / rng.uniform(5, 15) + rng.uniform(0, 6)) * np.cos(yy / rng.uniform(5, 15) + rng.uniform(0, 6)))
    if cfg.background_noise > 0:
        lum += rng.standard_normal((h, w), dtype=np.float32) * np.float32(cfg.background_noise)
    img = c0 + t[..., None] * (c1 - c0) + lum[..., None]
    return img.astype(np.float32, copy=False)


# ------------------------------------------------------------------------------------------------
# objects


def _sample_attributes(cfg: SynthConfig, rng: np.random.Generator, placed: list[PlacedObject]) -> tuple[str, str, float]:
    """(shape, colour, area fraction) of the next object."""
    if placed and rng.random() < cfg.attribute_repeat_prob:
        color = placed[int(rng.integers(len(placed)))].color
    else:
        color = cfg.colors[int(rng.integers(len(cfg.colors)))]
    if placed and rng.random() < cfg.attribute_repeat_prob:
        shape = placed[int(rng.integers(len(placed)))].shape
    else:
        shape = cfg.shapes[int(rng.integers(len(cfg.shapes)))]
    p = np.asarray(cfg.size_weights, dtype=np.float64)
    size = world.SIZES[int(rng.choice(3, p=p / p.sum()))]
    lo, hi = world.SIZE_DRAW_RANGES[size]
    lo = max(lo, _MIN_AREA_FRACTION.get(shape, 0.0))
    hi = max(hi, lo)
    frac = float(np.exp(rng.uniform(np.log(lo), np.log(hi))))
    return shape, color, frac


def _object_fill(cov: np.ndarray, color: str, cfg: SynthConfig, rng: np.random.Generator) -> np.ndarray:
    """(h, w, 3) float32 fill of an object patch: jittered base colour + soft shading + fine noise."""
    h, w = cov.shape
    base = np.asarray(world.COLORS[color], dtype=np.float32) + rng.uniform(-cfg.color_jitter, cfg.color_jitter, 3)
    yy = np.arange(h, dtype=np.float32)[:, None]
    xx = np.arange(w, dtype=np.float32)[None, :]
    phi = rng.uniform(0, 2 * np.pi)
    ramp = (xx * np.float32(np.cos(phi)) + yy * np.float32(np.sin(phi))) / np.float32(max(h, w, 1))
    shade = rng.uniform(6, 14) * (ramp - ramp.mean())
    noise = rng.standard_normal((h, w), dtype=np.float32) * np.float32(2.5)
    return base.astype(np.float32)[None, None, :] + (shade + noise)[..., None]


# Objects of the same colour keep at least this many background pixels between them.
SAME_COLOR_GAP = 2


def _dilate(m: np.ndarray, r: int) -> np.ndarray:
    """``m`` grown by ``r`` pixels (4-neighbour steps), padded by ``r`` on every side."""
    out = np.pad(m, r)
    for _ in range(r):
        grown = out.copy()
        grown[1:] |= out[:-1]
        grown[:-1] |= out[1:]
        grown[:, 1:] |= out[:, :-1]
        grown[:, :-1] |= out[:, 1:]
        out = grown
    return out


def _touches(mask: np.ndarray, patch: np.ndarray, y: int, x: int) -> bool:
    """Does ``patch`` placed with its top-left at (y, x) (may stick out of the image) hit ``mask``?"""
    h, w = mask.shape
    y0, x0 = max(y, 0), max(x, 0)
    y1, x1 = min(y + patch.shape[0], h), min(x + patch.shape[1], w)
    if y0 >= y1 or x0 >= x1:
        return False
    return bool(np.logical_and(mask[y0:y1, x0:x1], patch[y0 - y : y1 - y, x0 - x : x1 - x]).any())


def sample_scene(cfg: SynthConfig, rng: np.random.Generator, ann_id: Callable[[int], str] = str) -> Scene:
    """Render one scene from ``rng`` (all randomness of the scene comes from it).

    ``ann_id(k)`` names the k-th object in paint order (default: ``"0"``, ``"1"``, ...).
    """
    h, w = sample_image_size(cfg, rng)
    canvas = render_background(h, w, cfg, rng)
    min_px = max(1, int(np.ceil(cfg.min_visible_area * h * w)))
    n_target = int(rng.integers(cfg.min_objects, cfg.max_objects + 1))

    placed: list[PlacedObject] = []
    visible_px: list[int] = []  # current visible pixel count of each placed object
    visible: list[np.ndarray] = []
    attempts = 0
    while len(placed) == 0 or attempts < n_target:  # every scene keeps at least one object
        attempts += 1
        if attempts > n_target + 50:
            raise RuntimeError("could not place a single object; check image_size and min_visible_area")
        shape, color, frac = _sample_attributes(cfg, rng, placed)
        angle = 0.0 if shape in ("circle", "ring") else rng.uniform(-cfg.max_rotation_deg, cfg.max_rotation_deg)
        outline = make_outline(shape, frac * h * w, angle, w - 2, h - 2, rng)
        cov = rasterize(outline)
        ph, pw = cov.shape
        if ph > h or pw > w:  # cannot happen after make_outline's fit, but never crash on it
            continue
        patch = cov >= 0.5
        own = int(patch.sum())
        if own < min_px:
            continue
        halo = _dilate(patch, SAME_COLOR_GAP)
        same_color = [j for j, o in enumerate(placed) if o.color == color]
        ok = False
        for _try in range(max(1, cfg.placement_tries)):
            y = int(rng.integers(0, h - ph + 1))
            x = int(rng.integers(0, w - pw + 1))
            # objects of one colour never touch: their shared border would be invisible
            ok = not any(_touches(visible[j], halo, y - SAME_COLOR_GAP, x - SAME_COLOR_GAP) for j in same_color)
            for j, vis in enumerate(visible if ok else ()):
                hidden = int(np.logical_and(vis[y : y + ph, x : x + pw], patch).sum())
                if hidden and visible_px[j] - hidden < max(min_px, cfg.min_visible_fraction * placed[j].full_area):
                    ok = False
                    break
            if ok:
                break
        if not ok:
            continue
        full = np.zeros((h, w), dtype=bool)
        full[y : y + ph, x : x + pw] = patch
        for j in range(len(visible)):
            visible[j] &= ~full
            visible_px[j] = int(visible[j].sum())
        placed.append(PlacedObject(shape, color, cov, y, x, full, own))
        visible.append(full.copy())
        visible_px.append(own)

    for obj in placed:  # paint back to front with anti-aliased edges
        ph, pw = obj.coverage.shape
        a = obj.coverage[..., None]
        region = canvas[obj.y : obj.y + ph, obj.x : obj.x + pw]
        region[...] = region * (1.0 - a) + _object_fill(obj.coverage, obj.color, cfg, rng) * a
    image = np.clip(np.rint(canvas), 0, 255).astype(np.uint8)

    ids = [ann_id(k) for k in range(len(placed))]
    facts = SceneFacts.from_masks(
        w, h, ids, [o.shape for o in placed], [o.color for o in placed], visible, [o.full_mask for o in placed]
    )
    return Scene(image=image, masks=visible, facts=facts)
