"""The quality step of a run: each organ of a :class:`URSAMLib.result.SegmentationResult` assessed.

For every segmented organ, its :class:`OrganEvidence` is read from the
result's maps over the organ's region (the probability behind its mask, the
mask as the result's label map has it, the fusion's sources, the image as SAM
saw it) and assessed under the library's :class:`QualityModel` (fitted by the
calibration); without one, under an uncalibrated model (the expected Dice of
the probability, a wide interval). The probability is the calibrated fusion's
where the organ was fused, else SAM's ensemble (not calibrated: its estimate
says so).
"""
from __future__ import annotations

from typing import Dict, Optional

import numpy as np

from .. import pipeline
from .features import OrganEvidence
from .model import OrganQuality, QualityModel
from .report import input_slice_index


def organ_evidence(o, label_map, spacing_zyx, orientation=None):
    """The :class:`OrganEvidence` of one organ's maps (``o``: a
    :class:`URSAMLib.pipeline.OrganMaps`), ``label_map``: the result's on the
    canonical grid (so that the mask is the organ's after overlaps went to
    their organs). Returns ``(evidence, calibrated)``; None for an organ
    without a probability map."""
    if o.fused is not None:
        probability, calibrated = o.fused.probability, True
        sources = dict(o.evidence().sources)
    elif o.p_mean is not None:
        probability, calibrated = o.p_mean, False
        sources = {"sam": o.p_mean}
        if o.prior is not None:
            sources["atlas"] = o.prior.on(o.sl)
    else:
        return None
    mask = label_map[o.sl] == o.label
    nz = o.sl[0].stop - o.sl[0].start
    n_supports = o.prior.n_supports if o.prior is not None else 1
    intensity = None if o.intensity is None else o.intensity.astype(np.float32)
    evidence = OrganEvidence(o.name, probability, mask, sources, tuple(float(s) for s in spacing_zyx), n_supports,
                             input_slice_index(orientation, o.sl[0].start, nz), intensity)
    return evidence, calibrated


def assess_result(result, model: Optional[QualityModel] = None, threshold=None) -> Dict[str, OrganQuality]:
    """``{organ name: OrganQuality}`` of every main organ of ``result``; ``model``: the library's (None:
    uncalibrated); ``threshold``: the user's review threshold (None: the library's per organ)."""
    model = model if model is not None else QualityModel()
    shape = result._canonical_shape()
    label_map = pipeline.label_map(result.organs, result.rectified_method, shape)
    reference = result.reference if result.orientation is None else \
        result.orientation.canonical_image(result.reference)
    spacing_zyx = reference.GetSpacing()[::-1]
    out = {}
    for o in result.main_organs():
        found = organ_evidence(o, label_map, spacing_zyx, result.orientation)
        if found is None:
            continue
        evidence, calibrated = found
        # an organ that was not fused has no calibrated probability for the library's model to read
        quality = (model if calibrated else QualityModel()).assess(evidence, threshold)
        quality.region = o.sl
        out[o.name] = quality
    return out
