"""The result of localization (METHOD.md §1): a :class:`Localization` of one query's organs.

Every localizer (:data:`URSAMLib.localize.LOCALIZERS`) returns one; the
registration localizer's keeps the support registrations, which warp the
support labels into the query for the slice-adaptive prompts, the atlas prior
and the atlas baseline, each computed once per query and kept here.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from .boxes import OrganBox
from .errors import URSAMError
from .progress import STAGE_DEFORM

#: METHOD.md §1: 2 slices in z, 10 px of SAM's 1024 grid in-plane
DEFAULT_MARGIN = (2, 10.0)


def check_margin(margin):
    """A margin ``(z_slices, grid_px)``, both at least 0."""
    try:
        z, xy = margin
        z, xy = int(round(float(z))), float(xy)
    except (TypeError, ValueError):
        raise URSAMError(f"the box margin must be two numbers Z,XY, got {margin!r}") from None
    if z < 0 or xy < 0:
        raise URSAMError(f"the box margin must not be negative, got {z},{xy:g}")
    return z, xy


def parse_margin(text):
    """``"Z,XY"`` (slices, px of SAM's 1024 grid) as a checked margin."""
    parts = [p.strip() for p in str(text).split(",")]
    if len(parts) != 2:
        raise URSAMError(f"the box margin must be Z,XY (two numbers), got {text!r}")
    return check_margin(parts)


@dataclass
class Localization:
    """One query's organ boxes and what found them.

    ``boxes``: :class:`OrganBox` in the query's voxel indices, margin
    included. ``info``: JSON-ready (for report.json). ``query``: the query CT
    (a path, or a SimpleITK image in HU). ``library``: the template library.
    ``registrations``: the support registrations (registration localizer;
    None for MedLAM and for box files). ``relabel``: the library's label
    values to the values of ``boxes`` where they differ (an evaluation dataset
    numbers its organs its own way).
    """
    boxes: list
    info: dict = field(default_factory=dict)
    query: object = None
    library: object = None
    registrations: list = None
    relabel: dict = field(default_factory=dict)
    _refined: dict = field(default_factory=dict, repr=False, compare=False)
    _priors: dict = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_boxes(cls, boxes, source=None):
        """Boxes from a box file or drawn by the user: nothing to warp."""
        return cls(list(boxes), {"method": "boxes", **({"source": str(source)} if source else {})})

    @property
    def warps_labels(self):
        """Whether the support labels can be warped into the query (the registration localizer)."""
        return bool(self.registrations) and self.library is not None

    def relabeled(self, relabel, keep=None):
        """The same localization with the boxes' label values mapped by ``relabel`` (library value ->
        new value); boxes whose new value is not in ``keep`` (if given) are left out."""
        boxes = [OrganBox(relabel[b.label], b.name, list(b.min_ijk), list(b.max_ijk), list(b.notes),
                          slice_boxes=b.slice_boxes)
                 for b in self.boxes if b.label in relabel and (keep is None or relabel[b.label] in keep)]
        return Localization(boxes, self.info, self.query, self.library, self.registrations, dict(relabel),
                            self._refined, self._priors)

    def library_values(self):
        """The library's label values of the boxes."""
        back = {v: k for k, v in self.relabel.items()}
        return [back.get(b.label, b.label) for b in self.boxes]

    def refined(self, deformable_options=None, progress=None):
        """The support registrations with the deformable stage on top (computed once per options)."""
        from .registration.deformable import refine_registrations

        if not self.warps_labels:
            raise URSAMError("warping the support labels needs the support registrations of the registration "
                             "localizer (a template library)")
        if deformable_options is None or deformable_options.method == "none":
            return self.registrations
        key = repr(deformable_options.to_json())
        if key not in self._refined:
            if progress:
                progress.stage(f"{STAGE_DEFORM} ({deformable_options.method}, {len(self.registrations)} support scans)")
            t0 = time.perf_counter()
            regs = refine_registrations(self.query, self.registrations, self.library, deformable_options, progress)
            info = {"options": deformable_options.to_json(), "seconds": round(time.perf_counter() - t0, 2),
                    "seconds_per_support": {r.case_id: round(r.stages.get("deformable", 0.0), 2) for r in regs}}
            self._refined[key] = (regs, info)
        return self._refined[key][0]

    def deformable_info(self, deformable_options):
        """What the deformable stage of these options did (JSON), None if it did not run."""
        if deformable_options is None:
            return None
        entry = self._refined.get(repr(deformable_options.to_json()))
        return entry[1] if entry else None

    def priors(self, reference, deformable_options=None, progress=None, local=None):
        """``({label: atlas_prior.Prior}, info)``: the support labels warped onto ``reference`` and fused
        (computed once per deformable options, grid and weighting); labels as the boxes'. ``local``: an
        :class:`URSAMLib.atlas_prior.LocalWeighting` for the locally weighted votes too."""
        from .atlas_prior import fuse_priors

        # the grid too: segment_query asks on the scan's canonical grid, another caller may ask on its own
        grid = (reference.GetSize(), reference.GetOrigin(), reference.GetSpacing(), reference.GetDirection())
        key = repr((deformable_options.to_json() if deformable_options is not None else None, grid, local))
        if key not in self._priors:
            regs = self.refined(deformable_options, progress)
            t0 = time.perf_counter()
            priors = fuse_priors(reference, regs, self.library, self.library_values(), local=local)
            priors = {self.relabel.get(v, v): p for v, p in priors.items()}
            for v, p in priors.items():
                p.label = v
            info = {"prior_seconds": round(time.perf_counter() - t0, 2),
                    "prior_supports": {p.name: p.n_supports for p in priors.values()}}
            deformable = self.deformable_info(deformable_options)
            if deformable:
                info["deformable"] = deformable
            self._priors[key] = (priors, info)
        return self._priors[key]

    def atlas(self, reference, deformable_options=None, progress=None, fusion="vote"):
        """The multi-atlas segmentation of the supports (no SAM) on ``reference``, in the boxes' label values:
        a majority vote, or STAPLE (``fusion``); with the deformable stage of ``deformable_options`` on top
        of the affine registrations."""
        from .registration.warp import atlas_labels

        voted = atlas_labels(reference, self.refined(deformable_options, progress), self.library,
                             self.library_values(), fusion)
        if not self.relabel:
            return voted
        out = np.zeros_like(voted)
        for lib_value, value in self.relabel.items():
            out[voted == lib_value] = value
        return out
