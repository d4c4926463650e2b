"""Naming data in configs: a list of :class:`SourceSpec`, each opened with ``open_source``.

    data:
      train:
        - kind: coco
          args: {instances: /data/coco/annotations/instances_train2017.json, image_root: /data/coco/train2017}
        - kind: synthetic
          args: {root: runs/synth, split: train}
          repeat: 2.0

``kind`` and ``args`` are those of :func:`samtok.data.formats.open_source` (docs/formats.md);
``repeat`` is a sampling factor like the release's ``name%NNN`` rates (2.0 = every record twice,
0.5 = a seeded half).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable

import numpy as np

from samtok.data.records import ImageRecord


@dataclass
class SourceSpec:
    kind: str = "synthetic"  # coco | sa1b | refer | grefcoco | gcg | region_caption | multiround | scene_graph | conversation | synthetic
    args: dict[str, Any] = field(default_factory=dict)  # keyword arguments of that kind
    repeat: float = 1.0  # sampling factor


def open_spec(spec: SourceSpec):
    from samtok.data.formats.registry import open_source

    return open_source(spec.kind, **dict(spec.args))


def apply_repeat(items: list, repeat: float, seed: int = 0) -> list:
    """Whole copies for the integer part, a seeded subset for the fraction."""
    if repeat < 0:
        raise ValueError(f"repeat must be >= 0, got {repeat}")
    whole = int(repeat)
    out = list(items) * whole
    frac = repeat - whole
    if frac > 0 and items:
        rng = np.random.default_rng(seed)
        k = int(round(frac * len(items)))
        out += [items[i] for i in sorted(rng.choice(len(items), size=k, replace=False))]
    return out


def load_image_records(specs: Iterable[SourceSpec], seed: int = 0) -> list[ImageRecord]:
    """Every image (with its masks) of every source, repeats applied, in a stable order."""
    out: list[ImageRecord] = []
    for k, spec in enumerate(specs):
        records = list(open_spec(spec).images())
        out.extend(apply_repeat(records, spec.repeat, seed + k))
    return out
