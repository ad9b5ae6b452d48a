"""SAM-assisted correction: a box on one slice fixes one organ there and on the slices around it.

The engine works on the scan's canonical axial slices (:mod:`URSAMLib.orientation`), like the run that made
the result. :func:`correct_organ` segments the box's slice with SAM, then carries the new mask to the
neighbouring slices in both directions, each slice prompted with the box of the mask just made on the slice
before it (grown by ``grow_px``). A direction stops

- at the slice limit (``max_slices`` slices on each side) or the scan's edge;
- where the organ ends: SAM's mask on the next slice vanishes (the slice is left as it is);
- where the new mask agrees with what the slice already holds (Dice >= ``agree_dice``): the correction has
  met the part of the result that was right, which it leaves as it is;
- where the new mask disagrees with the slice (Dice < ``disagree_dice``) while SAM is unsure of it (its
  stability score below ``min_stability``): there the existing slice may well be the better one, so it is
  kept.

On the box's own slice the organ loses whatever lay outside the box, and inside it becomes SAM's mask
joined with what the result already had there; where SAM finds nothing or is very unsure (stability below
``min_box_stability``), the result's part inside the box stays alone. Measured on the worst slice of every
organ of tsA_slab (from perturbed boxes) and of two hn-openkbp results (calibrated fusion): SAM's mask
alone was worse than the result on 4 of 10 head-and-neck slices (parotids, mandible: LiteMedSAM is weak
there), the union was better than or equal to the result on all but one, whose SAM mask had stability
0.35. The neighbours' thresholds come from the benchmark's audit of every propagated slice
(``benchmarks/correction_reviewer.py``): on head-and-neck CT at 4 mm the masks SAM carried to neighbouring
slices were worse than the calibrated result's in almost every band of agreement and stability; on
abdominal CT at 3 mm they were better except where they disagreed with the result and SAM was unsure.

Only the corrected organ changes: a voxel another organ holds stays that organ's (``take_others`` hands
it over). :func:`remove_from_slice` clears the organ from one slice.

:mod:`URSAMLib.correction_files` applies a correction to a result folder (its files, report.json and the
undo record); the Slicer logic applies it to the scene through its session worker.
"""
from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional

import numpy as np

from .boxes import OrganBox, bbox2d, grid_px_to_slice_px, grow_box
from .errors import URSAMError
from .metrics import dice
from .prompt_modes import PromptOptions
from .sam.views import ZoomedBackend, organ_crop

#: why a direction of the propagation stopped (CorrectionStop.why)
STOP_LIMIT, STOP_EDGE, STOP_ENDS, STOP_AGREES, STOP_UNSURE, STOP_OFF = (
    "slice limit", "edge of the scan", "organ ends", "agrees with the result", "unsure and disagrees",
    "no propagation")
#: SAM's stability score: the mask at these probabilities (logits +1 and -1, as SAM's automatic mask
#: generator scores its masks)
STABILITY_HIGH, STABILITY_LOW = 1.0 / (1.0 + np.exp(-1.0)), 1.0 / (1.0 + np.exp(1.0))


@dataclass(frozen=True)
class CorrectionOptions:
    """How a correction is carried to the neighbouring slices."""
    propagate: bool = True
    #: at most this many slices are visited on each side of the box's slice
    max_slices: int = 5
    #: a direction stops where the new mask and the slice's current one agree this well (Dice)
    agree_dice: float = 0.9
    #: ... and where they agree less than this while SAM's stability score is below ``min_stability`` (then
    #: the box's slice keeps the result inside the box)
    disagree_dice: float = 0.75
    min_stability: float = 0.9
    #: below this stability, SAM's mask on the box's slice is left out (the result's part in the box stays)
    min_box_stability: float = 0.5
    #: margin around the previous slice's mask for the next slice's box, px of SAM's 1024 grid (as the
    #: propagate prompt mode's)
    grow_px: float = PromptOptions.grow_px
    #: a mask smaller than this (pixels) has vanished
    min_mask_px: int = PromptOptions.min_mask_px
    #: SAM sees a crop around the box (sam.views.organ_crop), so that a small organ covers more of its grid;
    #: off by default: on tsA_slab (3 mm) the zoomed masks were worse (aorta 0.61 against 0.75 Dice after a
    #: correction, duodenum 0.33 against 0.44)
    zoom: bool = False
    #: voxels of other organs may be taken (by default they stay theirs)
    take_others: bool = False

    def check(self):
        if int(self.max_slices) != self.max_slices or self.max_slices < 0:
            raise URSAMError(f"the slice limit must be a whole number of at least 0, got {self.max_slices}")
        for name in ("agree_dice", "disagree_dice", "min_stability", "min_box_stability"):
            if not 0 <= float(getattr(self, name)) <= 1:
                raise URSAMError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        return self

    def to_json(self):
        return asdict(self)


@dataclass(frozen=True)
class SliceBox:
    """A box on one axial slice: slice ``z``, columns ``x0..x1`` and rows ``y0..y1`` (inclusive voxel
    indices)."""
    z: int
    x0: int
    y0: int
    x1: int
    y1: int

    @property
    def xyxy(self):
        return np.array([self.x0, self.y0, self.x1, self.y1], np.float64)

    def check(self, shape_zyx, where=None):
        """This box, if it lies on a slice of a scan of ``shape_zyx`` and is ordered; URSAMError otherwise."""
        nz, ny, nx = shape_zyx
        if not 0 <= self.z < nz:
            raise URSAMError(f"slice {self.z} is outside the scan (slices 0..{nz - 1})", where)
        if self.x0 > self.x1 or self.y0 > self.y1:
            raise URSAMError(f"box {self.to_list()} must have x0 <= x1 and y0 <= y1", where)
        if self.x1 < 0 or self.y1 < 0 or self.x0 > nx - 1 or self.y0 > ny - 1:
            raise URSAMError(f"box {self.to_list()} lies outside the slice (x 0..{nx - 1}, y 0..{ny - 1})", where)
        return SliceBox(self.z, max(0, self.x0), max(0, self.y0), min(nx - 1, self.x1), min(ny - 1, self.y1))

    def to_list(self):
        return [int(self.x0), int(self.y0), int(self.x1), int(self.y1)]

    def organ_box(self, label=0, name=""):
        """The box as a one-slice :class:`URSAMLib.boxes.OrganBox` (to map it between orientations)."""
        return OrganBox(int(label), name, [self.x0, self.y0, self.z], [self.x1, self.y1, self.z])


@dataclass
class SliceStep:
    """What the correction did on one slice (canonical ``z``)."""
    z: int
    #: SAM's mask against what the slice held before (Dice; on the box's slice, inside the box), and SAM's
    #: stability score of it
    dice_before: float
    stability: float
    pixels: int
    changed: bool
    #: the slice took SAM's mask (False: the box's slice kept only the result's organ inside the box)
    sam: bool = True


@dataclass
class CorrectionStop:
    """Where one direction of the propagation stopped: the last slice it visited, and why."""
    last: Optional[int]
    why: str


@dataclass
class Correction:
    """A correction's outcome on the canonical grid: the new label map (``labels``, the slab it was given),
    the slices it changed, what it did on each slice it visited, why each direction stopped."""
    label: int
    box: Optional[SliceBox]
    labels: np.ndarray
    changed: List[int]
    steps: List[SliceStep] = field(default_factory=list)
    stops: Dict[str, CorrectionStop] = field(default_factory=dict)
    voxels_added: int = 0
    voxels_removed: int = 0
    seconds: float = 0.0
    encoder_calls: int = 0


class SliceSam:
    """SAM on the axial slices of one scan (canonical [z, y, x], HU): each slice's embedding, per view of
    it, is computed once and kept (the last ``keep`` of them), so a box drawn again on a slice, or the next
    correction around it, costs no encoder call."""

    def __init__(self, backend, volume, zoom=True, keep=16):
        self.backend = backend
        self.volume = volume
        self.zoom = zoom
        self.keep = keep
        self._cache = OrderedDict()
        self.encoder_calls = 0
        backend.set_volume(volume)  # the range of percentile normalization is the whole scan's

    def _view(self, box_xyxy):
        if not self.zoom:
            return None, self.backend
        organ = OrganBox(0, "", [int(box_xyxy[0]), int(box_xyxy[1]), 0], [int(box_xyxy[2]), int(box_xyxy[3]), 0])
        crop = organ_crop([organ], self.volume.shape)
        return crop, ZoomedBackend(self.backend, crop)

    def probabilities(self, z, box_xyxy):
        """SAM's probability over the box ``[x0, y0, x1, y1]`` of slice ``z`` (an array of the box's size)."""
        crop, view = self._view(box_xyxy)
        key = (int(z), crop)
        emb = self._cache.pop(key, None)
        if emb is None:
            emb = view.embed(self.volume[z])
            self.encoder_calls += 1
        self._cache[key] = emb
        while len(self._cache) > self.keep:
            self._cache.popitem(last=False)
        x0, y0, x1, y1 = (int(v) for v in box_xyxy)
        region = (slice(y0, y1 + 1), slice(x0, x1 + 1))
        return view.decode_regions(emb, np.asarray([box_xyxy], np.float32), [region])[0]


def stability(p):
    """SAM's stability score of a probability map: the mask at logit +1 over the mask at logit -1 (1: the
    mask does not move with the threshold; 0: nothing is sure)."""
    low = np.count_nonzero(p > STABILITY_LOW)
    return float(np.count_nonzero(p > STABILITY_HIGH) / low) if low else 0.0


def _mask_in_box(p, box_xyxy, shape_yx):
    """SAM's mask (p > 0.5) of a box's probabilities, on the whole slice; nothing outside the box."""
    x0, y0, x1, y1 = (int(v) for v in box_xyxy)
    mask = np.zeros(shape_yx, bool)
    mask[y0:y1 + 1, x0:x1 + 1] = p > 0.5
    return mask


class _Slab:
    """The label map being corrected: slices ``first .. first + len(labels) - 1`` of the scan."""

    def __init__(self, labels, first, label, take_others):
        self.labels, self.first, self.label, self.take_others = labels, first, label, take_others
        self.added = self.removed = 0

    def has(self, z):
        return self.first <= z < self.first + len(self.labels)

    def organ(self, z):
        return self.labels[z - self.first] == self.label

    def allowed(self, z, mask):
        """The part of ``mask`` this organ may take on slice z (other organs' voxels stay theirs)."""
        if self.take_others:
            return mask
        current = self.labels[z - self.first]
        return mask & ((current == 0) | (current == self.label))

    def write(self, z, mask):
        """Slice z's organ becomes ``mask`` (where allowed); whether anything changed."""
        current = self.labels[z - self.first]
        old = current == self.label
        new = self.allowed(z, mask)
        gone, come = old & ~new, new & ~old
        if not gone.any() and not come.any():
            return False
        current[gone] = 0
        current[come] = self.label
        self.removed += int(gone.sum())
        self.added += int(come.sum())
        return True


def correct_organ(sam, labels, label, box, options=None, first=0):
    """Correct organ ``label`` from a box on one slice: a :class:`Correction`.

    ``sam``: a :class:`SliceSam` of the scan; ``labels``: the current label map on the canonical grid, or a
    slab of it whose first slice is the scan's slice ``first`` (the slab must hold the box's slice and the
    slices the propagation may visit); it is copied, never changed. ``box``: a :class:`SliceBox` on the
    canonical grid.
    """
    options = (options or CorrectionOptions()).check()
    t0 = time.perf_counter()
    calls0 = sam.encoder_calls
    shape_yx = sam.volume.shape[1:]
    size_xyz = (shape_yx[1], shape_yx[0], sam.volume.shape[0])
    box = box.check(sam.volume.shape)
    slab = _Slab(np.array(labels, copy=True), int(first), int(label), options.take_others)
    if not slab.has(box.z):
        raise ValueError(f"the label slab (slices {first}..{first + len(labels) - 1}) lacks slice {box.z}")
    out = Correction(int(label), box, slab.labels, [])

    def visit(z, box_xyxy, before):
        p = sam.probabilities(z, box_xyxy)
        mask = _mask_in_box(p, box_xyxy, shape_yx)
        step = SliceStep(int(z), dice(slab.allowed(z, mask), before), stability(p), int(mask.sum()), False)
        out.steps.append(step)
        return mask, step

    def unsure(step):
        return step.dice_before < options.disagree_dice and step.stability < options.min_stability

    # the box's slice: nothing of the organ outside the box; inside it, SAM's mask with the result's part
    # (SAM alone was often worse than the result on small head-and-neck structures)
    kept = slab.organ(box.z) & _mask_in_box(np.ones((box.y1 - box.y0 + 1, box.x1 - box.x0 + 1)), box.xyxy,
                                             shape_yx)
    mask, step = visit(box.z, box.xyxy, kept)
    if step.pixels < options.min_mask_px or step.stability < options.min_box_stability:
        mask, step.sam = kept, False
    else:
        mask = mask | kept
    step.changed = slab.write(box.z, mask)
    start = mask
    grow = grid_px_to_slice_px(options.grow_px, size_xyz)
    for name, direction in (("down", -1), ("up", 1)):
        if not options.propagate or options.max_slices == 0:
            out.stops[name] = CorrectionStop(None, STOP_OFF if not options.propagate else STOP_LIMIT)
            continue
        previous, z, why = start, box.z, STOP_LIMIT
        for _ in range(options.max_slices):
            if np.count_nonzero(previous) < options.min_mask_px:
                why = STOP_ENDS
                break
            z += direction
            if not 0 <= z < sam.volume.shape[0] or not slab.has(z):
                why = STOP_EDGE
                z -= direction
                break
            mask, step = visit(z, grow_box(bbox2d(previous), grow, size_xyz), slab.organ(z))
            if step.pixels < options.min_mask_px:
                why = STOP_ENDS
                break
            if step.dice_before >= options.agree_dice:
                why = STOP_AGREES
                break
            if unsure(step):
                why = STOP_UNSURE
                break
            step.changed = slab.write(z, mask)
            previous = mask
        out.stops[name] = CorrectionStop(int(z) if z != box.z else None, why)
    out.changed = sorted(s.z for s in out.steps if s.changed)
    out.voxels_added, out.voxels_removed = slab.added, slab.removed
    out.encoder_calls = sam.encoder_calls - calls0
    out.seconds = time.perf_counter() - t0
    return out


def remove_from_slice(labels, label, z, first=0):
    """Clear organ ``label`` from slice ``z`` (canonical) of ``labels`` (copied): a :class:`Correction`."""
    t0 = time.perf_counter()
    slab = _Slab(np.array(labels, copy=True), int(first), int(label), False)
    if not slab.has(z):
        raise ValueError(f"the label slab (slices {first}..{first + len(labels) - 1}) lacks slice {z}")
    changed = slab.write(z, np.zeros(labels.shape[1:], bool))
    out = Correction(int(label), None, slab.labels, [int(z)] if changed else [],
                     [SliceStep(int(z), 0.0, 1.0, 0, changed)], {"down": CorrectionStop(None, STOP_OFF),
                                                                  "up": CorrectionStop(None, STOP_OFF)})
    out.voxels_removed = slab.removed
    out.seconds = time.perf_counter() - t0
    return out


def slab_range(z, n_slices, options):
    """The slices ``(first, stop)`` a correction on slice z may read or write (a scan of ``n_slices``)."""
    reach = options.max_slices if options.propagate else 0
    return max(0, z - reach), min(n_slices, z + reach + 1)


def clear_flags(flagged, label, slices, first=0):
    """The flagged-voxel label map with organ ``label``'s flags removed from ``slices`` (canonical; the map
    is a slab from slice ``first``): a reviewer has corrected the organ there. A copy."""
    out = np.array(flagged, copy=True)
    for z in slices:
        if first <= z < first + len(out):
            plane = out[z - first]
            plane[plane == label] = 0
    return out
