"""The method on one scan in the canonical orientation (METHOD.md §0-§4): prompts, SAM, fusion and rectification.

:func:`segment` takes the scan (:class:`URSAMLib.orientation.CanonicalScan`),
its organ boxes, the supports warped into it (or None), a SAM backend, the
run's :class:`URSAMLib.settings.Settings` and the library's calibration; it
builds each prompt mode's :class:`URSAMLib.prompt_modes.PromptSet`, chooses
SAM's view of the scan (:mod:`URSAMLib.sam.views`), runs the per-slice
pipeline and returns a :class:`URSAMLib.result.SegmentationResult` on the
input's grid. :func:`URSAMLib.runner.run_scan` calls it for every caller.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, replace
from typing import Dict, List

from . import pipeline
from .pipeline import MAIN, OrganMaps
from .progress import Progress
from .prompt_modes import PromptSet, fallback_warnings, prompt_set
from .result import SegmentationResult, rectified_method
from .sam.views import Views, organ_crop
from .settings import Settings


@dataclass
class ModeRun:
    """One prompt mode's SAM run on a scan: its organ maps (canonical grid), its prompts, seconds by stage."""
    mode: str
    organs: List[OrganMaps]
    prompts: PromptSet
    timings: dict

    @property
    def boxes(self):
        return self.prompts.boxes


@dataclass
class Segmentation:
    """:func:`segment`'s answer: the result, and the run of every prompt mode it segmented (the
    calibration's candidate modes run together)."""
    result: SegmentationResult
    runs: Dict[str, ModeRun]


def run_modes(scan, boxes, warped, backend, settings, modes, progress=None, baselines=None, crop_modes=None,
              fusions=None, sam_everywhere=False):
    """SAM on one scan in each of ``modes``: ``({mode: ModeRun}, view)``.

    The modes share SAM's view of the scan, zoomed (``settings.prompts.zoom``)
    to the boxes of all of ``crop_modes`` (default ``modes``), so that each
    slice is embedded once for all of them. ``baselines`` go with the first
    mode's pipeline run; ``fusions``: ``{label: OrganFusion}`` attached to
    the organs of their own ``sam_mode``; ``sam_everywhere``: SAM segments the organs whose fusion gives it no
    weight too (:func:`URSAMLib.pipeline.run`).
    """
    progress = progress or Progress()
    crop_modes = list(dict.fromkeys(list(crop_modes or modes) + list(modes)))
    size = scan.reference.GetSize()
    prompts = {}
    for mode in crop_modes:
        options = replace(settings.prompts, mode=mode)
        mine = {label: f for label, f in (fusions or {}).items() if (f.sam_mode or settings.prompts.mode) == mode}
        prompts[mode] = replace(prompt_set(boxes, warped, options, size), fusions=mine)
    planned = [m for m in modes if prompts[m].plan is not None]
    views = backend if isinstance(backend, Views) else Views(backend, share=len(modes) > 1 and bool(planned))
    crop = None
    if settings.prompts.zoomed():
        # From the modes' own boxes only, so that every caller gives SAM the same view of the scan.
        crop = organ_crop([b for m in crop_modes for b in prompts[m].boxes], scan.volume.shape,
                          settings.params.region_pad)
    view = views.view(crop)
    for mode in modes:
        for warning in fallback_warnings(prompts[mode].boxes, mode):
            progress.warn(warning)
        if crop is not None:
            prompts[mode].info["zoom_crop_yx"] = list(crop)

    # Modes without a slice plan go through the pipeline together, each slice embedded once for all of them;
    # a mode with one (propagate) chooses its boxes as it goes, so it runs on its own.
    joint = [m for m in modes if prompts[m].plan is None]
    groups = ([joint] if joint else []) + [[m] for m in modes if m not in joint]
    runs = {}
    for k, group in enumerate(groups):
        calls0 = views.encoder_calls
        t0 = time.perf_counter()
        organs, timings = pipeline.run(scan.volume, view, [prompts[m] for m in group], settings.params, progress,
                                       baselines if k == 0 else None, sam_everywhere)
        timings["segment_seconds"] = time.perf_counter() - t0
        timings["encoder_calls"] = views.encoder_calls - calls0
        if len(group) > 1:
            timings["modes_together"] = list(group)
        for m in group:
            ps = prompts[m]
            if ps.plan is not None:
                ps.info["propagation"] = {str(key): v for key, v in ps.plan.describe().items()}
            mine = [o for o in organs if o.mode == m or (m == group[0] and o.prompt_set != MAIN)]
            runs[m] = ModeRun(m, mine, ps, timings)
    return {m: runs[m] for m in modes}, view


def segment(scan, boxes, warped, backend, settings=None, calibration=None, progress=None, baselines=None,
            joint_modes=(), inputs=None, sam_everywhere=False):
    """The method on one scan: a :class:`Segmentation`.

    ``scan``: a :class:`URSAMLib.orientation.CanonicalScan`; ``boxes``: the
    organs' :class:`OrganBox` on its canonical grid (localized, from a box
    file, or ROIs: without ``warped`` they keep their own prompts);
    ``warped``: the :class:`URSAMLib.atlas_prior.WarpedSupports` of the
    scan, or None. ``backend``: a SAM backend, or a
    :class:`URSAMLib.sam.views.Views` of one, which lets several runs on one
    scan (the prompt modes of an evaluation) share their slice embeddings.
    ``calibration``: the library's :class:`URSAMLib.calibration.file.Calibration`:
    each organ's result is then the calibrated fusion of its SAM ensemble (in
    the prompt mode the calibration chose for it) and the warped support
    labels. ``baselines``: more boxes decoded once each, without augmentation
    (the evaluation's manual prompts). ``joint_modes``: more prompt modes
    segmented in the same pipeline pass, uncalibrated (the calibration's
    candidate modes). ``inputs``: what report.json says of the run's inputs. ``sam_everywhere``: SAM
    segments every organ, also those whose calibrated fusion gives it no weight (by default it does not:
    their result is the same without it).
    """
    settings = (settings or Settings()).check()
    progress = progress or Progress()
    fusions, modes, crop_modes = {}, [settings.prompts.mode], list(joint_modes) or None
    if calibration is not None and warped is not None:
        values = {b.name: b.label for b in boxes}
        fusions = {values[name]: model for name, model in calibration.organs.items() if name in values}
        modes = calibration.modes(settings.prompts.mode, list(values))
        crop_modes = list(calibration.candidate_modes)
        # the flag thresholds were fitted for the calibration's review budget: the query is capped at it too
        settings = replace(settings, params=replace(settings.params, review_budget=calibration.budget))
    modes = list(dict.fromkeys(modes + list(joint_modes)))
    if baselines:
        baselines = {name: [scan.box_to_canonical(b) for b in bs] for name, bs in baselines.items()}
    t0 = time.perf_counter()
    runs, view = run_modes(scan, boxes, warped, backend, settings, modes, progress, baselines, crop_modes, fusions,
                           sam_everywhere)
    organs, chosen_boxes = _organs_of(runs, modes[0], fusions)
    timings = dict(runs[modes[0]].timings) if len(runs) == 1 else _merged_timings(runs)
    timings["segment_seconds"] = time.perf_counter() - t0
    info = dict(runs[modes[0]].prompts.info)
    if len(runs) > 1:
        kept = {id(o) for o in organs}
        info["organ_modes"] = {o.name: mode for mode, run in runs.items() for o in run.organs
                               if o.prompt_set == MAIN and id(o) in kept}
    inputs = dict(inputs or {})
    if not scan.orientation.identity:
        inputs["orientation"] = scan.orientation.to_json()
    inputs["prompts"] = info
    if calibration is not None:
        inputs["calibration"] = calibration.describe(used=bool(fusions))
    result = SegmentationResult(scan.input_reference, scan.input_volume,
                                [scan.box_to_input(b) for b in chosen_boxes], organs, settings, view.describe(),
                                timings, warnings=list(progress.warnings), inputs=inputs,
                                rectified_method=rectified_method(organs, settings.params),
                                orientation=None if scan.orientation.identity else scan.orientation)
    return Segmentation(result, runs)


def _organs_of(runs, first_mode, fusions):
    """Each organ's maps from the run of its own prompt mode (the fused organs'), the others and every
    baseline from the first run; and the boxes those organs were prompted with."""
    chosen, boxes = [], []
    for o in runs[first_mode].organs:
        mode = first_mode
        if o.prompt_set == MAIN and o.label in fusions and fusions[o.label].sam_mode in runs:
            mode = fusions[o.label].sam_mode
        if mode != first_mode:
            o = next(x for x in runs[mode].organs if x.prompt_set == MAIN and x.label == o.label)
        chosen.append(o)
        if o.prompt_set == MAIN:
            boxes.append(o.box)
    return chosen, boxes


def _merged_timings(runs):
    out = {}
    seen = set()
    for run in runs.values():
        if id(run.timings) in seen:
            continue  # modes that ran together share one timings dict
        seen.add(id(run.timings))
        for k, v in run.timings.items():
            out[k] = out.get(k, 0) + v if isinstance(v, (int, float)) else v
    return out
