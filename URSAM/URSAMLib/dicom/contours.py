"""A 2D mask as closed polygons on the voxel edges: one polygon per connected piece, holes joined by keyholes.

Why the voxel edges: a planning system (and Slicer's SlicerRT) rasterises a
contour by the voxel centres inside it. A polygon on the edges of the mask's
voxels has every centre of the mask strictly inside and every other centre
strictly outside, so the mask comes back voxel for voxel and the contour's area
is the mask's; a polygon through the centres of the boundary voxels (OpenCV's
``findContours``) loses half a voxel all round.

Why keyholes: an organ with a hole on a slice (a ring) is one closed contour
that runs around the outside, down a channel of zero width to the hole, around
the hole the other way and back up the channel (DICOM PS3.3 C.8.8.6.3, the
encoding the standard gives for CLOSED_PLANAR contours). It fills to the ring
under the even-odd rule, the non-zero winding rule, and in readers that fill
each contour on its own and take the union, so no reader can fill the hole. The
channel runs on a voxel edge, so it passes through no voxel centre.

Pieces are 4-connected (voxels that share an edge); the background is
8-connected, so a piece touching itself at a corner is one pinched polygon and
a gap that reaches the outside through a corner is no hole. Coordinates are
continuous pixel indices ``(column, row)``: pixel ``(row j, column i)`` has its
centre at ``(i, j)`` and its corners at ``i ± 0.5``, ``j ± 0.5``.
"""
from __future__ import annotations

import math

import numpy as np
from scipy import ndimage

#: (side, neighbour offset (row, column), edge start and end corner offsets (column, row)) of a pixel whose
#: corners are (c, r)..(c + 1, r + 1): each boundary edge runs with the piece on its right, as seen on the
#: image (rows downwards), so outer boundaries have a positive area and holes a negative one
_SIDES = (((-1, 0), (0, 0), (1, 0)),    # top: left to right
          ((0, 1), (1, 0), (1, 1)),     # right: downwards
          ((1, 0), (1, 1), (0, 1)),     # bottom: right to left
          ((0, -1), (0, 1), (0, 0)))    # left: upwards


def mask_polygons(mask):
    """Closed polygons (each an ``N x 2`` float array of ``(column, row)``, N >= 4) of a 2D boolean mask: one per
    4-connected piece, its holes joined in by keyhole channels."""
    mask = np.asarray(mask, bool)
    labels, count = ndimage.label(mask)  # the default structure is the 4-neighbourhood
    polygons = []
    for index, box in enumerate(ndimage.find_objects(labels), start=1):
        piece = labels[box] == index
        loops = _loops(piece)
        outer = [loop for loop in loops if _area(loop) > 0]
        holes = [loop for loop in loops if _area(loop) < 0]
        if len(outer) != 1:
            raise AssertionError(f"a connected piece gave {len(outer)} outer boundaries")  # a bug, not bad input
        merged = outer[0]
        for hole in sorted(holes, key=_top):
            merged = _bridge(merged, hole)
        corner = np.array([box[1].start, box[0].start], float) - 0.5  # corner (0, 0) of the crop, in pixel indices
        polygons.append(np.asarray(merged, float) + corner)
    return polygons


def _loops(piece):
    """The boundary loops of one piece (integer corner coordinates ``(column, row)``), collinear corners dropped."""
    padded = np.pad(piece, 1)
    rows, cols = np.nonzero(piece)
    out = {}
    for (dr, dc), start, end in _SIDES:
        open_side = ~padded[rows + 1 + dr, cols + 1 + dc]
        for r, c in zip(rows[open_side], cols[open_side]):
            out.setdefault((c + start[0], r + start[1]), []).append((c + end[0], r + end[1]))
    used = set()
    loops = []
    for first, ends in out.items():
        for second in ends:
            if (first, second) in used:
                continue
            loop, edge = [], (first, second)
            while edge not in used:
                used.add(edge)
                loop.append(edge[0])
                edge = (edge[1], _next(edge, out[edge[1]]))
            if edge != (first, second):
                raise AssertionError("a boundary loop did not close")
            loops.append(_corners(loop))
    return loops


def _next(edge, ends):
    """At a corner where two pieces of the same voxel set touch diagonally, turn right (keep to the voxel we came
    along), so the pieces stay apart and the background keeps its diagonal gap."""
    if len(ends) == 1:
        return ends[0]
    (ax, ay), (bx, by) = edge
    dx, dy = bx - ax, by - ay
    return next(e for e in ends if dx * (e[1] - by) - dy * (e[0] - bx) > 0)


def _corners(loop):
    """The loop without the corners that lie on a straight run."""
    n = len(loop)
    keep = []
    for i, (x, y) in enumerate(loop):
        px, py = loop[i - 1]
        nx, ny = loop[(i + 1) % n]
        if (x - px) * (ny - y) - (y - py) * (nx - x) != 0 or (x - px) * (nx - x) + (y - py) * (ny - y) < 0:
            keep.append((x, y))
    return keep


def _area(loop):
    """Twice the signed area (shoelace; positive for outer boundaries in this module's orientation)."""
    xy = np.asarray(loop, np.int64)
    return int(np.sum(xy[:, 0] * np.roll(xy[:, 1], -1) - np.roll(xy[:, 0], -1) * xy[:, 1]))


def _top(loop):
    return min((y, x) for x, y in loop)


def _bridge(merged, hole):
    """``merged`` with ``hole`` joined in by a channel straight up from the hole's top-left corner to the nearest
    edge above it.

    Holes are joined topmost first, so every hole not yet joined lies below the channel, and the nearest edge
    above keeps the channel from crossing any edge.
    """
    start = hole.index(min(hole, key=lambda p: (p[1], p[0])))
    hole = hole[start:] + hole[:start]
    tx, ty = hole[0]
    hit = None
    n = len(merged)
    for j in range(n):
        (ax, ay), (bx, by) = merged[j], merged[(j + 1) % n]
        if ay == by and ay < ty and min(ax, bx) <= tx <= max(ax, bx):
            y = ay
        elif ax == bx == tx and max(ay, by) < ty:
            y = max(ay, by)
        else:
            continue
        hit = y if hit is None else max(hit, y)
    if hit is None:
        raise AssertionError("a hole lies outside its piece")
    p = (tx, hit)
    at = [j for j, v in enumerate(merged) if v == p]
    if at:
        j = next((j for j in at if _opens_downwards(merged, j)), at[0])
        return merged[:j + 1] + hole + [hole[0], p] + merged[j + 1:]
    j = next(j for j in range(n) if merged[j][1] == hit == merged[(j + 1) % n][1]
             and min(merged[j][0], merged[(j + 1) % n][0]) < tx < max(merged[j][0], merged[(j + 1) % n][0]))
    return merged[:j + 1] + [p] + hole + [hole[0], p] + merged[j + 1:]


def _opens_downwards(polygon, j):
    """Whether the inside of ``polygon`` at its corner ``j`` (a corner it may pass more than once) holds the
    direction straight down the image: where a channel from a hole below may join it."""
    v, prev, nxt = polygon[j], polygon[j - 1], polygon[(j + 1) % len(polygon)]
    out = math.atan2(nxt[1] - v[1], nxt[0] - v[0])
    back = math.atan2(prev[1] - v[1], prev[0] - v[0])
    down = math.atan2(1, 0)
    # the inside lies on the right of each edge: from the outgoing edge, turning the image's clockwise way
    sweep = (back - out) % (2 * math.pi)
    return 0 < (down - out) % (2 * math.pi) < sweep
