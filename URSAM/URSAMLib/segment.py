"""One scan from boxes to results: the headless entry point the CLI and Slicer share."""
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import __version__
from . import pipeline
from .imageio import write_image
from .outputs import staged_output_dir, write_seg_nrrd, write_overview, write_json
from .progress import Progress
from .review import flagged_components

OUTPUT_FILES = ("ensemble.nii.gz", "uncertainty.nii.gz", "uncertain.nii.gz", "rectified.nii.gz",
                "rectified.seg.nrrd", "report.json", "overview.png")


@dataclass
class SegmentationResult:
    reference: object  # SimpleITK image giving the grid
    volume: np.ndarray
    boxes: list
    organs: list
    params: pipeline.Params
    backend: dict
    timings: dict
    warnings: list = field(default_factory=list)
    inputs: dict = field(default_factory=dict)
    #: the warped support labels ({label: prompts.Prior}) and PromptOptions, where the atlas prior
    #: rectified the masks: rerectify applies it again
    priors: dict = None
    prior_options: object = None

    @property
    def shape(self):
        return self.volume.shape

    @property
    def voxel_ml(self):
        return float(np.prod(self.reference.GetSpacing())) / 1000.0

    def label_map(self, method, prompt_set="main"):
        return pipeline.label_map(self.organs, method, self.shape, prompt_set)

    def uncertainty_maps(self):
        return pipeline.uncertainty_maps(self.organs, self.shape)

    def rerectify(self, rectify_options):
        """New rectification options on the cached maps: no SAM rerun."""
        self.params.rectify = rectify_options
        t0 = time.perf_counter()
        for o in self.organs:
            pipeline.finish_organ(o, self.params)
        if self.priors:
            from .prompts import apply_prior_rectification

            apply_prior_rectification(self.organs, self.priors, self.prior_options)
        self.timings["rectify_seconds"] = time.perf_counter() - t0
        return self

    def dice_table(self, truth_zyx, methods=pipeline.METHODS, prompt_set="main"):
        """Per-method, per-organ Dice against a reference label map (same label values as the boxes)."""
        from .metrics import dice

        table = {}
        for method in methods:
            labels = self.label_map(method, prompt_set)
            table[method] = {o.name: dice(labels == o.label, truth_zyx == o.label)
                             for o in self.organs if o.prompt_set == prompt_set}
        return table

    def main_organs(self):
        return [o for o in self.organs if o.prompt_set == "main"]

    def report(self, ensemble=None, rectified=None, unc_labels=None):
        ensemble = self.label_map("ensemble") if ensemble is None else ensemble
        rectified = self.label_map("ursam") if rectified is None else rectified
        unc_labels = self.uncertainty_maps()[1] if unc_labels is None else unc_labels
        organs = []
        for o in self.main_organs():
            inner = o.box_in_region
            u_box = o.u[inner] if o.u is not None else None
            n_ens = int(np.count_nonzero(ensemble == o.label))
            n_rect = int(np.count_nonzero(rectified == o.label))
            organs.append({
                "label": o.label, "name": o.name, "box": o.box.to_json(),
                "ensemble_voxels": n_ens, "ensemble_ml": round(n_ens * self.voxel_ml, 3),
                "rectified_voxels": n_rect, "rectified_ml": round(n_rect * self.voxel_ml, 3),
                "mean_uncertainty_in_box": float(u_box.mean()) if u_box is not None else None,
                # counted on uncertain.nii.gz, where overlaps went to the organ of the higher u
                "flagged_voxels": int(np.count_nonzero(unc_labels == o.label)),
                "threshold_T": o.info.get("T"),
                "I_t": o.info.get("I_t"), "I_b": o.info.get("I_b"),
                "notes": list(o.box.notes),
            })
        return {"ursam_version": __version__, "inputs": self.inputs, "backend": self.backend,
                "parameters": self.params.to_json(), "timings_seconds": self.timings,
                "image": {"size_xyz": list(self.reference.GetSize()),
                          "spacing_xyz": list(self.reference.GetSpacing()),
                          "origin": list(self.reference.GetOrigin()),
                          "direction": list(self.reference.GetDirection())},
                "organs": organs, "warnings": list(self.warnings)}


def segment_volume(volume, reference, boxes, backend, params=None, extra_sets=None, progress=None,
                   inputs=None, plan=None):
    """Run the pipeline on an array already read; returns a :class:`SegmentationResult`.

    ``plan``: the slice plan of prompt mode propagate (URSAMLib.prompts), else None.
    """
    params = params or pipeline.Params()
    progress = progress or Progress()
    t0 = time.perf_counter()
    organs, timings = pipeline.run(volume, backend, boxes, params, extra_sets, progress, plan=plan)
    timings["total_seconds"] = time.perf_counter() - t0
    timings["encoder_calls"] = backend.encoder_calls
    return SegmentationResult(reference, volume, list(boxes), organs, params, backend.describe(), timings,
                              warnings=list(progress.warnings), inputs=dict(inputs or {}))


def segment_with_prompts(volume, reference, boxes, backend, params=None, prompt_options=None,
                         registrations=None, library=None, deformable_options=None, query=None, progress=None,
                         inputs=None):
    """Segment with a prompt mode (URSAMLib.prompts): the one path of ``ursam segment`` and Slicer.

    ``boxes``: the localizer's boxes (or a box file's). ``registrations`` and
    ``library``: the support registrations of the registration localizer
    (``localize(..., keep_transforms=True)``) and its template library; the
    slice-adaptive modes and the atlas prior need them. Without them, boxes
    with per-slice boxes of their own (a box file written by propagate or
    slice) keep those, and the others get the paper's box3d prompt.
    ``query``: the query CT in HU (SimpleITK image or path) for the
    deformable stage; default ``reference``. Returns ``(result, boxes,
    prompt_info)``: the boxes each slice got, and what the mode did (JSON).
    """
    from .prompts import (PromptOptions, apply_prior_rectification, default_mode, fallback_warnings,
                          prompts_from_box_file, prompts_from_registrations)

    params = params or pipeline.Params()
    progress = progress or Progress()
    popts = prompt_options or PromptOptions(mode=default_mode(boxes=None if registrations else boxes))
    priors = None
    size = reference.GetSize()
    if registrations:
        boxes, plan, info, priors = prompts_from_registrations(
            reference, boxes, registrations, library, popts, deformable_options, query=query, progress=progress)
    else:
        boxes, plan = prompts_from_box_file(list(boxes), popts, size)
        info = {"mode": popts.mode, "options": popts.to_json()}
        if popts.prior_rectify:
            progress.warn("the atlas prior in rectification needs the warped support labels (a template "
                          "library); it is off for these boxes")
    for warning in fallback_warnings(boxes, popts.mode):
        progress.warn(warning)
    if popts.zoomed():
        from .zoom import ZoomedBackend, organ_crop

        backend = ZoomedBackend(backend, organ_crop(boxes, volume.shape, params.region_pad))
        info["zoom_crop_yx"] = list(backend.crop)
    inputs = dict(inputs or {})
    inputs["prompts"] = info
    result = segment_volume(volume, reference, boxes, backend, params, progress=progress, inputs=inputs,
                            plan=plan)
    if priors is not None and popts.prior_rectify:
        apply_prior_rectification(result.organs, priors, popts)
        result.priors, result.prior_options = priors, popts
    if plan is not None:
        info["propagation"] = {str(k): v for k, v in plan.describe().items()}
    return result, boxes, info


def format_dice_table(table):
    """A Markdown table: one row per method, one column per organ, then the mean."""
    methods = list(table)
    organs = list(table[methods[0]]) if methods else []
    lines = ["| method | " + " | ".join(organs) + " | Avg |", "|---" * (len(organs) + 2) + "|"]
    for m in methods:
        vals = [table[m][o] for o in organs]
        lines.append(f"| {m} | " + " | ".join(f"{v:.3f}" for v in vals) + f" | {np.mean(vals):.3f} |")
    return "\n".join(lines)


def write_results(result, out_dir, overwrite=False, progress=None, extra_files=None, reference=None):
    """Write every output of ``ursam segment`` into ``out_dir``, atomically as a folder."""
    progress = progress or Progress()
    progress.stage("writing results")
    t0 = time.perf_counter()
    ensemble = result.label_map("ensemble")
    rectified = result.label_map("ursam")
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
        if reference is not None:
            report["dice_vs_reference"] = result.dice_table(reference)
        write_json(report, stage / "report.json")
    progress.done()
    return Path(out_dir)
