import numpy as np
import pytest
import torch
from pycocotools import mask as coco_mask

from samtok.core.masks import (
    MaskFormatError,
    as_bool_mask,
    decode_rle,
    decode_segmentation,
    encode_rle,
    encode_uncompressed_rle,
    mask_iou,
    mask_to_box,
    masks_to_boxes,
    resize_mask,
    rle_string_to_counts,
)


def random_masks(n=20, h=37, w=53, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        m = np.zeros((h, w), bool)
        y0, x0 = rng.integers(0, h - 5), rng.integers(0, w - 5)
        m[y0 : y0 + rng.integers(1, h - y0), x0 : x0 + rng.integers(1, w - x0)] = True
        m ^= rng.random((h, w)) < 0.05  # speckle so runs are irregular
        out.append(m)
    out.append(np.ones((h, w), bool))
    out.append(np.zeros((h, w), bool))
    return out


def test_rle_round_trip_and_parity_with_pycocotools():
    for m in random_masks():
        rle = encode_rle(m)
        assert isinstance(rle["counts"], str)
        np.testing.assert_array_equal(decode_rle(rle), m)
        ref = coco_mask.encode(np.asfortranarray(m.astype(np.uint8)))
        assert rle["counts"].encode() == ref["counts"]
        # our pure-Python parser agrees with pycocotools' own uncompressed counts
        unc = encode_uncompressed_rle(m)
        assert rle_string_to_counts(rle["counts"]) == unc["counts"]
        assert sum(unc["counts"]) == m.size
        np.testing.assert_array_equal(decode_rle(unc), m)


def test_polygon_decoding_matches_pycocotools():
    poly = [[2.0, 2.0, 20.0, 3.0, 12.0, 18.0]]
    m = decode_segmentation(poly, 25, 30)
    ref = coco_mask.decode(coco_mask.merge(coco_mask.frPyObjects(poly, 25, 30))).astype(bool)
    np.testing.assert_array_equal(m, ref)
    assert m.sum() > 50


@pytest.mark.parametrize(
    "rle, msg",
    [
        ({"size": [4, 4], "counts": [3, 20]}, "add up to 23"),
        ({"size": [4, 4], "counts": [3, -1, 14]}, "negative"),
        ({"size": [4, 4], "counts": "0" * 3}, "add up to 0"),
        ({"size": [4, 4], "counts": "\x7f\x7f"}, "invalid character"),
        ({"size": [4, 4], "counts": "o"}, "truncated"),
        ({"size": [4], "counts": "4"}, "height, width"),
        ({"counts": "4"}, "'size' and 'counts'"),
    ],
)
def test_corrupted_rle_is_refused_before_pycocotools(rle, msg):
    with pytest.raises(MaskFormatError, match=msg):
        decode_rle(rle, where="f.json ann 7")


def test_rle_size_must_match_image():
    rle = encode_rle(np.ones((5, 6), bool))
    with pytest.raises(MaskFormatError, match=r"does not match the image size \[6, 5\]"):
        decode_segmentation(rle, 6, 5)


def test_bad_polygons():
    with pytest.raises(MaskFormatError, match="at least 3 points"):
        decode_segmentation([[1, 2, 3, 4]], 10, 10)
    with pytest.raises(MaskFormatError, match="empty polygon"):
        decode_segmentation([], 10, 10)


def test_as_bool_mask_rules():
    assert as_bool_mask(np.array([[0, 255], [255, 0]], np.uint8)).tolist() == [[False, True], [True, False]]
    assert as_bool_mask(np.full((2, 2), 7)).all()
    with pytest.raises(MaskFormatError, match="binary"):
        as_bool_mask(np.array([[0, 1], [2, 3]]))
    with pytest.raises(MaskFormatError, match="2-D"):
        as_bool_mask(np.zeros((2, 2, 2)))
    assert as_bool_mask(np.array([[0.2, 0.7]]), allow_soft=True).tolist() == [[False, True]]


def test_boxes_inclusive_and_batched():
    ms = random_masks(10)[:-1]  # drop the empty one
    for m in ms:
        x0, y0, x1, y1 = mask_to_box(m)
        ys, xs = np.nonzero(m)
        assert (x0, y0, x1, y1) == (xs.min(), ys.min(), xs.max(), ys.max())
    t = torch.from_numpy(np.stack(ms + [np.zeros_like(ms[0])]))
    boxes = masks_to_boxes(t)
    for k, m in enumerate(ms):
        assert boxes[k].tolist() == list(map(float, mask_to_box(m)))
    assert boxes[-1].tolist() == [0, 0, 0, 0]
    with pytest.raises(MaskFormatError, match="empty"):
        mask_to_box(np.zeros((3, 3), bool))


def test_iou_and_resize():
    a = np.zeros((4, 4), bool)
    a[:2] = True
    b = np.zeros((4, 4), bool)
    b[1:3] = True
    assert mask_iou(a, b) == pytest.approx(4 / 12)
    assert mask_iou(np.zeros((2, 2)), np.zeros((2, 2))) == 1.0
    assert mask_iou(np.zeros((2, 2)), np.zeros((2, 2)), empty_value=0.0) == 0.0
    big = resize_mask(a, (8, 8))
    assert big.shape == (8, 8) and big[:4].all() and not big[4:].any()
    np.testing.assert_array_equal(resize_mask(big, (4, 4)), a)
