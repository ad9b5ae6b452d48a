"""3D organ boxes: the box file, boxes from label maps, margins and clipping.

Box corners are voxel indices of the image in SimpleITK (x, y, z) order,
inclusive at both ends, as in the box file:
``{"boxes": [{"label": 1, "name": "liver", "min_ijk": [x, y, z], "max_ijk": [x, y, z]}]}``.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

from .atomic import atomic_write_text
from .errors import URSAMError

#: On SAM's 1024-pixel grid; converted to slice pixels with the slice's longest side.
SAM_GRID = 1024


@dataclass
class OrganBox:
    label: int
    name: str
    min_ijk: list
    max_ijk: list
    notes: list = field(default_factory=list)
    #: optional in-plane box per slice, ``{z: [x0, y0, x1, y1]}`` (prompt modes slice and propagate,
    #: URSAMLib.prompt_modes); None: the paper's prompt, the same box on every slice of the 3D box,
    #: which stays the bounding region either way
    slice_boxes: Optional[dict] = None

    @property
    def z_range(self):
        return range(int(self.min_ijk[2]), int(self.max_ijk[2]) + 1)

    @property
    def prompt_slices(self):
        """The slices that get a prompt: every slice of the box, or those with a per-slice box."""
        if self.slice_boxes is None:
            return self.z_range
        return sorted(self.slice_boxes)

    def xyxy(self):
        """The in-plane box as SAM wants it: [x_min, y_min, x_max, y_max]."""
        return np.array([self.min_ijk[0], self.min_ijk[1], self.max_ijk[0], self.max_ijk[1]], dtype=np.float64)

    def xyxy_at(self, z):
        """The in-plane box of slice ``z``; None where a per-slice box file gives that slice none."""
        if self.slice_boxes is None:
            return self.xyxy()
        b = self.slice_boxes.get(int(z))
        return None if b is None else np.asarray(b, dtype=np.float64)

    def to_json(self):
        d = {"label": int(self.label), "name": self.name,
             "min_ijk": [int(v) for v in self.min_ijk], "max_ijk": [int(v) for v in self.max_ijk]}
        if self.notes:
            d["notes"] = list(self.notes)
        if self.slice_boxes is not None:
            d["slice_boxes"] = {str(int(z)): [int(round(float(v))) for v in b]
                                for z, b in sorted(self.slice_boxes.items())}
        return d


def grid_px_to_slice_px(px, size_xyz):
    """Pixels on SAM's 1024 grid to pixels of this image's slice (longest side)."""
    return px * max(size_xyz[0], size_xyz[1]) / SAM_GRID


def load_boxes(path, size_xyz=None, warn=None):
    """Read and check a box file. Boxes partly outside the image are clipped (with a warning)."""
    path = Path(path)
    if not path.exists():
        raise URSAMError("box file not found", path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise URSAMError(f"box file is not valid JSON ({err.msg if hasattr(err, 'msg') else err})", path) from None
    items = data.get("boxes") if isinstance(data, dict) else None
    if not isinstance(items, list):
        raise URSAMError('box file must be a JSON object with a "boxes" list', path)
    if not items:
        raise URSAMError("box file has no boxes", path)
    boxes, seen = [], set()
    for n, item in enumerate(items):
        try:
            label = int(item["label"])
            name = str(item.get("name") or f"label_{label}")
            lo = [int(round(float(v))) for v in item["min_ijk"]]
            hi = [int(round(float(v))) for v in item["max_ijk"]]
        except (KeyError, TypeError, ValueError):
            raise URSAMError(f"box {n} must have an integer label and min_ijk/max_ijk of 3 numbers", path) from None
        if len(lo) != 3 or len(hi) != 3:
            raise URSAMError(f"box {n} ({name}) must have 3 values in min_ijk and max_ijk", path)
        if label <= 0 or label > 65535:
            raise URSAMError(f"box {n} ({name}) has label {label}; labels must be 1..65535", path)
        if label in seen:
            raise URSAMError(f"label {label} appears twice in the box file", path)
        seen.add(label)
        if any(a > b for a, b in zip(lo, hi)):
            raise URSAMError(f"box {n} ({name}) has min_ijk {lo} above max_ijk {hi}", path)
        box = OrganBox(label, name, lo, hi, slice_boxes=_parse_slice_boxes(item, n, name, lo, hi, path))
        if size_xyz is not None:
            box = clip_box(box, size_xyz, path, warn)
        boxes.append(box)
    return boxes


def _parse_slice_boxes(item, n, name, lo, hi, path):
    """The optional ``"slice_boxes": {"z": [x0, y0, x1, y1]}`` of a box, inside its 3D box."""
    raw = item.get("slice_boxes")
    if raw is None:
        return None
    try:
        out = {int(z): [int(round(float(v))) for v in b] for z, b in raw.items()}
    except (AttributeError, TypeError, ValueError):
        raise URSAMError(f'box {n} ({name}) "slice_boxes" must map slice numbers to [x0, y0, x1, y1]',
                         path) from None
    for z, b in out.items():
        if (len(b) != 4 or b[0] > b[2] or b[1] > b[3] or not lo[2] <= z <= hi[2]
                or b[0] < lo[0] or b[1] < lo[1] or b[2] > hi[0] or b[3] > hi[1]):
            raise URSAMError(f"box {n} ({name}) has a bad slice box {b} on slice {z} (it must be "
                             f"x0<=x1, y0<=y1 inside its 3D box {lo}..{hi})", path)
    return out


def _clip_slice_boxes(slice_boxes, lo, hi):
    if slice_boxes is None:
        return None
    out = {}
    for z, b in slice_boxes.items():
        if lo[2] <= z <= hi[2]:
            out[z] = [min(max(b[0], lo[0]), hi[0]), min(max(b[1], lo[1]), hi[1]),
                      min(max(b[2], lo[0]), hi[0]), min(max(b[3], lo[1]), hi[1])]
    return out


def clip_box(box, size_xyz, path=None, warn=None):
    lo, hi = list(box.min_ijk), list(box.max_ijk)
    if any(h < 0 for h in hi) or any(l > s - 1 for l, s in zip(lo, size_xyz)):
        raise URSAMError(f"box of {box.name} ({lo}..{hi}) lies outside the image of size {list(size_xyz)}", path)
    clo = [max(0, v) for v in lo]
    chi = [min(s - 1, v) for v, s in zip(hi, size_xyz)]
    if clo != lo or chi != hi:
        msg = f"box of {box.name} was partly outside the image and was clipped to {clo}..{chi}"
        if warn:
            warn(msg)
        box = OrganBox(box.label, box.name, clo, chi, box.notes + [msg],
                       slice_boxes=_clip_slice_boxes(box.slice_boxes, clo, chi))
    return box


def save_boxes(boxes, path, extra=None):
    data = {"boxes": [b.to_json() for b in boxes]}
    if extra:
        data.update(extra)
    atomic_write_text(path, json.dumps(data, indent=1))


def boxes_from_labels(labels_zyx, names, perturb_px=0.0, seed=0, labels=None):
    """Tight 3D boxes of each label present; ``names`` maps label value to name.

    ``perturb_px`` > 0 moves each in-plane side outward by a random 0..perturb_px
    pixels on SAM's 1024 grid: the paper's simulated manual prompt.
    """
    rng = np.random.default_rng(seed)
    size_xyz = labels_zyx.shape[::-1]
    wanted = sorted(int(v) for v in (labels if labels is not None else names))
    boxes = []
    # One pass of find_objects gives every label's bounding slices.

    from scipy import ndimage  # noqa: PLC0415 (not bundled with Slicer, whose panel imports this module before packages are installed)
    found = ndimage.find_objects(labels_zyx.astype(np.int32, copy=False))
    for value in wanted:
        if value < 1 or value > len(found) or found[value - 1] is None:
            continue
        sz, sy, sx = found[value - 1]
        lo = [sx.start, sy.start, sz.start]
        hi = [sx.stop - 1, sy.stop - 1, sz.stop - 1]
        if perturb_px > 0:
            scale = grid_px_to_slice_px(1.0, size_xyz)
            d = rng.uniform(0, perturb_px, size=4) * scale
            lo[0] = max(0, int(np.floor(lo[0] - d[0])))
            lo[1] = max(0, int(np.floor(lo[1] - d[1])))
            hi[0] = min(size_xyz[0] - 1, int(np.ceil(hi[0] + d[2])))
            hi[1] = min(size_xyz[1] - 1, int(np.ceil(hi[1] + d[3])))
        boxes.append(OrganBox(value, names.get(value, names.get(str(value), f"label_{value}")), lo, hi))
    return boxes


def add_margin(box, margin_z, margin_grid_px, size_xyz):
    """METHOD.md §1 margin: ``margin_z`` slices, ``margin_grid_px`` px of the 1024 grid in-plane."""
    d = grid_px_to_slice_px(margin_grid_px, size_xyz)
    lo = [int(np.floor(box.min_ijk[0] - d)), int(np.floor(box.min_ijk[1] - d)), box.min_ijk[2] - margin_z]
    hi = [int(np.ceil(box.max_ijk[0] + d)), int(np.ceil(box.max_ijk[1] + d)), box.max_ijk[2] + margin_z]
    lo = [max(0, v) for v in lo]
    hi = [min(s - 1, v) for v, s in zip(hi, size_xyz)]
    # Per-slice boxes grow in-plane by the same margin; the slices they cover stay as they are.
    sb = None if box.slice_boxes is None else _clip_slice_boxes(
        {z: [int(np.floor(b[0] - d)), int(np.floor(b[1] - d)), int(np.ceil(b[2] + d)), int(np.ceil(b[3] + d))]
         for z, b in box.slice_boxes.items()}, lo, hi)
    return OrganBox(box.label, box.name, lo, hi, list(box.notes), slice_boxes=sb)


def read_names(path):
    """Label names from a dataset.json (``{"labels": {"1": "liver"}}``) or a plain mapping."""
    path = Path(path)
    if not path.exists():
        raise URSAMError("names file not found", path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise URSAMError(f"names file is not valid JSON ({err.msg})", path) from None
    table = data.get("labels", data) if isinstance(data, dict) else None
    try:
        return {int(k): str(v) for k, v in table.items()}
    except (AttributeError, ValueError):
        raise URSAMError('names file must map label values to names, e.g. {"labels": {"1": "liver"}}',
                         path) from None


def box_iou(a, b):
    """IoU of two boxes in voxels (inclusive corners)."""
    lo = np.maximum(a.min_ijk, b.min_ijk)
    hi = np.minimum(a.max_ijk, b.max_ijk)
    inter = np.prod(np.clip(np.array(hi) - lo + 1, 0, None))
    va = np.prod(np.array(a.max_ijk) - a.min_ijk + 1)
    vb = np.prod(np.array(b.max_ijk) - b.min_ijk + 1)
    return float(inter / (va + vb - inter))


def bbox2d(mask2d):
    """The in-plane box [x0, y0, x1, y1] of a 2D mask (inclusive), None where it is empty."""
    ys = np.flatnonzero(mask2d.any(1))
    if len(ys) == 0:
        return None
    xs = np.flatnonzero(mask2d.any(0))
    return np.array([xs[0], ys[0], xs[-1], ys[-1]], np.float64)


def grow_box(box, d, size_xyz):
    """A 2D box grown by ``d`` pixels on each side, to whole pixels, inside an image of ``size_xyz``."""
    out = np.array([np.floor(box[0] - d), np.floor(box[1] - d), np.ceil(box[2] + d), np.ceil(box[3] + d)])
    out[[0, 2]] = np.clip(out[[0, 2]], 0, size_xyz[0] - 1)
    out[[1, 3]] = np.clip(out[[1, 3]], 0, size_xyz[1] - 1)
    return out


def box_area(b):
    """Pixels of a 2D box [x0, y0, x1, y1] (inclusive corners)."""
    return float((b[2] - b[0] + 1) * (b[3] - b[1] + 1))


def box_iou_2d(a, b):
    """IoU of two 2D boxes [x0, y0, x1, y1] (inclusive corners)."""
    w = min(a[2], b[2]) - max(a[0], b[0]) + 1
    h = min(a[3], b[3]) - max(a[1], b[1]) + 1
    if w <= 0 or h <= 0:
        return 0.0
    inter = w * h
    return float(inter / (box_area(a) + box_area(b) - inter))
