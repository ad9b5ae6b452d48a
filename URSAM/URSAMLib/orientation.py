"""The one orientation the method runs in, and the way back to the input's grid.

SAM segments the slices of the array's first axis ([z, y, x]) and a box's
in-plane margin and per-slice boxes are on those slices, whatever the image's
direction says. A scan stored with permuted axes (a sagittal or coronal
acquisition, a converter with another axis order) or flipped axes would get
SAM on other slices than an axial scan of the same patient. So
:func:`URSAMLib.runner.run_scan` runs every scan in one canonical
orientation, LPS: index x runs towards the patient's left, y towards
posterior, z towards superior (what ``sitk.DICOMOrient(image, "LPS")`` gives),
reached by a permutation and flips of the axes only (no resampling, every
voxel kept), and maps the results back onto the input's own grid, voxel for
voxel. :class:`Orientation` is that permutation and those flips, for arrays,
images and boxes.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, replace

import numpy as np
import SimpleITK as sitk

from .boxes import add_margin


@dataclass(frozen=True)
class Orientation:
    """Canonical index axis ``j`` (x, y, z) is the input's index axis ``axes[j]``, reversed where
    ``flips[j]``; ``size``: the input's size (x, y, z)."""
    size: tuple
    axes: tuple = (0, 1, 2)
    flips: tuple = (False, False, False)

    @classmethod
    def of(cls, image):
        """The reorientation of a SimpleITK image (its direction) to LPS."""
        direction = np.array(image.GetDirection(), dtype=float).reshape(3, 3)  # column i: index axis i
        # the assignment of index axes to the L, P, S axes that follows the direction the closest
        # (a whole permutation, so that an oblique scan still gets each axis once)
        axes = max(itertools.permutations(range(3)),
                   key=lambda p: sum(abs(direction[j, p[j]]) for j in range(3)))
        flips = tuple(bool(direction[j, axes[j]] < 0) for j in range(3))
        return cls(tuple(int(s) for s in image.GetSize()), tuple(int(a) for a in axes), flips)

    @property
    def identity(self):
        return self.axes == (0, 1, 2) and not any(self.flips)

    @property
    def canonical_size(self):
        return tuple(self.size[a] for a in self.axes)

    def to_json(self):
        names = "xyz"
        return {"canonical": "LPS",
                "axes": [f"{'-' if f else ''}{names[a]}" for a, f in zip(self.axes, self.flips)]}

    # -- arrays [z, y, x] ------------------------------------------------------------------------
    def _numpy_axes(self):
        # numpy axis 2 - j of an array [z, y, x] is index axis j
        return tuple(2 - self.axes[2 - n] for n in range(3)), [2 - j for j in range(3) if self.flips[j]]

    def to_canonical(self, array):
        """An array [z, y, x] on the input's grid, on the canonical grid (C-ordered; the array itself
        where the input is canonical already)."""
        if self.identity:
            return array
        order, flipped = self._numpy_axes()
        out = np.transpose(array, order)
        return np.ascontiguousarray(np.flip(out, flipped) if flipped else out)

    def to_input(self, array):
        """An array [z, y, x] on the canonical grid, back on the input's grid (C-ordered; the array
        itself where the input is canonical already)."""
        if self.identity:
            return array
        order, flipped = self._numpy_axes()
        out = np.flip(array, flipped) if flipped else array
        return np.ascontiguousarray(np.transpose(out, np.argsort(order)))

    # -- images ----------------------------------------------------------------------------------
    def canonical_image(self, image):
        """A SimpleITK image on the input's grid (voxels and all), on the canonical grid: the same
        physical space, the canonical index order (what ``sitk.DICOMOrient(image, "LPS")`` gives)."""
        if self.identity:
            return image
        out = sitk.PermuteAxes(image, list(self.axes))
        return sitk.Flip(out, list(self.flips)) if any(self.flips) else out

    # -- boxes -----------------------------------------------------------------------------------
    def _inverse(self):
        inv = [0, 0, 0]
        for j, a in enumerate(self.axes):
            inv[a] = j
        return tuple(inv), tuple(self.flips[j] for j in inv), self.canonical_size

    def box_to_canonical(self, box):
        """An :class:`OrganBox` in the input's voxel indices, in the canonical ones."""
        return box if self.identity else _map_box(box, self.axes, self.flips, self.size)

    def box_to_input(self, box):
        """An :class:`OrganBox` in the canonical voxel indices, in the input's ones."""
        return box if self.identity else _map_box(box, *self._inverse())

    def add_margin(self, box, margin_z, margin_grid_px):
        """:func:`URSAMLib.boxes.add_margin` on the canonical slices (z slices, in-plane pixels of the
        axial slice), for a box in the input's voxel indices: the same margin in every orientation."""
        if self.identity:
            return add_margin(box, margin_z, margin_grid_px, self.size)
        grown = add_margin(self.box_to_canonical(box), margin_z, margin_grid_px, self.canonical_size)
        return self.box_to_input(grown)


@dataclass
class CanonicalScan:
    """A scan on the canonical grid, and the way back to the input's.

    ``input_reference`` (the grid; voxels unused) and ``input_volume``
    (float32 [z, y, x], HU) are the scan as read; ``reference`` and ``volume``
    the same on the canonical grid (the same arrays where the input is
    canonical already).
    """
    orientation: Orientation
    input_reference: sitk.Image
    input_volume: np.ndarray
    reference: sitk.Image
    volume: np.ndarray

    @classmethod
    def of(cls, reference, volume):
        orient = Orientation.of(reference)
        return cls(orient, reference, volume, orient.canonical_image(reference), orient.to_canonical(volume))

    def box_to_canonical(self, box):
        return self.orientation.box_to_canonical(box)

    def box_to_input(self, box):
        return self.orientation.box_to_input(box)

    def hu_image(self):
        """The canonical voxels (HU) as a SimpleITK image on the canonical grid."""
        image = sitk.GetImageFromArray(self.volume)
        image.CopyInformation(self.reference)
        return image


def canonical(image):
    """A SimpleITK image in the canonical orientation (itself if it is in it already)."""
    return Orientation.of(image).canonical_image(image)


def _map_box(box, src, flips, src_size):
    """``box`` in frame A's voxel indices in frame B's, where B's axis ``j`` is A's axis ``src[j]``,
    reversed where ``flips[j]`` (``src_size``: A's size, x y z)."""
    def corners(lo, hi):
        out_lo, out_hi = [], []
        for j, a in enumerate(src):
            if flips[j]:
                out_lo.append(src_size[a] - 1 - hi[a])
                out_hi.append(src_size[a] - 1 - lo[a])
            else:
                out_lo.append(lo[a])
                out_hi.append(hi[a])
        return out_lo, out_hi

    lo, hi = corners(list(box.min_ijk), list(box.max_ijk))
    slice_boxes = None
    if box.slice_boxes is not None:
        # Each per-slice box is a one-slice-thick 3D box of A. Where B slices along another axis it
        # spans several of B's slices; each B slice gets the bounding box of the A boxes that cross it
        # (exactly the A box when both slice along the same axis).
        slice_boxes = {}
        for z, b in box.slice_boxes.items():
            b = [float(v) for v in b]
            blo, bhi = corners([b[0], b[1], int(z)], [b[2], b[3], int(z)])
            for zb in range(int(round(blo[2])), int(round(bhi[2])) + 1):
                cur = slice_boxes.get(zb)
                slice_boxes[zb] = [blo[0], blo[1], bhi[0], bhi[1]] if cur is None else \
                    [min(cur[0], blo[0]), min(cur[1], blo[1]), max(cur[2], bhi[0]), max(cur[3], bhi[1])]
        slice_boxes = {z: [int(v) if float(v).is_integer() else float(v) for v in b]
                       for z, b in sorted(slice_boxes.items())}
    return replace(box, min_ijk=[int(v) for v in lo], max_ijk=[int(v) for v in hi], notes=list(box.notes),
                   slice_boxes=slice_boxes)
