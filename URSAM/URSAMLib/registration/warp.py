"""Support labels carried into the query by the support registrations; the majority-vote atlas."""
from __future__ import annotations

import numpy as np
import SimpleITK as sitk

from ..errors import URSAMError


def warp_labels(reference, registration, template, values):
    """A support's label map (only ``values``) resampled onto the query grid, nearest neighbour."""
    label_image, labels = template.read_labels()
    keep = np.where(np.isin(labels, list(values)), labels, 0).astype(np.uint16)
    moving = sitk.GetImageFromArray(keep)
    moving.CopyInformation(label_image)
    return sitk.Resample(moving, reference, registration.transform, sitk.sitkNearestNeighbor, 0,
                         sitk.sitkUInt16)


#: how the warped support labels are combined into one label map
LABEL_FUSIONS = ("vote", "staple")


def atlas_labels(reference, registrations, library, values, fusion="vote"):
    """Multi-atlas segmentation of the query: every support's labels warped, then fused.

    The classic baseline without SAM (``ursam evaluate`` method ``atlas``).
    ``fusion="vote"``: a voxel takes the label most supports give it,
    background included; ties go to background. ``"staple"``: SimpleITK's
    multi-label STAPLE (Warfield et al.), which weighs each support by its
    estimated performance. Returns an int32 array [z, y, x] on ``reference``'s grid.
    """
    by_id = {t.case_id: t for t in library.templates()}
    warped = [warp_labels(reference, r, by_id[r.case_id], values) for r in registrations]
    if not warped:
        raise URSAMError("no registered support scan to build the atlas from", library.meta_path)
    if fusion not in LABEL_FUSIONS:
        raise URSAMError(f"unknown label fusion {fusion!r}; choose one of {', '.join(LABEL_FUSIONS)}")
    if len(warped) == 1:
        voted = warped[0]
    elif fusion == "staple":
        voted = sitk.MultiLabelSTAPLE(warped, 0)
    else:
        voted = sitk.LabelVoting(warped, 0)
    return sitk.GetArrayFromImage(voted).astype(np.int32)
