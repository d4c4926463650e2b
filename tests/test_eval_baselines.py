"""Mask-as-text baselines: exact expectations on hand-made masks, token counts with the real Qwen2.5 vocabulary."""

import numpy as np
import pytest

from samtok.core.masks import mask_iou as iou
from samtok.eval.baselines import (
    grid_from_text,
    grid_labels,
    grid_text,
    grid_to_mask,
    mask_from_rle_text,
    mask_to_polygons,
    measure_representations,
    polygon_text,
    rasterize_polygons,
    representations,
    rle_text,
    token_counter,
)


def rectangle():
    m = np.zeros((128, 128), bool)
    m[8:40, 16:48] = True  # rows 8..39, columns 16..47: aligned to the 8-pixel cells of a 16x16 grid
    return m


def ring():
    yy, xx = np.mgrid[:100, :120]
    d = (yy - 50) ** 2 + (xx - 60) ** 2
    return (d < 30**2) & (d >= 10**2)


def whitespace_counter(texts):
    return [len(t.replace(",", " ").replace("|", " ").split()) for t in texts]


def test_rectangle_is_four_corner_points_and_round_trips_exactly():
    m = rectangle()
    for t in (0.0, 1.0, 2.0, 4.0):
        polys = mask_to_polygons(m, t)
        assert polys == [[(16.0, 8.0), (48.0, 8.0), (48.0, 40.0), (16.0, 40.0)]]
        text = polygon_text(polys)
        assert text == "[[16,8,48,8,48,40,16,40]]"
        assert iou(rasterize_polygons([[16, 8, 48, 8, 48, 40, 16, 40]], 128, 128), m) == 1.0
    results = {r.name: iou(r.decode(r.encode(m), 128, 128), m) for r in representations()}
    assert results == {"polygon@0": 1.0, "polygon@1": 1.0, "polygon@2": 1.0, "polygon@4": 1.0,
                       "rle": 1.0, "grid16": 1.0, "grid16_rrle": 1.0}


def test_grid_labels_text_and_run_length_rows():
    m = rectangle()
    labels = grid_labels(m)
    assert labels.sum() == 16 and labels[1:5, 2:6].all()  # 4 x 4 cells of 8 px
    plain = grid_text(labels)
    assert plain.count("\n") == 15 and plain.count("|") == 16 * 15 and plain.count("target") == 16
    rrle = grid_text(labels, rrle=True)
    assert rrle.splitlines()[0] == "others *16" and rrle.splitlines()[1] == "others *2|target *4|others *10"
    for text in (plain, rrle):
        assert (grid_from_text(text, 16) == labels).all()
    assert (grid_to_mask(labels, 128, 128) == m).all()
    # a cell is foreground when at least half of its pixels are
    half = np.zeros((16, 16), bool)
    half[:8, :] = True
    assert grid_labels(half, 2).tolist() == [[True, True], [False, False]]


def test_lossy_and_lossless_representations_of_a_ring():
    m = ring()
    assert iou(mask_from_rle_text(rle_text(m), *m.shape), m) == 1.0
    polygon = iou(rasterize_polygons([[v for xy in p for v in xy] for p in mask_to_polygons(m)], *m.shape), m)
    assert 0.8 < polygon < 1.0  # COCO polygons fill the hole
    table = measure_representations([m, rectangle()], whitespace_counter)
    assert table["rle"]["iou_mean"] == 1.0 and table["rle"]["iou_min"] == 1.0
    assert table["polygon@0"]["iou_mean"] == pytest.approx((polygon + 1.0) / 2)
    tokens = [table[f"polygon@{t}"]["tokens_mean"] for t in (0, 1, 2, 4)]
    assert tokens == sorted(tokens, reverse=True) and tokens[-1] > 0  # fewer vertices as the tolerance grows
    for row in table.values():
        assert row["count"] == 2 and row["tokens_mean"] > 0 and 0.0 < row["iou_mean"] <= 1.0


def test_token_counts_with_the_real_qwen2_5_vocabulary():
    from samtok.mllm.text_tokenizers import build_qwen2_5_tokenizer

    count = token_counter(build_qwen2_5_tokenizer())
    # Qwen2.5 splits digits one by one: "[[", 14 digits, 7 commas, "]]"
    assert count(["[[16,8,48,8,48,40,16,40]]"]) == [23]
    table = measure_representations([rectangle(), ring()], count)
    assert table["grid16"]["tokens_max"] >= 256  # one label per cell at least
    assert table["grid16_rrle"]["tokens_mean"] < table["grid16"]["tokens_mean"]
    for name, row in table.items():
        assert row["tokens_mean"] > 4, name  # every text representation costs more than SAMTok's 4 tokens
