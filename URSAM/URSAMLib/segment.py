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
from dataclasses import dataclass, field, replace

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
    pipeline.FUSION: "the calibrated atlas-SAM fusion: per organ, SAM's ensemble and the warped support labels "
                     "pooled with the weights, temperature and threshold fitted on the template library",
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
    #: the input's reorientation (URSAMLib.orientation.Orientation): ``organs`` (their boxes and maps)
    #: are on the canonical grid; ``reference``, ``volume``, ``boxes`` and every accessor's map are on
    #: the input's. None: the input was canonical already.
    orientation: object = None

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
        return self.to_input(pipeline.label_map(self.organs, method or self.rectified_method,
                                                self._canonical_shape(), prompt_set))

    def uncertainty_maps(self):
        return tuple(self.to_input(m) for m in pipeline.uncertainty_maps(self.organs, self._canonical_shape()))

    def error_map(self):
        """Each voxel's probability of being wrong in the fused result (pipeline.error_map), on the input's
        grid; None where nothing was fused."""
        errors = pipeline.error_map(self.organs, self._canonical_shape())
        return None if errors is None else self.to_input(errors)

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

    def main_organs(self):
        return [o for o in self.organs if o.prompt_set == "main"]

    def report(self, ensemble=None, rectified=None, unc_labels=None):
        ensemble = self.label_map("ensemble") if ensemble is None else ensemble
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
    """The result's method: the calibrated fusion where a calibration fused the organs; else Algorithm 1
    with the atlas prior where the run warped the support labels and the settings ask for the prior;
    else Algorithm 1."""
    main = [o for o in organs if o.prompt_set == "main"]
    if any(o.fused is not None for o in main):
        return pipeline.FUSION
    has_prior = any(o.prior is not None for o in main)
    return pipeline.URSAM_ATLAS if has_prior and params.rectify.atlas_prior else pipeline.URSAM


def _prompts(localization, reference, settings, progress, local=None):
    """``(boxes, plan, info, priors)``: each slice's prompts in the settings' mode."""
    from .prompt_modes import make_prompts, prompts_from_box_file

    popts = settings.prompts
    size = reference.GetSize()
    info = {"mode": popts.mode, "options": popts.to_json()}
    if settings.warps_labels(localization):
        priors, prior_info = localization.priors(reference, settings.deformable, progress, local=local)
        info.update(prior_info)
        boxes, plan = make_prompts(localization.boxes, priors, popts, size)
        return boxes, plan, info, priors
    boxes, plan = prompts_from_box_file(list(localization.boxes), popts, size)
    return boxes, plan, info, None


@dataclass
class ModeRun:
    """One prompt mode's SAM run on a scan: its organ maps, the boxes each slice got, what it did."""
    mode: str
    organs: list
    boxes: list
    info: dict
    timings: dict


def run_modes(volume, reference, localization, backend, settings, modes, progress=None, extra_sets=None,
              crop_modes=None, local=None, fusions=None):
    """SAM on one scan in each of ``modes``: ``{mode: ModeRun}``.

    The modes share SAM's view of the scan, zoomed (``settings.prompts.zoom``)
    to the boxes of all of ``crop_modes`` (default ``modes``), so that each
    slice is embedded once for all of them. ``extra_sets`` go with the first
    mode; ``local``: an :class:`URSAMLib.atlas_prior.LocalWeighting` for the
    locally weighted votes; ``fusions``: ``{label: OrganFusion}`` attached to
    the organs of their own ``sam_mode``.
    """
    from dataclasses import replace

    from .prompt_modes import fallback_warnings
    from .sam.views import Views, organ_crop

    progress = progress or Progress()
    crop_modes = list(dict.fromkeys(list(crop_modes or modes) + list(modes)))
    prompts = {}
    for mode in crop_modes:
        mode_settings = replace(settings, prompts=replace(settings.prompts, mode=mode))
        prompts[mode] = (mode_settings,) + _prompts(localization, reference, mode_settings, progress, local)
    # (modes without a slice plan run together below; only the others need embeddings kept between runs)
    planned = [m for m in modes if prompts[m][2] is not None]
    views = backend if isinstance(backend, Views) else Views(backend, share=len(modes) > 1 and bool(planned))
    crop = None
    if settings.prompts.zoomed():
        # From the modes' own boxes only, so that every caller gives SAM the same view of the scan.
        crop = organ_crop([b for m in crop_modes for b in prompts[m][1]], volume.shape, settings.params.region_pad)
    view = views.view(crop)
    for mode in modes:
        for warning in fallback_warnings(prompts[mode][1], mode):
            progress.warn(warning)
        if crop is not None:
            prompts[mode][3]["zoom_crop_yx"] = list(crop)

    def mine(mode):
        return {label: f for label, f in (fusions or {}).items() if (f.sam_mode or settings.prompts.mode) == mode}

    # Modes without a slice plan go through the pipeline together, each slice embedded once for all of them;
    # a mode with one (propagate) chooses its boxes as it goes, so it runs on its own.
    joint = [m for m in modes if prompts[m][2] is None]
    alone = [m for m in modes if m not in joint]
    runs = {}
    groups = ([joint] if joint else []) + [[m] for m in alone]
    for k, group in enumerate(groups):
        first = group[0]
        _, boxes, plan, info, priors = prompts[first]
        mode_sets = {f"mode:{m}": (prompts[m][1], mine(m)) for m in group[1:]}
        calls0 = views.encoder_calls
        t0 = time.perf_counter()
        organs, timings = pipeline.run(volume, view, boxes, settings.params, extra_sets if k == 0 else None,
                                       progress, plan=plan, priors=priors, fusions=mine(first),
                                       mode_sets=mode_sets)
        timings["total_seconds"] = time.perf_counter() - t0
        timings["encoder_calls"] = views.encoder_calls - calls0
        if len(group) > 1:
            timings["modes_together"] = list(group)
        by_mode = {first: [o for o in organs if not o.prompt_set.startswith("mode:")]}
        for m in group[1:]:
            by_mode[m] = [o for o in organs if o.prompt_set == f"mode:{m}"]
            for o in by_mode[m]:
                o.prompt_set = "main"
        for m in group:
            info = prompts[m][3]
            if prompts[m][2] is not None:
                info["propagation"] = {str(key): v for key, v in prompts[m][2].describe().items()}
            runs[m] = ModeRun(m, by_mode[m], list(prompts[m][1]), info, timings)
    runs = {m: runs[m] for m in modes}
    return runs, view


def segment_query(volume, reference, localization, backend, settings=None, progress=None, extra_sets=None,
                  inputs=None, calibration=None):
    """The method on one query scan: a :class:`SegmentationResult`.

    The scan runs in the canonical orientation (:mod:`URSAMLib.orientation`:
    the axes permuted and flipped to LPS, no resampling); boxes and the
    result's maps are in the input's voxel indices, on its own grid.

    ``volume``: the scan as float32 [z, y, x] in HU; ``reference``: the
    SimpleITK image giving its grid. ``localization``: a
    :class:`URSAMLib.localization.Localization`, or a list of boxes (a box file's,
    or ROIs: nothing to warp, so they keep their own prompts). ``backend``: a
    SAM backend (:mod:`URSAMLib.sam.backends`) or a
    :class:`URSAMLib.sam.views.Views` of one, which lets several runs on one
    scan (the prompt modes of an evaluation) share their slice embeddings.
    ``extra_sets``: more prompt sets decoded once each, without augmentation,
    against the same embeddings (the evaluation's manual-prompt baseline).
    ``calibration``: a :class:`URSAMLib.calibration.Calibration` of the
    library: each organ's result is then the calibrated fusion of its SAM
    ensemble (in the prompt mode the calibration chose for it) and the warped
    support labels.
    """
    from .orientation import Orientation

    if not isinstance(localization, Localization):
        localization = Localization.from_boxes(localization)
    orient = Orientation.of(reference)
    if orient.identity:
        return _segment_canonical(volume, reference, localization, backend, settings, progress, extra_sets,
                                  inputs, calibration)
    localization = replace(localization, boxes=[orient.box_to_canonical(b) for b in localization.boxes])
    extra_sets = {k: [orient.box_to_canonical(b) for b in v] for k, v in (extra_sets or {}).items()} or None
    inputs = dict(inputs or {})
    inputs["orientation"] = orient.to_json()
    result = _segment_canonical(orient.to_canonical(volume), orient.canonical_image(reference), localization,
                                backend, settings, progress, extra_sets, inputs, calibration)
    result.reference, result.volume, result.orientation = reference, volume, orient
    result.boxes = [orient.box_to_input(b) for b in result.boxes]
    return result


def _segment_canonical(volume, reference, localization, backend, settings, progress, extra_sets, inputs,
                       calibration):
    """:func:`segment_query` on a scan in the canonical orientation."""
    settings = (settings or Settings()).check()
    progress = progress or Progress()
    fusions, modes, crop_modes, local = {}, [settings.prompts.mode], None, None
    if calibration is not None and settings.warps_labels(localization):
        values = {b.name: b.label for b in localization.boxes}
        fusions = {values[name]: model for name, model in calibration.organs.items() if name in values}
        modes = calibration.modes(settings.prompts.mode, list(values))
        crop_modes, local = calibration.candidate_modes, calibration.local
    t0 = time.perf_counter()
    runs, view = run_modes(volume, reference, localization, backend, settings, modes, progress, extra_sets,
                           crop_modes, local, fusions)
    first = runs[modes[0]]
    organs, boxes = _organs_of(runs, modes[0], fusions)
    timings = dict(first.timings) if len(runs) == 1 else _merged_timings(runs)
    timings["total_seconds"] = time.perf_counter() - t0
    info = dict(first.info)
    if len(runs) > 1:
        kept = {id(o) for o in organs}
        info["organ_modes"] = {o.name: mode for mode, run in runs.items() for o in run.organs
                               if o.prompt_set == "main" and id(o) in kept}
    inputs = dict(inputs or {})
    inputs["prompts"] = info
    if calibration is not None:
        inputs["calibration"] = calibration.describe(used=bool(fusions))
    return SegmentationResult(reference, volume, boxes, organs, settings, view.describe(), timings,
                              warnings=list(progress.warnings), inputs=inputs,
                              rectified_method=rectified_method(organs, settings.params))


def _organs_of(runs, first_mode, fusions):
    """Each organ's maps from the run of its own prompt mode (the fused organs'), the others and every
    extra prompt set from the first run; and the boxes those organs were prompted with."""
    chosen, boxes = [], []
    for o in runs[first_mode].organs:
        mode = first_mode
        if o.prompt_set == "main" and o.label in fusions and fusions[o.label].sam_mode in runs:
            mode = fusions[o.label].sam_mode
        if mode != first_mode:
            o = next(x for x in runs[mode].organs if x.prompt_set == "main" and x.label == o.label)
        chosen.append(o)
        if o.prompt_set == "main":
            boxes.append(o.box)
    return chosen, boxes


def _merged_timings(runs):
    out = {}
    for run in runs.values():
        for k, v in run.timings.items():
            out[k] = out.get(k, 0) + v if isinstance(v, (int, float)) else v
    return out


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
        components = flagged_components(unc_labels, u_full, names, result.voxel_ml,
                                        error_probability=result.error_map())
        report["flagged_components"] = [c.to_json() for c in components]
        for organ in report["organs"]:
            organ["flagged_regions"] = sum(c.label == organ["label"] for c in components)
        report.update(extra_report or {})
        write_json(report, stage / "report.json")
    progress.done()
    return out_dir
