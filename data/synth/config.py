"""``SynthConfig``: every knob of the synthetic world, with its default documented in place."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from samtok.core.config import ConfigError
from samtok.data.synth.world import COLORS, SHAPES, TASK_NAMES


@dataclass
class SplitSizes:
    """Images per split. Each split is its own seeded stream: val/test are fresh scenes."""

    train: int = 2000
    val: int = 200
    test: int = 200


@dataclass
class SynthConfig:
    # ---- output
    out_dir: str = "runs/synth"  # images/{split}/*.png, per-split annotation files, preview.png, DONE
    seed: int = 0  # one seed determines every image, mask and sentence of every split
    splits: SplitSizes = field(default_factory=SplitSizes)  # images per split
    # Shorthand (CLI --num-images): train gets this many images, val and test max(1, N // 10)
    # each. None: use `splits`.
    num_images: Optional[int] = None
    preview: bool = False  # also write out_dir/preview.png (a grid of train images + expressions)
    preview_count: int = 12  # images in the preview grid
    progress: bool = True  # tqdm progress bar on stderr while generating
    png_compress_level: int = 1  # zlib level of the PNGs (1: fast; files ~15 % larger than 6)

    # ---- images
    image_size: int = 128  # side in pixels (height and width) ...
    image_size_max: Optional[int] = None  # ... or, when set, each side uniform in [image_size, image_size_max]
    max_aspect_ratio: float = 2.0  # with a size range: long side / short side at most this
    background_noise: float = 4.0  # std of the per-pixel Gaussian noise of the background (0-255 scale)
    background_pattern: float = 8.0  # amplitude of the low-contrast pattern (stripes, checks, waves)

    # ---- objects
    min_objects: int = 2  # objects drawn per image (uniform in [min, max]; placement may drop some,
    max_objects: int = 5  # never the first one)
    colors: list[str] = field(default_factory=lambda: list(COLORS))  # object colours (names from world.COLORS)
    shapes: list[str] = field(default_factory=lambda: list(SHAPES))  # shape categories (world.SHAPES)
    # Probability of drawing a small / medium / large object (area classes of world.SIZE_DRAW_RANGES:
    # about 0.5-1.6 %, 2.5-5.8 %, 8.5-25 % of the image).
    size_weights: list[float] = field(default_factory=lambda: [0.25, 0.4, 0.35])
    # Probability that a new object reuses the colour (resp. shape) of an object already placed, so that
    # multi-target expressions ("all blue objects", "the two circles") have material.
    attribute_repeat_prob: float = 0.4
    max_rotation_deg: float = 180.0  # shapes are rotated uniformly in [-this, this]
    color_jitter: float = 10.0  # per-object uniform jitter of the RGB fill (+-, 0-255 scale)
    # Occlusion: a later object may hide part of an earlier one, but every object keeps at least this
    # fraction of its own area AND this fraction of the image visible; placements that would break
    # it are retried, then the object is dropped.
    min_visible_fraction: float = 0.4
    min_visible_area: float = 0.004
    placement_tries: int = 25  # positions tried per object before dropping it

    # ---- language / tasks
    # Task samples to emit (world.TASK_NAMES): res, gres, gcg, region_caption, region_vqa, mr_seg,
    # scene_graph, ov_seg.
    tasks: list[str] = field(default_factory=lambda: list(TASK_NAMES))
    res_per_image: int = 2  # referring expressions (one target each), distinct targets
    # Referring expressions are the SHORTEST unique description; with this probability the colour
    # word is added when that description leaves it out (people over-specify; it teaches colours).
    overspecify_prob: float = 0.3
    # ... and with this probability the shortest RELATIONAL description is used ("the triangle above
    # the green square"), when one exists: otherwise cheaper extremes ("on the left") crowd relations out.
    relation_prob: float = 0.25
    gres_per_image: int = 2  # generalized expressions (zero, one or several targets)
    no_target_fraction: float = 0.5  # fraction of generalized expressions that match nothing
    multi_target_prob: float = 0.6  # among targeted generalized samples: several targets when possible
    region_captions_per_image: int = 2  # described regions per image (0: every object)
    region_vqa_per_image: int = 1  # region questions (colour / shape / size / location) per image
    mr_rounds: int = 3  # rounds of the multi-round dialogue (at most the number of objects)
    scene_graph_max_relations: int = 12  # triplets kept per image (overlaps first, then spatial, then size)
    ov_distractors: int = 2  # absent categories asked for in open-vocabulary instance segmentation

    def split_sizes(self) -> dict[str, int]:
        """Images per split after the ``num_images`` shorthand."""
        if self.num_images is not None:
            n = int(self.num_images)
            small = max(1, n // 10)
            return {"train": n, "val": small, "test": small}
        return {"train": self.splits.train, "val": self.splits.val, "test": self.splits.test}

    def validate(self) -> "SynthConfig":
        """Raise :class:`ConfigError` for values the generator cannot honour; return self."""
        errs = []
        if self.image_size < 32:
            errs.append(f"image_size must be >= 32, got {self.image_size}")
        if self.image_size_max is not None and self.image_size_max < self.image_size:
            errs.append(f"image_size_max ({self.image_size_max}) must be >= image_size ({self.image_size})")
        if self.max_aspect_ratio < 1:
            errs.append(f"max_aspect_ratio must be >= 1, got {self.max_aspect_ratio}")
        if not 1 <= self.min_objects <= self.max_objects <= 100:
            errs.append(f"need 1 <= min_objects <= max_objects <= 100, got {self.min_objects}, {self.max_objects}")
        bad = [c for c in self.colors if c not in COLORS]
        if bad or not self.colors:
            errs.append(f"colors must be a non-empty subset of {list(COLORS)}, got unknown {bad}")
        bad = [s for s in self.shapes if s not in SHAPES]
        if bad or not self.shapes:
            errs.append(f"shapes must be a non-empty subset of {list(SHAPES)}, got unknown {bad}")
        if len(set(self.colors)) != len(self.colors) or len(set(self.shapes)) != len(self.shapes):
            errs.append("colors and shapes must not repeat")
        if len(self.size_weights) != 3 or min(self.size_weights) < 0 or sum(self.size_weights) <= 0:
            errs.append(f"size_weights must be 3 non-negative numbers (small, medium, large), got {self.size_weights}")
        bad = [t for t in self.tasks if t not in TASK_NAMES]
        if bad:
            errs.append(f"unknown tasks {bad}; known: {list(TASK_NAMES)}")
        for name in ("no_target_fraction", "multi_target_prob", "attribute_repeat_prob", "min_visible_fraction", "overspecify_prob",
                     "relation_prob"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                errs.append(f"{name} must lie in [0, 1], got {v}")
        if not 0.0 < self.min_visible_area < 0.5:
            errs.append(f"min_visible_area must lie in (0, 0.5), got {self.min_visible_area}")
        sizes = self.split_sizes()
        if any(not 0 <= v < 10**7 for v in sizes.values()):
            errs.append(f"image counts must lie in [0, 10^7), got {sizes}")
        if not 0 <= self.png_compress_level <= 9:
            errs.append(f"png_compress_level must lie in [0, 9], got {self.png_compress_level}")
        for name in ("res_per_image", "gres_per_image", "region_captions_per_image", "region_vqa_per_image",
                     "mr_rounds", "scene_graph_max_relations", "ov_distractors", "placement_tries", "preview_count"):
            if getattr(self, name) < 0:
                errs.append(f"{name} must be >= 0, got {getattr(self, name)}")
        if errs:
            raise ConfigError("synth config: " + "; ".join(errs))
        return self
