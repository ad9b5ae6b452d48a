"""What one scan's run gives: a :class:`SegmentationResult` (every organ's maps) and its report.

The maps are on the scan's canonical grid (:mod:`URSAMLib.orientation`); the
accessors give label maps, uncertainty and error maps on the input's own grid.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import numpy as np
import SimpleITK as sitk

from . import __version__, pipeline
from .boxes import OrganBox
from .metrics import dice
from .orientation import Orientation
from .pipeline import MAIN, OrganMaps
from .quality.model import OrganQuality
from .quality.report import quality_dict
from .settings import Settings

#: what each mask that ``rectified.nii.gz`` can hold is, in report.json
RECTIFIED_METHODS = {
    pipeline.URSAM: "UR-SAM: the paper's Algorithm 1 (class-specific threshold, intensity rectification)",
    pipeline.URSAM_ATLAS: "UR-SAM with the atlas prior: Algorithm 1, where the support labels warped into "
                          "the scan also add uncertain voxels and veto voxels they do not reach",
    pipeline.FUSION: "the calibrated atlas-SAM fusion: per organ, SAM's ensemble and the warped support labels "
                     "pooled with the weights, temperature and threshold fitted on the template library",
}


@dataclass
class OutputMaps:
    """The maps a run outputs, on the input's grid ([z, y, x]): the ensemble's and the result's label maps,
    the uncertainty (the maximum over organs) and the label map of the flagged voxels; ``organs``:
    ``[(label, name)]`` of the method's organs."""
    ensemble: np.ndarray
    rectified: np.ndarray
    uncertainty: np.ndarray
    flagged: np.ndarray
    organs: List[Tuple[int, str]]


@dataclass
class SegmentationResult:
    """One scan's run: every organ's maps (the method's prompts, and any baseline's), the settings, what
    each step did.

    ``reference`` (the input's grid, voxels unused) and ``volume`` (float32
    [z, y, x], HU) are the input's; ``boxes`` the boxes each organ was
    prompted with, in the input's voxel indices.
    """
    reference: sitk.Image
    volume: np.ndarray
    boxes: List[OrganBox]
    organs: List[OrganMaps]
    settings: Settings
    #: what the SAM backend was (JSON)
    backend: dict
    #: seconds by stage (and counts: distinct slices, encoder calls)
    timings: dict
    warnings: List[str] = field(default_factory=list)
    #: the run's inputs and what localization, the prompts and the calibration did (JSON, report.json)
    inputs: dict = field(default_factory=dict)
    #: the pipeline method whose masks are the result (``rectified.nii.gz``)
    rectified_method: str = pipeline.URSAM
    #: each organ's quality estimate (URSAMLib.quality.model.OrganQuality), by name
    quality: Dict[str, OrganQuality] = field(default_factory=dict)
    #: the input's reorientation: ``organs`` (their boxes and maps) are on the canonical grid;
    #: ``reference``, ``volume``, ``boxes`` and every accessor's map are on the input's. None: the input
    #: was canonical already.
    orientation: Optional[Orientation] = None

    @property
    def params(self):
        return self.settings.params

    @property
    def shape(self):
        return self.volume.shape

    @property
    def voxel_ml(self):
        return float(np.prod(self.reference.GetSpacing())) / 1000.0

    @property
    def prompt_info(self):
        """What the prompt mode did (JSON): the mode that ran, its options, the prior's supports."""
        return self.inputs.get("prompts", {})

    def label_map(self, method=None, prompt_set=MAIN):
        """The label map of ``method`` (default: the result, :attr:`rectified_method`)."""
        return self.to_input(pipeline.label_map(self.organs, method or self.rectified_method,
                                                self._canonical_shape(), prompt_set))

    def output_maps(self):
        """Every map a run outputs (:class:`OutputMaps`), computed once for the files and for Slicer."""
        uncertainty, flagged = self.uncertainty_maps()
        return OutputMaps(self.label_map(pipeline.ENSEMBLE), self.label_map(), uncertainty, flagged,
                          [(o.label, o.name) for o in self.main_organs()])

    def uncertainty_maps(self):
        return tuple(self.to_input(m) for m in pipeline.uncertainty_maps(self.organs, self._canonical_shape()))

    def error_map(self):
        """Each voxel's probability of being wrong in the result, on the input's grid: the quality
        estimate's where it was made under a calibrated model (URSAMLib.quality), else the fused
        probability's own (pipeline.error_map); None where nothing was fused."""
        calibrated = [q for q in self.quality.values() if q.calibrated and q.error is not None]
        if not calibrated:
            errors = pipeline.error_map(self.organs, self._canonical_shape())
            return None if errors is None else self.to_input(errors)
        errors = np.zeros(self._canonical_shape(), np.float32)
        for q in calibrated:
            np.maximum(errors[q.region], q.error, out=errors[q.region])
        return self.to_input(errors)

    def organ_map(self, o, values, fill=0):
        """One organ's map over its region (``o.sl``), on the whole input grid (``fill`` elsewhere)."""
        full = np.full(self._canonical_shape(), fill, dtype=np.asarray(values).dtype)
        full[o.sl] = values
        return self.to_input(full)

    # -- the input's grid and the canonical one (URSAMLib.orientation) ---------------------------
    def _canonical_shape(self):
        return self.shape if self.orientation is None else self.orientation.canonical_size[::-1]

    def to_input(self, array):
        """An array [z, y, x] on the grid of :attr:`organs`' maps, on the input's grid."""
        return array if self.orientation is None else self.orientation.to_input(array)

    def to_canonical(self, array):
        """An array [z, y, x] on the input's grid, on the grid of :attr:`organs`' maps (``o.sl``)."""
        return array if self.orientation is None else self.orientation.to_canonical(array)

    def input_box(self, box):
        """A box of :attr:`organs` (canonical voxel indices) in the input's voxel indices."""
        return box if self.orientation is None else self.orientation.box_to_input(box)

    def rerectify(self, rectify_options):
        """New rectification options on the cached maps: no SAM rerun."""
        self.settings.params.rectify = rectify_options.check()
        t0 = time.perf_counter()
        for o in self.organs:
            pipeline.finish_organ(o, self.params)
        self.rectified_method = rectified_method(self.organs, self.params)
        self.timings["rectify_seconds"] = time.perf_counter() - t0
        return self

    def dice_table(self, truth_zyx, methods=None, prompt_set=MAIN):
        """Per-method, per-organ Dice against a reference label map on the input's grid, with the boxes'
        label values (``ursam segment --reference``)."""
        if methods is None:
            main = self.main_organs()
            has_prior = any(o.prior is not None for o in main)
            fused = any(o.fused is not None for o in main)
            methods = [m for m in pipeline.METHODS if (m != pipeline.URSAM_ATLAS or has_prior)
                       and (m != pipeline.FUSION or fused)]
        table = {}
        for method in methods:
            labels = self.label_map(method, prompt_set)
            table[method] = {o.name: dice(labels == o.label, truth_zyx == o.label)
                             for o in self.organs if o.prompt_set == prompt_set}
        return table

    def main_organs(self):
        return [o for o in self.organs if o.prompt_set == MAIN]

    def report(self, ensemble=None, rectified=None, unc_labels=None):
        ensemble = self.label_map(pipeline.ENSEMBLE) if ensemble is None else ensemble
        rectified = self.label_map() if rectified is None else rectified
        unc_labels = self.uncertainty_maps()[1] if unc_labels is None else unc_labels
        organs = []
        for o in self.main_organs():
            inner = o.box_in_region
            u_own = o.uncertainty()[0]
            u_box = u_own[inner] if u_own is not None else None
            n_ens = int(np.count_nonzero(ensemble == o.label))
            n_rect = int(np.count_nonzero(rectified == o.label))
            flagged = unc_labels == o.label
            n_flag = int(np.count_nonzero(flagged))
            # The share the Slicer statistics table shows: flagged over flagged-or-rectified voxels.
            n_union = int(np.count_nonzero(flagged | (rectified == o.label)))
            organs.append({
                "label": o.label, "name": o.name, "box": self.input_box(o.box).to_json(),
                "ensemble_voxels": n_ens, "ensemble_ml": round(n_ens * self.voxel_ml, 3),
                "rectified_voxels": n_rect, "rectified_ml": round(n_rect * self.voxel_ml, 3),
                "mean_uncertainty_in_box": float(u_box.mean()) if u_box is not None else None,
                "fusion": o.fusion.to_json() if o.fused is not None else None,
                # counted on uncertain.nii.gz, where overlaps went to the organ of the higher u
                "flagged_voxels": n_flag, "flagged_or_rectified_voxels": n_union,
                "flagged_fraction": n_flag / n_union if n_union else 0.0,
                "threshold_T": o.info.get("T"),
                "I_t": o.info.get("I_t"), "I_b": o.info.get("I_b"),
                "atlas_prior": o.prior is not None,
                # False where the calibrated fusion gives SAM no weight: SAM did not segment the organ
                "sam_run": o.sam_run,
                "notes": list(o.box.notes),
            })
            q = self.quality.get(o.name)
            if q is not None:
                organs[-1]["quality"] = quality_dict(q.predicted_dice, q.interval, q.review, q.slices)
                # fitted on the library's leave-one-out runs, or the probability's expected Dice alone
                organs[-1]["quality_calibrated"] = bool(q.calibrated)
        return {"ursam_version": __version__, "inputs": self.inputs, "backend": self.backend,
                "rectified_method": {"name": self.rectified_method,
                                     "description": RECTIFIED_METHODS.get(self.rectified_method, "")},
                "parameters": self.settings.to_json(), "timings_seconds": self.timings,
                "image": {"size_xyz": list(self.reference.GetSize()),
                          "spacing_xyz": list(self.reference.GetSpacing()),
                          "origin": list(self.reference.GetOrigin()),
                          "direction": list(self.reference.GetDirection())},
                "organs": organs, "warnings": list(self.warnings)}


def rectified_method(organs, params):
    """The result's method: the calibrated fusion where a calibration fused the organs; else Algorithm 1
    with the atlas prior where the run warped the support labels and the settings ask for the prior;
    else Algorithm 1."""
    main = [o for o in organs if o.prompt_set == MAIN]
    if any(o.fused is not None for o in main):
        return pipeline.FUSION
    has_prior = any(o.prior is not None for o in main)
    return pipeline.URSAM_ATLAS if has_prior and params.rectify.atlas_prior else pipeline.URSAM


