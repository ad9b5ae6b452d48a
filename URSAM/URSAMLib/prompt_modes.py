"""Prompt modes: which 2D box each slice of an organ gets.

- ``box3d``: the paper's prompt (METHOD.md §1): the 3D box's in-plane box on
  every slice of the box.
- ``slice``: a box per slice from the atlas prior (:mod:`URSAMLib.atlas_prior`,
  the fraction of supports that vote for the organ at each voxel). Each slice
  where the prior has the organ gets the prior's bounding box there, plus an
  in-plane margin; ``end_slices`` more slices at each end of the prior get the
  box of the nearest end slice. Other slices get no prompt.
- ``propagate``: from the slice of largest prior area outward, each slice boxed
  from the previous slice's mask (:mod:`URSAMLib.propagation`).

Every mode hands the pipeline :class:`OrganBox` objects: the 3D box is the
bounding region (maps are stored over it), and ``slice_boxes`` says which
slices get which prompt. Augmentation, ensemble, uncertainty and
rectification then run unchanged.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Dict, List, Optional

import numpy as np

from .boxes import OrganBox, bbox2d, box_area, grid_px_to_slice_px, grow_box
from .errors import URSAMError
from .propagation import Propagation

if TYPE_CHECKING:
    from .atlas_prior import Prior, WarpedSupports
    from .fusion import OrganFusion

MODES = ("box3d", "slice", "propagate")
#: the mode to be chosen by the source of the boxes (:func:`default_mode`), by ``Settings.resolved``
AUTO = "auto"
ZOOMS = ("auto", "on", "off")
#: the mode ``ursam segment``, ``ursam evaluate`` and the Slicer panel use unless told otherwise, where
#: the support labels can be warped into the scan (see :func:`default_mode`); it won on hn-openkbp
#: (README, "Prompt modes"). box3d is the paper's prompt.
DEFAULT_MODE = "slice"


@dataclass
class PromptOptions:
    mode: str = DEFAULT_MODE
    #: fraction of the supports that must label a voxel for the prior to have the organ there
    prior_threshold: float = 0.2
    #: in-plane margin of each slice's box, px of SAM's 1024 grid (METHOD.md §1 uses 10)
    margin_px: float = 10.0
    #: k: slices past each end of the prior that still get the end slice's box (``slice``)
    end_slices: int = 2
    #: margin around the previous slice's ensemble mask, px of the 1024 grid (``propagate``)
    grow_px: float = 10.0
    #: a previous mask smaller than this (pixels) has vanished
    min_mask_px: int = 2
    #: the mask's box has jumped where its area exceeds this multiple of the prior's box ...
    jump_area: float = 2.0
    #: ... or where it overlaps the prior's box by less than this IoU
    jump_iou: float = 0.1
    #: slices past each end of the prior that ``propagate`` may still follow the mask into
    reach: int = 4
    #: embeddings ``propagate`` keeps for later at once, MiB (past it, a slice is encoded again)
    cache_mib: float = 2048.0
    #: SAM sees a crop around the organs (URSAMLib.sam.views): "auto" (slice and propagate, not the
    #: paper's box3d), "on" or "off"
    zoom: str = "auto"

    def check(self):
        if self.mode != AUTO:
            check_mode(self.mode)
        if self.zoom not in ZOOMS:
            raise URSAMError(f"zoom must be one of {', '.join(ZOOMS)}, got {self.zoom!r}")
        if not 0 <= self.prior_threshold <= 1:
            raise URSAMError(f"the prior threshold must be in [0, 1], got {self.prior_threshold}")
        return self

    def zoomed(self, mode=None):
        """Whether SAM sees the zoomed crop in ``mode`` (default: this options' mode)."""
        self.check()
        return self.zoom == "on" or (self.zoom == "auto" and (mode or self.mode) != "box3d")

    def to_json(self):
        return asdict(self)


def check_mode(mode):
    if mode not in MODES:
        raise URSAMError(f"unknown prompt mode {mode!r}; choose one of {', '.join(MODES)}")
    return mode


def default_mode(localizer="registration", boxes=None):
    """The prompt mode when none is asked for.

    With a box file (``boxes``): its own prompts, ``slice`` where it has
    per-slice boxes (``ursam localize`` writes them), else the paper's box3d.
    With a template library: :data:`DEFAULT_MODE` for the registration
    localizer, whose registrations warp the support labels; box3d for the
    others (MedLAM gives boxes only).
    """
    if boxes is not None:
        return "slice" if any(getattr(b, "slice_boxes", None) for b in boxes) else "box3d"
    return DEFAULT_MODE if localizer in (None, "registration") else "box3d"


def parse_modes(text):
    """A comma-separated list of modes (``ursam evaluate --prompts``), in the order given, no repeats."""
    modes = [m.strip().lower() for m in str(text).split(",") if m.strip()]
    if not modes:
        raise URSAMError("--prompts needs at least one of " + ", ".join(MODES))
    for m in modes:
        check_mode(m)
    return list(dict.fromkeys(modes))


# ----------------------------------------------------------------------------------------------
# Boxes per slice

def prior_slice_boxes(prior, options, size_xyz):
    """``({z: box}, areas {z: prior pixels})`` of the prior's slices, margin included, no end slices."""
    m = prior.mask(options.prior_threshold)
    d = grid_px_to_slice_px(options.margin_px, size_xyz)
    z0, y0, x0 = prior.origin
    boxes, areas = {}, {}
    for k in range(m.shape[0]):
        b = bbox2d(m[k])
        if b is None:
            continue
        b[[0, 2]] += x0
        b[[1, 3]] += y0
        boxes[z0 + k] = grow_box(b, d, size_xyz)
        areas[z0 + k] = int(np.count_nonzero(m[k]))
    return boxes, areas


def _with_ends(boxes, k, n_slices):
    """The boxes plus ``k`` slices past each end carrying the end slice's box."""
    if not boxes:
        return {}
    out = dict(boxes)
    lo, hi = min(boxes), max(boxes)
    for j in range(1, k + 1):
        if lo - j >= 0:
            out[lo - j] = boxes[lo].copy()
        if hi + j < n_slices:
            out[hi + j] = boxes[hi].copy()
    return out


def _bounding(label, name, slice_boxes, notes):
    zs = sorted(slice_boxes)
    arr = np.array([slice_boxes[z] for z in zs])
    lo = [int(arr[:, 0].min()), int(arr[:, 1].min()), zs[0]]
    hi = [int(arr[:, 2].max()), int(arr[:, 3].max()), zs[-1]]
    sb = {int(z): [int(v) for v in slice_boxes[z]] for z in zs}
    return OrganBox(int(label), name, lo, hi, list(notes), slice_boxes=sb)


def _propagation_region(box, prior_boxes, options, size_xyz, notes):
    """propagate's bounding region: the prior's slices plus ``reach`` slices at each end, in-plane
    the prior's boxes grown by four times the mask margin (the sweep may follow the organ out of them)."""
    region = _bounding(box.label, box.name, _with_ends(prior_boxes, options.reach, size_xyz[2]), notes)
    d = grid_px_to_slice_px(4 * options.grow_px, size_xyz)
    lo = grow_box(np.array(region.min_ijk[:2] + region.max_ijk[:2], np.float64), d, size_xyz)
    region.min_ijk[:2], region.max_ijk[:2] = [int(lo[0]), int(lo[1])], [int(lo[2]), int(lo[3])]
    region.slice_boxes = {}
    return region


#: noted on a box that a slice-adaptive mode prompted with its 3D box (no warped prior reached it)
FALLBACK_NOTE = "fell back to the 3D box"


def fallback_warnings(boxes, mode):
    """One warning per organ that ``mode`` prompted with its 3D box after all: the user asked for
    another prompt and should know this organ got the paper's."""
    if mode == "box3d":
        return []
    return [f"{b.name}: no support labels were warped onto it, so the {mode} prompt used its 3D box (box3d)"
            for b in boxes if any(FALLBACK_NOTE in n for n in b.notes)]


@dataclass
class PromptSet:
    """One prompt mode's prompts on one scan, what the pipeline decodes (:func:`URSAMLib.pipeline.run`).

    ``boxes``: each organ's :class:`OrganBox` (its region; ``slice_boxes``
    say which slice gets which box); ``plan``: propagate's slice plan (None
    for the other modes); ``priors``: ``{label: Prior}`` where the support
    labels were warped (the atlas prior of rectification and the fusion's
    atlas sources); ``fusions``: ``{label: OrganFusion}``, the calibrated
    fusion of the organs this mode's SAM maps serve; ``info``: JSON for
    report.json.
    """
    mode: str
    boxes: List[OrganBox]
    plan: Optional[Propagation] = None
    priors: Optional[Dict[int, Prior]] = None
    fusions: Dict[int, OrganFusion] = field(default_factory=dict)
    info: dict = field(default_factory=dict)


def prompt_set(boxes, warped: Optional[WarpedSupports], options, size_xyz):
    """The :class:`PromptSet` of ``options.mode`` for the localized (or given) ``boxes``.

    ``warped``: the supports warped into the scan (:func:`URSAMLib.atlas_prior.warp_supports`),
    whose priors give the slice-adaptive modes their boxes; None for boxes
    from a file or drawn by the user, which keep their own per-slice boxes.
    """
    info = {"mode": options.mode, "options": options.to_json()}
    if warped is None:
        out, plan = prompts_from_box_file(list(boxes), options, size_xyz)
        return PromptSet(options.mode, out, plan, info=info)
    info.update(warped.info())
    out, plan = make_prompts(boxes, warped.priors, options, size_xyz)
    return PromptSet(options.mode, out, plan, warped.priors, info=info)


def make_prompts(boxes, priors, options, size_xyz):
    """The boxes of ``options.mode`` and the pipeline's slice plan (None but for ``propagate``).

    ``boxes``: the localizer's 3D boxes (used as they are by ``box3d``, and for
    an organ that has no prior); ``priors``: ``{label: atlas_prior.Prior}``
    with the boxes' label values; ``size_xyz``: the query's size.
    """
    mode = check_mode(options.mode)
    if mode == "box3d":
        return list(boxes), None
    out, starts, fallbacks = [], {}, {}
    for b in boxes:
        prior = priors.get(b.label)
        pboxes, areas = prior_slice_boxes(prior, options, size_xyz) if prior is not None else ({}, {})
        if not pboxes:
            out.append(OrganBox(b.label, b.name, list(b.min_ijk), list(b.max_ijk),
                                b.notes + [f"no warped prior; {mode} {FALLBACK_NOTE}"]))
            continue
        note = f"{mode} prompts from the prior of {prior.n_supports} support(s)"
        if mode == "slice":
            out.append(_bounding(b.label, b.name, _with_ends(pboxes, options.end_slices, size_xyz[2]), [note]))
            continue
        # propagate: the region is the prior's reach; the boxes are chosen as the sweep goes.
        out.append(_propagation_region(b, pboxes, options, size_xyz, [note]))
        starts[b.label] = max(areas, key=lambda z: (areas[z], -z))
        fallbacks[b.label] = pboxes
    plan = Propagation(starts, fallbacks, options, size_xyz) if mode == "propagate" else None
    return out, plan


def prompts_from_box_file(boxes, options, size_xyz):
    """``(boxes, plan)`` of ``options.mode`` for boxes read from a box file.

    ``slice`` uses the file's per-slice boxes as they are; ``propagate`` takes
    them as the prior's boxes (its fallback) and starts on the slice whose box
    is largest. Boxes without per-slice boxes keep the paper's prompt.
    """
    mode = check_mode(options.mode)
    if mode == "box3d":
        return [OrganBox(b.label, b.name, list(b.min_ijk), list(b.max_ijk), list(b.notes)) for b in boxes], None
    if not any(b.slice_boxes for b in boxes):
        raise URSAMError(f"prompt mode {mode} needs per-slice boxes: give --templates, or a box file with "
                         '"slice_boxes" (ursam localize --prompts slice writes one)')
    if mode == "slice":
        return list(boxes), None
    out, starts, fallbacks = [], {}, {}
    for b in boxes:
        if not b.slice_boxes:
            out.append(b)
            continue
        pboxes = {z: np.asarray(v, np.float64) for z, v in b.slice_boxes.items()}
        out.append(_propagation_region(b, pboxes, options, size_xyz, b.notes))
        starts[b.label] = max(pboxes, key=lambda z: (box_area(pboxes[z]), -z))
        fallbacks[b.label] = pboxes
    return out, Propagation(starts, fallbacks, options, size_xyz)
