"""What localization (METHOD.md §1) gives: a :class:`Localization` of one query's organs, and the box margin.

Every localizer (:data:`URSAMLib.localizers.LOCALIZERS`) returns one; the
registration localizer's keeps the (affine) support registrations, from which
the next step, :func:`URSAMLib.atlas_prior.warp_supports`, warps the support
labels into the query.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, List, Optional, Union

from .boxes import OrganBox
from .errors import URSAMError

if TYPE_CHECKING:
    import SimpleITK as sitk

    from .registration.affine import SupportRegistration
    from .templates import Library

#: METHOD.md §1: 2 slices in z, 10 px of SAM's 1024 grid in-plane (localized boxes)
DEFAULT_MARGIN = (2, 10.0)
#: boxes given (a box file, ROIs) are prompted as they are, unless a margin is asked for
NO_MARGIN = (0, 0.0)


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
    boxes: List[OrganBox]
    info: dict = field(default_factory=dict)
    #: the query as the localizer read it: a path, or a SimpleITK image in HU
    query: Optional[Union[str, sitk.Image]] = None
    library: Optional[Library] = None
    registrations: Optional[List[SupportRegistration]] = None
    relabel: dict = field(default_factory=dict)

    @classmethod
    def from_boxes(cls, boxes, source=None, margin=NO_MARGIN):
        """Boxes from a box file or drawn by the user (``margin`` added): nothing to warp."""
        return cls(list(boxes), {"method": "boxes", **({"source": str(source)} if source else {}),
                                 "margin_z_xy": [int(margin[0]), float(margin[1])]})

    @property
    def given(self):
        """Whether the boxes were given (a box file, ROIs) rather than localized."""
        return self.info.get("method") == "boxes"

    @property
    def margin(self):
        """The margin its boxes carry: (slices in z, px of SAM's 1024 grid)."""
        z, xy = self.info.get("margin_z_xy", NO_MARGIN)
        return int(z), float(xy)

    @property
    def warps_labels(self):
        """Whether the support labels can be warped into the query (the registration localizer)."""
        return bool(self.registrations) and self.library is not None

    @property
    def library_values(self):
        """The library's label values of the boxes."""
        back = {v: k for k, v in self.relabel.items()}
        return [back.get(b.label, b.label) for b in self.boxes]
