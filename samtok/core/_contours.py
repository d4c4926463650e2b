"""Mask outlines as polygons: pixel-corner boundary tracing and Ramer–Douglas–Peucker simplification.

Coordinates are ``(x, y)`` floats in pixel units with the origin at the top-left *corner* of the
image: pixel ``(row r, column c)`` is the unit square ``[c, c+1] × [r, r+1]``. A traced outline runs
along pixel edges, so its vertices are integer corner points. Rasterised by pycocotools
(``frPyObjects`` + ``decode``), the outline of a 4-connected component gives back that component
exactly (holes filled: COCO polygons cannot express them), because pycocotools samples columns and
rows on the same integer grid.

These polygons feed the "how many LLM tokens does a polygon need" baseline, where the number of
vertices matters: tracing keeps only the corners where the outline turns, and
:func:`simplify_polygon` trades vertices for accuracy.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

Point = tuple[float, float]

# Directions of the unit boundary edges, in image coordinates (x right, y down):
# 0 = east (+x), 1 = south (+y), 2 = west (-x), 3 = north (-y).
# Every edge is oriented with the foreground pixel on its right-hand side, so outer boundaries run
# clockwise on screen (positive shoelace area with y pointing down) and holes run anticlockwise.
_DX = np.array([1, 0, -1, 0])
_DY = np.array([0, 1, 0, -1])


def mask_contours(mask: np.ndarray) -> list[list[Point]]:
    """Outer boundaries of the 4-connected components of ``mask`` as closed polygons.

    Args:
        mask: ``(H, W)`` boolean array (anything ``np.asarray(...).astype(bool)`` accepts).

    Returns:
        One polygon per component, each a list of ``(x, y)`` corner points (the first point is
        not repeated at the end), vertices only where the outline turns. Components appear in
        raster order of their top-left pixel; each polygon starts at that pixel's top-left corner
        and runs clockwise on screen. Holes are not returned. An empty mask gives ``[]``.

    Two pixels that touch only at a corner belong to different components (4-connectivity): at
    such a saddle vertex the tracer turns right, keeping to the pixel it came along.
    """
    m = np.asarray(mask).astype(bool)
    if m.ndim != 2:
        raise ValueError(f"mask_contours expects a 2-D mask, got shape {m.shape}")
    if not m.any():
        return []
    h, w = m.shape
    p = np.pad(m, 1)  # p[r + 1, c + 1] == m[r, c]
    inner = p[1:-1, 1:-1]
    rows, cols = [], []
    starts_x, starts_y, dirs = [], [], []
    # (neighbour slice, start corner offset (dx, dy) relative to the pixel's top-left, direction)
    for neighbour, (ox, oy), d in (
        (p[:-2, 1:-1], (0, 0), 0),  # top edge, walking east
        (p[1:-1, 2:], (1, 0), 1),  # right edge, walking south
        (p[2:, 1:-1], (1, 1), 2),  # bottom edge, walking west
        (p[1:-1, :-2], (0, 1), 3),  # left edge, walking north
    ):
        r, c = np.nonzero(inner & ~neighbour)
        rows.append(r)
        cols.append(c)
        starts_x.append(c + ox)
        starts_y.append(r + oy)
        dirs.append(np.full(r.shape, d))
    sx = np.concatenate(starts_x)
    sy = np.concatenate(starts_y)
    d = np.concatenate(dirs)
    n_edges = sx.size
    ex = sx + _DX[d]
    ey = sy + _DY[d]

    # outgoing[vertex, direction] -> edge index (at most one edge per vertex and direction)
    vid_start = sy * (w + 1) + sx
    vid_end = ey * (w + 1) + ex
    outgoing = np.full(((h + 1) * (w + 1), 4), -1, dtype=np.int64)
    outgoing[vid_start, d] = np.arange(n_edges)
    # successor: prefer a right turn (stays with the current pixel at a saddle), then straight,
    # then a left turn. A U-turn never happens on a pixel boundary.
    right = outgoing[vid_end, (d + 1) % 4]
    straight = outgoing[vid_end, d]
    left = outgoing[vid_end, (d + 3) % 4]
    succ = np.where(right >= 0, right, np.where(straight >= 0, straight, left))
    if (succ < 0).any():  # pragma: no cover - impossible for a closed pixel boundary
        raise RuntimeError("boundary tracing found an open outline")

    # Start loops from edges in raster order of their start corner (top edges first), so the first
    # edge met of every outer boundary is the top edge of its component's top-left pixel.
    order = np.lexsort((d, sx, sy))
    visited = np.zeros(n_edges, dtype=bool)
    succ_list = succ.tolist()
    d_list = d.tolist()
    sx_list = sx.tolist()
    sy_list = sy.tolist()
    polygons: list[list[Point]] = []
    for e0 in order.tolist():
        if visited[e0]:
            continue
        loop = []
        e = e0
        while not visited[e]:
            visited[e] = True
            loop.append(e)
            e = succ_list[e]
        # keep only corners: the start of an edge whose direction differs from the previous edge's
        pts = [
            (float(sx_list[e]), float(sy_list[e]))
            for k, e in enumerate(loop)
            if d_list[e] != d_list[loop[k - 1]]
        ]
        if _shoelace(pts) > 0:  # outer boundary (holes have negative area)
            polygons.append(pts)
    return polygons


def _shoelace(points: Sequence[Point]) -> float:
    """Signed area (positive for clockwise-on-screen outlines with y pointing down)."""
    if len(points) < 3:
        return 0.0
    a = np.asarray(points, dtype=np.float64)
    x, y = a[:, 0], a[:, 1]
    return 0.5 * float(np.sum(x * np.roll(y, -1) - np.roll(x, -1) * y))


def _segment_distances(points: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Euclidean distance of each row of ``points`` to the segment ``a``–``b``."""
    ab = b - a
    denom = float(ab @ ab)
    if denom == 0.0:
        return np.linalg.norm(points - a, axis=1)
    t = np.clip(((points - a) @ ab) / denom, 0.0, 1.0)
    proj = a + t[:, None] * ab
    return np.linalg.norm(points - proj, axis=1)


def _rdp_chain(pts: np.ndarray, tolerance: float) -> list[int]:
    """Indices kept by RDP on an open chain ``pts[0] .. pts[-1]`` (both ends always kept)."""
    n = len(pts)
    keep = np.zeros(n, dtype=bool)
    keep[0] = keep[-1] = True
    stack = [(0, n - 1)]
    while stack:
        i, j = stack.pop()
        if j - i < 2:
            continue
        dist = _segment_distances(pts[i + 1 : j], pts[i], pts[j])
        k = int(np.argmax(dist))
        if dist[k] > tolerance:
            k += i + 1
            keep[k] = True
            stack.append((i, k))
            stack.append((k, j))
    return np.flatnonzero(keep).tolist()


def simplify_polygon(points: Sequence[Sequence[float]], tolerance: float) -> list[Point]:
    """Ramer–Douglas–Peucker simplification of a closed polygon.

    Args:
        points: ``[(x, y), ...]`` vertices of a closed polygon (first point not repeated).
        tolerance: largest allowed distance, in pixels, of a dropped vertex from the simplified
            outline (a vertex is kept when its distance is ``> tolerance``; ``0`` drops only
            vertices lying exactly on the segment between their kept neighbours).

    Returns:
        A subset of ``points`` in their original order (at least 3 points when the input has 3
        or more). The polygon is cut into two chains at ``points[0]`` and the vertex farthest
        from it; each chain is simplified with RDP. The anchors and every split point depend
        only on the geometry, never on ``tolerance``, so the set of kept vertices only shrinks
        as ``tolerance`` grows (the vertex count is monotonically non-increasing).
    """
    if tolerance < 0:
        raise ValueError(f"tolerance must be >= 0, got {tolerance}")
    pts = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    n = len(pts)
    if n < 3:
        return [(float(x), float(y)) for x, y in pts]
    far = int(np.argmax(np.linalg.norm(pts - pts[0], axis=1)))
    if far == 0:  # all points coincide
        return [(float(pts[0, 0]), float(pts[0, 1]))]
    first = _rdp_chain(pts[: far + 1], tolerance)
    second_pts = np.concatenate([pts[far:], pts[:1]])
    second = [far + k for k in _rdp_chain(second_pts, tolerance)][:-1]  # drop the closing pts[0]
    kept = sorted(set(first) | set(second))
    if len(kept) < 3:
        # Keep the vertex farthest from the axis points[0]–points[far] so the result stays a
        # polygon; it is the first split point of its chain, hence kept for every smaller tolerance.
        dist = _segment_distances(pts, pts[0], pts[far])
        kept = sorted(set(kept) | {int(np.argmax(dist))})
    return [(float(pts[k, 0]), float(pts[k, 1])) for k in kept]
