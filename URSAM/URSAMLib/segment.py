"""One query scan through the method (METHOD.md §0), the one path of every caller.

:func:`segment_query` takes a scan, its :class:`URSAMLib.localization.Localization`
(or boxes from a file), a SAM backend and the run's
:class:`URSAMLib.settings.Settings`; it builds each slice's prompts
(:mod:`URSAMLib.prompt_modes`, with the atlas prior where the support labels
are warped), chooses SAM's view of the scan (:mod:`URSAMLib.sam.views`), runs
the per-slice pipeline and returns a :class:`SegmentationResult`. ``ursam
segment``, ``ursam evaluate``, ``ursam demo`` and the Slicer logic all call it,
so a method's mask is the same whichever of them made it.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from . import __version__
from . import pipeline
from .localization import Localization
from .progress import Progress
from .settings import Settings

OUTPUT_FILES = ("ensemble.nii.gz", "uncertainty.nii.gz", "uncertain.nii.gz", "rectified.nii.gz",
                "rectified.seg.nrrd", "report.json", "overview.png")

#: what each mask that ``rectified.nii.gz`` can hold is, in report.json
RECTIFIED_METHODS = {
    pipeline.URSAM: "UR-SAM: the paper's Algorithm 1 (class-specific threshold, intensity rectification)",
    pipeline.URSAM_ATLAS: "UR-SAM with the atlas prior: Algorithm 1, where the support labels warped into "
                          "the scan also add uncertain voxels and veto voxels they do not reach",
}


@dataclass
class SegmentationResult:
    reference: object  # SimpleITK image giving the grid
    volume: np.ndarray
    boxes: list  # the boxes each slice was prompted with
    organs: list  # pipeline.OrganMaps
    settings: Settings
    backend: dict
    timings: dict
    warnings: list = field(default_factory=list)
    inputs: dict = field(default_factory=dict)
    #: the pipeline method whose masks are the result (``rectified.nii.gz``)
    rectified_method: str = pipeline.URSAM

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

    def label_map(self, method=None, prompt_set="main"):
        """The label map of ``method`` (default: the result, :attr:`rectified_method`)."""
        return pipeline.label_map(self.organs, method or self.rectified_method, self.shape, prompt_set)

    def uncertainty_maps(self):
        return pipeline.uncertainty_maps(self.organs, self.shape)

    def rerectify(self, rectify_options):
        """New rectification options on the cached maps: no SAM rerun."""
        self.settings.params.rectify = rectify_options.check()
        t0 = time.perf_counter()
        for o in self.organs:
            pipeline.finish_organ(o, self.params)
        self.rectified_method = rectified_method(self.organs, self.params)
        self.timings["rectify_seconds"] = time.perf_counter() - t0
        return self

    def main_organs(self):
        return [o for o in self.organs if o.prompt_set == "main"]

    def report(self, ensemble=None, rectified=None, unc_labels=None):
        ensemble = self.label_map("ensemble") if ensemble is None else ensemble
        rectified = self.label_map() if rectified is None else rectified
        unc_labels = self.uncertainty_maps()[1] if unc_labels is None else unc_labels
        organs = []
        for o in self.main_organs():
            inner = o.box_in_region
            u_box = o.u[inner] if o.u is not None else None
            n_ens = int(np.count_nonzero(ensemble == o.label))
            n_rect = int(np.count_nonzero(rectified == o.label))
            flagged = unc_labels == o.label
            n_flag = int(np.count_nonzero(flagged))
            # The share the Slicer statistics table shows: flagged over flagged-or-rectified voxels.
            n_union = int(np.count_nonzero(flagged | (rectified == o.label)))
            organs.append({
                "label": o.label, "name": o.name, "box": o.box.to_json(),
                "ensemble_voxels": n_ens, "ensemble_ml": round(n_ens * self.voxel_ml, 3),
                "rectified_voxels": n_rect, "rectified_ml": round(n_rect * self.voxel_ml, 3),
                "mean_uncertainty_in_box": float(u_box.mean()) if u_box is not None else None,
                # counted on uncertain.nii.gz, where overlaps went to the organ of the higher u
                "flagged_voxels": n_flag, "flagged_or_rectified_voxels": n_union,
                "flagged_fraction": n_flag / n_union if n_union else 0.0,
                "threshold_T": o.info.get("T"),
                "I_t": o.info.get("I_t"), "I_b": o.info.get("I_b"),
                "atlas_prior": o.prior is not None,
                "notes": list(o.box.notes),
            })
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
    """The result's method: Algorithm 1 with the atlas prior where the run warped the support labels
    and the settings ask for the prior, else Algorithm 1."""
    has_prior = any(o.prior is not None for o in organs if o.prompt_set == "main")
    return pipeline.URSAM_ATLAS if has_prior and params.rectify.atlas_prior else pipeline.URSAM


def _prompts(localization, reference, settings, progress):
    """``(boxes, plan, info, priors)``: each slice's prompts in the settings' mode."""
    from .prompt_modes import make_prompts, prompts_from_box_file

    popts = settings.prompts
    size = reference.GetSize()
    info = {"mode": popts.mode, "options": popts.to_json()}
    if settings.warps_labels(localization):
        priors, prior_info = localization.priors(reference, settings.deformable, progress)
        info.update(prior_info)
        boxes, plan = make_prompts(localization.boxes, priors, popts, size)
        return boxes, plan, info, priors
    boxes, plan = prompts_from_box_file(list(localization.boxes), popts, size)
    return boxes, plan, info, None


def segment_query(volume, reference, localization, backend, settings=None, progress=None, extra_sets=None,
                  inputs=None):
    """The method on one query scan: a :class:`SegmentationResult`.

    ``volume``: the scan as float32 [z, y, x] in HU; ``reference``: the
    SimpleITK image giving its grid. ``localization``: a
    :class:`URSAMLib.localization.Localization`, or a list of boxes (a box file's,
    or ROIs: nothing to warp, so they keep their own prompts). ``backend``: a
    SAM backend (:mod:`URSAMLib.sam.backends`) or a
    :class:`URSAMLib.sam.views.Views` of one, which lets several runs on one
    scan (the prompt modes of an evaluation) share their slice embeddings.
    ``extra_sets``: more prompt sets decoded once each, without augmentation,
    against the same embeddings (the evaluation's manual-prompt baseline).
    """
    from .prompt_modes import fallback_warnings
    from .sam.views import Views, organ_crop

    settings = (settings or Settings()).check()
    progress = progress or Progress()
    if not isinstance(localization, Localization):
        localization = Localization.from_boxes(localization)
    boxes, plan, info, priors = _prompts(localization, reference, settings, progress)
    for warning in fallback_warnings(boxes, settings.prompts.mode):
        progress.warn(warning)
    views = backend if isinstance(backend, Views) else Views(backend)
    crop = None
    if settings.prompts.zoomed():
        # From the mode's own boxes only, so that every caller gives SAM the same view of the scan.
        crop = organ_crop(boxes, volume.shape, settings.params.region_pad)
        info["zoom_crop_yx"] = list(crop)
    view = views.view(crop)
    calls0 = views.encoder_calls
    t0 = time.perf_counter()
    organs, timings = pipeline.run(volume, view, boxes, settings.params, extra_sets, progress, plan=plan,
                                   priors=priors)
    timings["total_seconds"] = time.perf_counter() - t0
    timings["encoder_calls"] = views.encoder_calls - calls0
    if plan is not None:
        info["propagation"] = {str(k): v for k, v in plan.describe().items()}
    inputs = dict(inputs or {})
    inputs["prompts"] = info
    return SegmentationResult(reference, volume, list(boxes), organs, settings, view.describe(), timings,
                              warnings=list(progress.warnings), inputs=inputs,
                              rectified_method=rectified_method(organs, settings.params))


def write_results(result, out_dir, overwrite=False, progress=None, extra_files=None, extra_report=None):
    """Write every output of ``ursam segment`` into ``out_dir``, atomically as a folder."""
    from .imageio import write_image
    from .outputs import staged_output_dir, write_json, write_overview, write_seg_nrrd
    from .progress import STAGE_WRITE
    from .review import flagged_components

    progress = progress or Progress()
    progress.stage(STAGE_WRITE)
    t0 = time.perf_counter()
    ensemble = result.label_map("ensemble")
    rectified = result.label_map()
    u_full, unc_labels = result.uncertainty_maps()
    names = [(o.label, o.name) for o in result.main_organs()]
    with staged_output_dir(out_dir, overwrite) as stage:
        ref = result.reference
        write_image(ensemble, ref, stage / "ensemble.nii.gz")
        write_image(u_full, ref, stage / "uncertainty.nii.gz")
        write_image(unc_labels, ref, stage / "uncertain.nii.gz")
        write_image(rectified, ref, stage / "rectified.nii.gz")
        write_seg_nrrd(rectified, ref, names, stage / "rectified.seg.nrrd")
        write_overview(result.volume, rectified, u_full, names, stage / "overview.png")
        for name, writer in (extra_files or {}).items():
            writer(stage / name)
        result.timings["write_seconds"] = time.perf_counter() - t0
        report = result.report(ensemble, rectified, unc_labels)
        components = flagged_components(unc_labels, u_full, names, result.voxel_ml)
        report["flagged_components"] = [c.to_json() for c in components]
        for organ in report["organs"]:
            organ["flagged_regions"] = sum(c.label == organ["label"] for c in components)
        report.update(extra_report or {})
        write_json(report, stage / "report.json")
    progress.done()
    return out_dir
