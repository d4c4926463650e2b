"""The synthetic world's pixels and masks: determinism, exact disjoint masks, attributes that match pixels."""

import hashlib
import itertools

import numpy as np
import pytest

from samtok.core.masks import decode_rle, encode_rle, mask_to_box
from samtok.data.synth import SynthConfig, generate_image, generate_split
from samtok.data.synth import world
from samtok.data.synth.config import ConfigError
from samtok.data.synth.shapes import make_outline, rasterize

PALETTE = np.array(list(world.COLORS.values()), dtype=np.float64)
COLOR_NAMES = list(world.COLORS)


def _erode(m: np.ndarray) -> np.ndarray:
    e = m.copy()
    e[1:] &= m[:-1]
    e[:-1] &= m[1:]
    e[:, 1:] &= m[:, :-1]
    e[:, :-1] &= m[:, 1:]
    return e


def _dilate(m: np.ndarray, steps: int = 2) -> np.ndarray:
    for _ in range(steps):
        d = m.copy()
        d[1:] |= m[:-1]
        d[:-1] |= m[1:]
        d[:, 1:] |= m[:, :-1]
        d[:, :-1] |= m[:, 1:]
        m = d
    return m


@pytest.fixture(scope="module")
def train():
    return generate_split(SynthConfig(seed=0), "train", count=40)


def test_same_seed_same_bytes_and_records(train):
    again = generate_split(SynthConfig(seed=0), "train", count=40)
    assert [p.tobytes() for p in again.pixels] == [p.tobytes() for p in train.pixels]
    assert again.images == train.images
    assert again.samples == train.samples


def test_other_seed_differs_and_prefix_is_stable(train):
    other = generate_split(SynthConfig(seed=1), "train", count=5)
    assert all(a.tobytes() != b.tobytes() for a, b in zip(other.pixels, train.pixels))
    # image i depends only on (seed, split, i): a smaller split is a prefix of a larger one
    short = generate_split(SynthConfig(seed=0), "train", count=3)
    assert short.images == train.images[:3]
    assert [p.tobytes() for p in short.pixels] == [p.tobytes() for p in train.pixels[:3]]


def test_splits_are_disjoint_fresh_scenes():
    cfg = SynthConfig(seed=0)
    seen: dict[str, str] = {}
    ids: set[str] = set()
    for split in ("train", "val", "test"):
        sp = generate_split(cfg, split, count=15)
        for rec, pix in zip(sp.images, sp.pixels):
            digest = hashlib.sha1(pix.tobytes()).hexdigest()
            assert digest not in seen, f"{split} image {rec.image_id} repeats {seen[digest]}"
            seen[digest] = rec.image_id
            assert rec.image_id not in ids
            ids.add(rec.image_id)
            assert rec.file_name.startswith(f"images/{split}/")


def test_masks_nonempty_disjoint_and_consistent(train):
    for rec, pix in zip(train.images, train.pixels):
        assert pix.shape == (rec.height, rec.width, 3) and pix.dtype == np.uint8
        assert 1 <= len(rec.anns) <= 5
        union = np.zeros((rec.height, rec.width), dtype=bool)
        ann_ids = [a.ann_id for a in rec.anns]
        assert len(set(ann_ids)) == len(ann_ids) and all(a.isdigit() for a in ann_ids)
        for ann in rec.anns:
            m = decode_rle(ann.segmentation)
            assert m.shape == (rec.height, rec.width)
            assert m.any(), f"{rec.image_id}/{ann.ann_id} is empty"
            assert not (union & m).any(), f"{rec.image_id}/{ann.ann_id} overlaps an earlier mask"
            union |= m
            assert ann.segmentation == encode_rle(m)  # the core's compressed RLE, counts as str
            assert ann.area == m.sum()
            x0, y0, x1, y1 = mask_to_box(m)
            assert ann.bbox == [x0, y0, x1 - x0 + 1, y1 - y0 + 1]
            frac = m.sum() / (rec.height * rec.width)
            assert frac >= 0.004  # min_visible_area
            assert ann.attributes["size"] == world.size_class(frac)
            assert ann.category == ann.attributes["shape"] in world.SHAPES


def test_object_pixels_have_the_named_colour_and_background_is_apart(train):
    checked = 0
    for rec, pix in zip(train.images, train.pixels):
        masks = [a.to_mask(rec.height, rec.width) for a in rec.anns]
        for ann, m in zip(rec.anns, masks):
            core = _erode(m)
            sel = core if core.sum() >= 5 else m
            median = np.median(pix[sel].astype(np.float64), axis=0)
            nearest = COLOR_NAMES[int(np.linalg.norm(PALETTE - median, axis=1).argmin())]
            assert nearest == ann.attributes["color"], f"{rec.image_id}/{ann.ann_id}: looks {nearest}"
            checked += 1
        # background pixels (away from anti-aliased edges) are far from every object colour
        bg = pix[~_dilate(np.logical_or.reduce(masks))].astype(np.float64)
        dist = np.linalg.norm(bg[:, None, :] - PALETTE[None], axis=2).min(axis=1)
        assert np.percentile(dist, 1) > 60
    assert checked > 80


def test_objects_of_one_colour_never_touch(train):
    pairs = 0
    for rec in train.images:
        masks = {a.ann_id: a.to_mask(rec.height, rec.width) for a in rec.anns}
        for a, b in itertools.combinations(rec.anns, 2):
            if a.attributes["color"] == b.attributes["color"]:
                pairs += 1
                # at least one background / other-colour pixel between them (1 px dilation must not meet)
                assert not (_dilate(masks[a.ann_id], 1) & masks[b.ann_id]).any(), (rec.image_id, a.ann_id, b.ann_id)
    assert pairs > 5  # colours do repeat (multi-target expressions need them)


def test_palette_is_well_separated():
    for a, b in itertools.combinations(world.COLORS, 2):
        assert np.linalg.norm(np.subtract(world.COLORS[a], world.COLORS[b])) > 100, (a, b)


def test_occlusion_records_are_consistent(train):
    occluded = 0
    for rec in train.images:
        depth = {a.ann_id: a.attributes["depth"] for a in rec.anns}
        for ann in rec.anns:
            for front, px in ann.attributes["hidden_by"].items():
                assert depth[front] > depth[ann.ann_id] and px > 0
                occluded += 1
    assert occluded > 0  # the default world does occlude


def test_sizes_span_the_intended_range():
    sp = generate_split(SynthConfig(seed=3), "train", count=60)
    fracs = np.array([a.area / (r.height * r.width) for r in sp.images for a in r.anns])
    sizes = [a.attributes["size"] for r in sp.images for a in r.anns]
    assert fracs.min() >= 0.004 and fracs.max() <= 0.26
    assert {"small", "medium", "large"} <= set(sizes)
    assert sizes.count("small") < len(sizes) / 2  # most objects medium-large


def test_image_size_range_and_shape_rasterisation():
    cfg = SynthConfig(seed=0, image_size=96, image_size_max=160, max_aspect_ratio=1.5)
    shapes = set()
    for i in range(8):
        item = generate_image(cfg, "val", i)
        h, w = item.pixels.shape[:2]
        assert 96 <= h <= 160 and 96 <= w <= 160 and max(h, w) / min(h, w) <= 1.5
        shapes.add((h, w))
        assert all(m.shape == (h, w) for m in item.scene.masks)
    assert len(shapes) > 1
    rng = np.random.default_rng(0)
    for shape in world.SHAPES:
        cov = rasterize(make_outline(shape, 800.0, 30.0, 120, 120, rng))
        area = (cov >= 0.5).sum()
        assert abs(area - 800) / 800 < 0.1, (shape, area)  # exact area up to the pixel grid
    ring = rasterize(make_outline("ring", 2000.0, 0.0, 120, 120, rng)) >= 0.5
    cy, cx = np.array(ring.shape) // 2
    assert not ring[cy, cx]  # the ring has its hole


def test_config_validation():
    with pytest.raises(ConfigError, match="colors"):
        SynthConfig(colors=["red", "mauve"]).validate()
    with pytest.raises(ConfigError, match="min_objects"):
        SynthConfig(min_objects=4, max_objects=2).validate()
    with pytest.raises(ConfigError, match="unknown tasks"):
        SynthConfig(tasks=["res", "vqa"]).validate()
    assert SynthConfig(num_images=50).split_sizes() == {"train": 50, "val": 5, "test": 5}
    assert SynthConfig(num_images=3).split_sizes() == {"train": 3, "val": 1, "test": 1}
    assert SynthConfig().split_sizes() == {"train": 2000, "val": 200, "test": 200}
