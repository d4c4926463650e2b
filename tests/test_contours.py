import numpy as np
import pytest
from pycocotools import mask as coco_mask

from samtok.core._contours import mask_contours, simplify_polygon
from samtok.core.masks import decode_segmentation, polygons_from_mask


def rasterise(polygons, h, w):
    flat = [[v for xy in poly for v in xy] for poly in polygons if len(poly) >= 3]
    if not flat:
        return np.zeros((h, w), bool)
    return coco_mask.decode(coco_mask.merge(coco_mask.frPyObjects(flat, h, w))).astype(bool)


def iou(a, b):
    return np.logical_and(a, b).sum() / np.logical_or(a, b).sum()


def disk(h=64, w=80, cy=30, cx=40, r=20):
    yy, xx = np.mgrid[:h, :w]
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= r**2


def shapes():
    l_shape = np.zeros((30, 30), bool)
    l_shape[5:25, 5:10] = True
    l_shape[20:25, 5:25] = True
    u_shape = np.zeros((30, 40), bool)
    u_shape[5:25, 5:10] = True
    u_shape[5:25, 30:35] = True
    u_shape[20:25, 5:35] = True
    star = np.zeros((50, 50), bool)
    yy, xx = np.mgrid[:50, :50]
    ang = np.arctan2(yy - 25, xx - 25)
    star[np.hypot(yy - 25, xx - 25) <= 12 + 8 * np.cos(5 * ang)] = True
    two = np.zeros((20, 20), bool)
    two[2:6, 2:6] = True
    two[10:18, 11:19] = True
    edge = np.zeros((10, 12), bool)
    edge[0:4, 8:12] = True  # touches the image border
    return {"disk": disk(), "L": l_shape, "U": u_shape, "star": star, "two": two, "border": edge}


@pytest.mark.parametrize("name", ["disk", "L", "U", "star", "two", "border"])
def test_contours_rasterise_back_to_the_mask(name):
    m = shapes()[name]
    polys = mask_contours(m)
    back = rasterise(polys, *m.shape)
    assert iou(back, m) >= 0.95
    # pixel-corner tracing is exact for hole-free shapes
    np.testing.assert_array_equal(back, m)


def test_one_polygon_per_component_and_only_corners():
    m = shapes()["two"]
    polys = mask_contours(m)
    assert len(polys) == 2
    assert polys[0] == [(2.0, 2.0), (6.0, 2.0), (6.0, 6.0), (2.0, 6.0)]  # clockwise on screen
    assert len(polys[1]) == 4
    assert len(mask_contours(shapes()["L"])[0]) == 6
    assert len(mask_contours(shapes()["U"])[0]) == 8


def test_single_pixel_full_and_empty_masks():
    m = np.zeros((5, 7), bool)
    assert mask_contours(m) == []
    m[3, 4] = True
    assert mask_contours(m) == [[(4.0, 3.0), (5.0, 3.0), (5.0, 4.0), (4.0, 4.0)]]
    np.testing.assert_array_equal(rasterise(mask_contours(m), 5, 7), m)
    full = np.ones((6, 9), bool)
    assert mask_contours(full) == [[(0.0, 0.0), (9.0, 0.0), (9.0, 6.0), (0.0, 6.0)]]
    np.testing.assert_array_equal(rasterise(mask_contours(full), 6, 9), full)


def test_diagonal_pixels_are_separate_components():
    m = np.zeros((4, 4), bool)
    m[1, 1] = m[2, 2] = True
    polys = mask_contours(m)
    assert len(polys) == 2
    np.testing.assert_array_equal(rasterise(polys, 4, 4), m)


def test_holes_are_ignored():
    ring = disk(r=15) & ~disk(r=6)
    polys = mask_contours(ring)
    assert len(polys) == 1
    np.testing.assert_array_equal(rasterise(polys, *ring.shape), disk(r=15))
    assert iou(rasterise(polys, *ring.shape), ring) >= 0.8


def test_random_masks_round_trip_up_to_holes():
    rng = np.random.default_rng(0)
    for _ in range(30):
        h, w = rng.integers(1, 25, 2)
        m = rng.random((h, w)) < 0.6
        back = rasterise(mask_contours(m), h, w)
        assert (back | ~m).all()  # every foreground pixel is covered; extra pixels are filled holes


def test_simplification_is_monotone_in_tolerance():
    contour = mask_contours(disk(h=120, w=120, cy=60, cx=60, r=45))[0]
    counts = [len(simplify_polygon(contour, t)) for t in (0.0, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 100.0)]
    assert counts == sorted(counts, reverse=True)
    assert counts[0] == len(contour)  # corners only: nothing is collinear
    assert counts[-1] == 3
    assert counts[3] < counts[0] // 2
    # and the kept vertices are nested: a larger tolerance keeps a subset
    small, large = set(simplify_polygon(contour, 0.5)), set(simplify_polygon(contour, 2.0))
    assert large <= small <= set(contour)


def test_simplified_polygon_still_rasterises_close_to_the_mask():
    m = disk(h=120, w=120, cy=60, cx=60, r=45)
    poly = simplify_polygon(mask_contours(m)[0], 1.0)
    assert iou(rasterise([poly], 120, 120), m) >= 0.95


def test_simplify_drops_collinear_points_and_handles_tiny_inputs():
    square = [(0, 0), (1, 0), (2, 0), (2, 1), (2, 2), (1, 2), (0, 2), (0, 1)]
    assert simplify_polygon(square, 0.0) == [(0.0, 0.0), (2.0, 0.0), (2.0, 2.0), (0.0, 2.0)]
    assert simplify_polygon([(0, 0), (1, 1)], 5.0) == [(0.0, 0.0), (1.0, 1.0)]
    with pytest.raises(ValueError):
        simplify_polygon(square, -1.0)


def test_polygons_from_mask_uses_the_contours():
    m = shapes()["U"]
    polys = polygons_from_mask(m)
    np.testing.assert_array_equal(decode_segmentation(polys, *m.shape), m)
    assert len(polygons_from_mask(disk(), tolerance=2.0)[0]) < len(polygons_from_mask(disk())[0])
