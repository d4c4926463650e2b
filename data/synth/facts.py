"""What is true in a scene: object attributes and pairwise relations, as the language sees them.

:class:`SceneFacts` is built from a freshly rendered scene (:mod:`.scene`) or read back from an
:class:`~samtok.data.records.ImageRecord` written by the generator, so generated language can be
checked against records on disk as well as in memory.

Relations are three-valued: ``True`` (clearly holds), ``False`` (clearly does not) or ``None``
(borderline, e.g. two centres a few pixels apart). The official meaning of a predicate is
"the value is True"; the generator never produces an expression whose truth depends on a
borderline value, so what it says is also what a person would say looking at the image.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np

from samtok.core.masks import mask_to_box
from samtok.data.synth import world


@dataclass(frozen=True)
class ObjectFacts:
    ann_id: str
    shape: str
    color: str
    size: str  # world.SIZES, by visible area
    area: int  # visible pixels
    box: tuple[int, int, int, int]  # inclusive xyxy of the visible mask
    depth: int  # paint order: a larger depth is in front
    hidden_by: dict = field(default_factory=dict)  # ann_id of a front object -> pixels of this one it hides

    @property
    def cx(self) -> float:
        return (self.box[0] + self.box[2]) / 2.0

    @property
    def cy(self) -> float:
        return (self.box[1] + self.box[3]) / 2.0


@dataclass(frozen=True)
class SceneFacts:
    width: int
    height: int
    objects: tuple[ObjectFacts, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "_by_id", {o.ann_id: o for o in self.objects})
        object.__setattr__(self, "_memo", {})

    @property
    def memo(self) -> dict:
        """Scratch cache for pure functions of this scene (e.g. resolved queries)."""
        return self._memo  # type: ignore[attr-defined]

    def obj(self, ann_id: str) -> ObjectFacts:
        return self._by_id[ann_id]  # type: ignore[attr-defined]

    def area_fraction(self, o: ObjectFacts) -> float:
        return o.area / float(self.width * self.height)

    def size_borderline(self, o: ObjectFacts) -> bool:
        return world.size_is_borderline(self.area_fraction(o))

    def location_phrase(self, o: ObjectFacts) -> str:
        return world.LOCATION_PHRASES[world.location_cell(o.cx, o.cy, self.width, self.height)]

    def occluders(self, o: ObjectFacts) -> list[ObjectFacts]:
        """Objects clearly in front of ``o`` (hiding at least MIN_OCCLUDED_PIXELS of it), by depth."""
        ids = [a for a, px in o.hidden_by.items() if px >= world.MIN_OCCLUDED_PIXELS]
        return sorted((self.obj(a) for a in ids), key=lambda x: x.depth)

    def occluded(self, o: ObjectFacts) -> list[ObjectFacts]:
        """Objects ``o`` is clearly in front of, by depth."""
        return [b for b in self.objects if b.hidden_by.get(o.ann_id, 0) >= world.MIN_OCCLUDED_PIXELS]

    @classmethod
    def from_record(cls, record) -> "SceneFacts":
        """Rebuild the facts from an :class:`ImageRecord` (masks decoded, attributes read)."""
        objs = []
        for ann in record.anns:
            m = ann.to_mask(record.height, record.width)
            a = ann.attributes
            objs.append(
                ObjectFacts(
                    ann_id=ann.ann_id,
                    shape=a["shape"],
                    color=a["color"],
                    size=a["size"],
                    area=int(m.sum()),
                    box=mask_to_box(m),
                    depth=int(a.get("depth", 0)),
                    hidden_by={str(k): int(v) for k, v in (a.get("hidden_by") or {}).items()},
                )
            )
        return cls(width=record.width, height=record.height, objects=tuple(objs))

    @classmethod
    def from_masks(
        cls,
        width: int,
        height: int,
        ann_ids: Sequence[str],
        shapes: Sequence[str],
        colors: Sequence[str],
        visible: Sequence[np.ndarray],
        full: Sequence[np.ndarray],
    ) -> "SceneFacts":
        """Facts of objects listed in paint order (back to front) with visible and full masks."""
        n = len(ann_ids)
        areas = [int(v.sum()) for v in visible]
        objs = []
        for i in range(n):
            hidden = {}
            for j in range(i + 1, n):
                px = int(np.logical_and(full[i], visible[j]).sum())
                if px:
                    hidden[ann_ids[j]] = px
            objs.append(
                ObjectFacts(
                    ann_id=ann_ids[i],
                    shape=shapes[i],
                    color=colors[i],
                    size=world.size_class(areas[i] / float(width * height)),
                    area=areas[i],
                    box=mask_to_box(visible[i]),
                    depth=i,
                    hidden_by=hidden,
                )
            )
        return cls(width=width, height=height, objects=tuple(objs))


def tri_and(a: Optional[bool], b: Optional[bool]) -> Optional[bool]:
    if a is False or b is False:
        return False
    if a is None or b is None:
        return None
    return True


def relation_value(pred: str, a: ObjectFacts, b: ObjectFacts, scene: SceneFacts) -> Optional[bool]:
    """Does ``a PRED b`` hold? True / False / None (borderline). An object is never related to itself."""
    if a.ann_id == b.ann_id:
        return False
    if pred in ("left of", "right of", "above", "below"):
        if pred == "left of":
            d, side = b.cx - a.cx, scene.width
        elif pred == "right of":
            d, side = a.cx - b.cx, scene.width
        elif pred == "above":
            d, side = b.cy - a.cy, scene.height
        else:
            d, side = a.cy - b.cy, scene.height
        if d >= world.SPATIAL_MARGIN * side:
            return True
        return False if d <= 0 else None
    if pred == "larger than":
        r = a.area / max(b.area, 1)
        if r >= world.LARGER_RATIO:
            return True
        return False if r <= 1.0 else None
    if pred == "overlaps":
        px = max(a.hidden_by.get(b.ann_id, 0), b.hidden_by.get(a.ann_id, 0))
        if px >= world.MIN_OCCLUDED_PIXELS:
            return True
        return False if px == 0 else None
    raise ValueError(f"unknown predicate {pred!r}; known: {world.PREDICATES}")
