"""The vocabulary of the synthetic world: colours, shapes, size classes, locations, relations.

Everything that both the renderer (:mod:`.scene`) and the language (:mod:`.language`) must agree
on lives here, so a word always means the same pixels.
"""

from __future__ import annotations

# Named object colours (RGB). Saturated or very bright, far apart from each other (pairwise
# Euclidean distance > 100) and far from the desaturated mid-grey backgrounds (see scene.py), so
# the colour of an object can be read off its pixels.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (215, 25, 35),
    "green": (30, 170, 50),
    "blue": (35, 70, 225),
    "yellow": (245, 225, 30),
    "purple": (145, 40, 190),
    "orange": (255, 125, 0),
    "cyan": (30, 215, 225),
    "white": (248, 248, 248),
}

# Shape categories (the COCO category of each mask) and their plural nouns.
SHAPES: tuple[str, ...] = ("circle", "ellipse", "square", "rectangle", "triangle", "star", "ring", "bar", "blob")
PLURALS: dict[str, str] = {s: s + "s" for s in SHAPES}
PLURALS["object"] = "objects"

# Size classes by VISIBLE area as a fraction of the image area: small < 2 % <= medium < 7 % <= large.
SIZES: tuple[str, ...] = ("small", "medium", "large")
SIZE_WORDS: dict[str, str] = {"small": "small", "medium": "medium-sized", "large": "large"}
SIZE_THRESHOLDS: tuple[float, float] = (0.02, 0.07)
# Area fractions drawn for each class (inside the class, away from its borders, so that most
# objects are unambiguously in their class even after some occlusion).
SIZE_DRAW_RANGES: dict[str, tuple[float, float]] = {
    "small": (0.005, 0.016),
    "medium": (0.025, 0.058),
    "large": (0.085, 0.25),
}
# An area within this relative distance of a class threshold is "borderline": the language
# generator never relies on the size word of such an object (see language.py).
SIZE_BORDER_TOLERANCE = 0.15


def size_class(area_fraction: float) -> str:
    t0, t1 = SIZE_THRESHOLDS
    if area_fraction < t0:
        return "small"
    if area_fraction < t1:
        return "medium"
    return "large"


def size_is_borderline(area_fraction: float) -> bool:
    return any(abs(area_fraction / t - 1.0) < SIZE_BORDER_TOLERANCE for t in SIZE_THRESHOLDS)


# A 3 x 3 grid of the image (by the centre of the visible box): the phrase for each cell.
LOCATION_PHRASES: dict[tuple[int, int], str] = {
    (0, 0): "in the upper left",
    (0, 1): "at the top",
    (0, 2): "in the upper right",
    (1, 0): "on the left",
    (1, 1): "in the center",
    (1, 2): "on the right",
    (2, 0): "in the lower left",
    (2, 1): "at the bottom",
    (2, 2): "in the lower right",
}


def location_cell(cx: float, cy: float, width: int, height: int) -> tuple[int, int]:
    """(row, col) of a point in the 3 x 3 grid."""
    col = min(2, max(0, int(3 * (cx + 0.5) / width)))
    row = min(2, max(0, int(3 * (cy + 0.5) / height)))
    return row, col


# Pairwise predicates (subject PRED object). Spatial ones compare visible-box centres; "larger
# than" compares visible areas; "overlaps" means the subject is in front of the object and hides
# part of it.
PREDICATES: tuple[str, ...] = ("left of", "right of", "above", "below", "larger than", "overlaps")
# How a predicate reads inside a referring expression ("the star to the left of the blue ring").
PREDICATE_PHRASES: dict[str, str] = {
    "left of": "to the left of",
    "right of": "to the right of",
    "above": "above",
    "below": "below",
    "larger than": "larger than",
    "overlaps": "overlapping",
}
# A spatial relation holds when the centres differ by at least this fraction of the image side;
# a difference between 0 and this margin is "borderline" (true for nobody, avoided by the generator).
SPATIAL_MARGIN = 0.08
# "larger than": area ratio at least this; between 1 and this ratio is borderline.
LARGER_RATIO = 1.5
# "overlaps": at least this many pixels of the object are hidden by the subject (fewer: borderline).
MIN_OCCLUDED_PIXELS = 6
# "the X on the left": the extreme candidate must beat the runner-up by this fraction of the side.
EXTREME_MARGIN = 0.10
EXTREMES: tuple[str, ...] = ("left", "right", "top", "bottom")
EXTREME_PHRASES: dict[str, str] = {
    "left": "on the left",
    "right": "on the right",
    "top": "at the top",
    "bottom": "at the bottom",
}

COUNT_WORDS: dict[int, str] = {2: "two", 3: "three", 4: "four", 5: "five", 6: "six", 7: "seven", 8: "eight"}

TASK_NAMES: tuple[str, ...] = (
    "res",
    "gres",
    "gcg",
    "region_caption",
    "region_vqa",
    "mr_seg",
    "scene_graph",
    "ov_seg",
)


def article(word: str) -> str:
    return "an" if word[:1].lower() in "aeiou" else "a"
