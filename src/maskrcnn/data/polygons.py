"""Binary masks as polygons (COCO ``segmentation`` lists, LabelMe shapes).

The outline is traced with contourpy (matplotlib's contouring library) on the mask enlarged
twice with nearest-neighbour sampling, at level 0.5: every vertex then lies on a pixel edge or
halfway along one, so straight edges are exact and each corner loses a triangle of a quarter
pixel a side. Vertices on straight runs are dropped. COCO polygons cannot hold holes: only
outer outlines are kept (a ring comes back filled), and parts of fewer than three vertices are
left out.
"""

from __future__ import annotations

import contourpy
import numpy as np


def mask_to_polygons(mask: np.ndarray, origin: tuple[int, int] = (0, 0)) -> list[list[float]]:
    """(H, W) bool or 0/1 mask → outer outlines as flat ``[x1, y1, x2, y2, ...]`` lists in
    COCO's continuous pixel coordinates (pixel (x, y) covers [x, x + 1] x [y, y + 1]).
    ``origin``: the image pixel (x, y) of ``mask[0, 0]``, for a box-local mask."""
    binary = np.asarray(mask).astype(bool)
    if not binary.any():
        return []
    big = np.pad(np.kron(binary, np.ones((2, 2), dtype=bool)), 1).astype(np.float64)
    lines = contourpy.contour_generator(
        z=big, line_type=contourpy.LineType.Separate
    ).lines(0.5)
    polygons = []
    for line in lines:
        points = np.asarray(line)[:-1]  # closed: the last vertex repeats the first
        if len(points) < 3 or _signed_area(points) < 0:
            continue  # too small, or a hole (contourpy runs holes the other way round)
        points = _without_straight_runs((points - 0.5) / 2) + np.asarray(origin, np.float64)
        if len(points) >= 3:
            polygons.append([float(v) for v in points.reshape(-1)])
    return polygons


def _signed_area(points: np.ndarray) -> float:
    """Shoelace area of (x, y) vertices: positive for the way contourpy runs outer outlines
    here, negative for holes."""
    x, y = points[:, 0], points[:, 1]
    return float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))) / 2


def _without_straight_runs(points: np.ndarray) -> np.ndarray:
    """The vertices where the outline turns."""
    before = points - np.roll(points, 1, axis=0)
    after = np.roll(points, -1, axis=0) - points
    turn = before[:, 0] * after[:, 1] - before[:, 1] * after[:, 0]
    return points[np.abs(turn) > 1e-9]
