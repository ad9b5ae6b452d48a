"""``ursam evaluate``: every method on every query case of a dataset, scored as the paper does.

For each query case (METHOD.md §6): the organs are localized from the
support scans, SAM runs once per slice for all methods (auto, ensemble,
Unc-FPC/FNC/FPNC, UR-SAM and the simulated manual prompt share the
embeddings), the atlas baseline warps the support labels with the
localizer's own registrations, and every mask is scored over the whole
volume (false positives outside the box count). Results are kept per case in
``DIR/cases/<id>.json``, so a rerun skips finished cases; the tables are
rebuilt from all finished cases at the end.

Outputs: ``results.csv`` (one row per case, organ and method), ``table.md``
(the paper's layout: one row per method, one column per organ, then Avg),
``dice_boxplot.png``, ``summary.json``; with ``sweep``, ``sweep.csv`` and
``sweep.md`` compare rectification settings (METHOD.md §4) on the same SAM maps.
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import time
import zlib
from dataclasses import replace
from pathlib import Path

import numpy as np

from .. import __version__, pipeline
from ..atlas_prior import LocalWeighting, WarpedSupports
from ..atomic import atomic_path, atomic_write_text
from ..batch.executor import worker_backend
from ..boxes import OrganBox, box_iou, boxes_from_labels
from ..errors import URSAMError
from ..imageio import Scan, read_ct
from ..localizers import LibrarySource, localize_registration, relabeled
from ..metrics import auroc, box_centre_error_mm, dice, hd95, spearman
from ..metrics import uncertainty_scores as region_scores
from ..orientation import Orientation
from ..outputs import write_json
from ..pipeline import FUSION, URSAM, URSAM_ATLAS
from ..progress import Progress
from ..prompt_modes import check_mode
from ..quality.metrics import OrganOutcome, quality_scores, voxel_auroc
from ..rectification import RectifyOptions
from ..runner import ScanJob, run_scan
from ..sam import DEFAULT_BACKEND, BackendOptions
from ..sam.views import Views
from ..settings import Settings
from ..templates import Library
from ..uncertainty import binary_entropy

#: the pipeline's methods; ``ursam+atlas`` rows exist where the run warped the support labels
SAM_METHODS = tuple(m for m in pipeline.METHODS if m not in (URSAM_ATLAS, FUSION))
#: every method ``ursam evaluate`` knows, in the paper's table order
ALL_METHODS = SAM_METHODS + ("manual", "atlas")
LABELS = {"auto": "Auto prompting", "ensemble": "Ensemble", "unc-fpc": "Unc-FPC", "unc-fnc": "Unc-FNC",
          "unc-fpnc": "Unc-FPNC", URSAM: "UR-SAM", "manual": "Manual prompting",
          "atlas": "Atlas (registration, majority vote)",
          URSAM_ATLAS: "UR-SAM + atlas prior", FUSION: "Calibrated fusion",
          "fusion-no-sam": "Calibrated fusion without SAM", "fusion-no-rect": "Calibrated fusion without rectification",
          "atlas-lw": "Atlas (locally weighted vote)", "atlas-staple": "Atlas (STAPLE)"}
#: the paper's simulated user: each side of the true box moved out by 0..20 px of the 1024 grid
MANUAL_PERTURB_PX = 20.0
COLUMNS = ("case", "organ", "label", "method", "dice", "hd95_mm", "dice_gt_slices", "box_iou",
           "centre_error_mm", "mean_uncertainty", "uncertainty_auroc", "pred_voxels", "truth_voxels",
           "region_auroc", "error_voxels", "flagged_errors", "flagged_voxels", "segmented_voxels",
           "mean_uncertainty_near")
#: METHOD.md §4 open points, tried with ``sweep=True``
SWEEP_GRID = [RectifyOptions(scope=s, lower=lo, alpha_h=a)
              for s in ("box", "slice") for lo in ("written", "midpoint") for a in (1.0, 1.1, 1.2, 1.5)]


def parse_methods(text):
    methods = [m.strip().lower() for m in str(text).split(",") if m.strip()]
    unknown = [m for m in methods if m not in ALL_METHODS]
    if unknown or not methods:
        raise URSAMError(f"unknown method(s) {', '.join(unknown) or '(none)'}; choose from {','.join(ALL_METHODS)}")
    return [m for m in ALL_METHODS if m in methods]


def variant_name(opts):
    if opts.fixed_threshold is not None:
        return f"ursam[fixed T={opts.fixed_threshold:g}]"
    return f"ursam[{opts.scope},{opts.lower},a={opts.alpha_h:g}]"


# ----------------------------------------------------------------------------------------------
# Scoring

def _z_slices(mask, axis=0):
    """The slices along numpy axis ``axis`` where ``mask`` has a voxel."""
    return np.flatnonzero(np.moveaxis(mask, axis, 0).reshape(mask.shape[axis], -1).any(1))


def _gt_slice_dice(pred, truth, axis=0):
    zs = _z_slices(truth, axis)
    return dice(np.take(pred, zs, axis), np.take(truth, zs, axis)) if len(zs) else float("nan")


def score_mask(pred, truth, spacing_zyx, axial_axis=0):
    """Dice and HD95 over the whole volume, and Dice over the axial slices (numpy axis ``axial_axis``,
    whatever the file's axis order) where the truth has the organ."""
    return {"dice": dice(pred, truth), "hd95_mm": hd95(pred, truth, spacing_zyx),
            "dice_gt_slices": _gt_slice_dice(pred, truth, axial_axis),
            "pred_voxels": int(np.count_nonzero(pred)), "truth_voxels": int(np.count_nonzero(truth))}


def box_scores(box, truth_box, spacing_xyz):
    if box is None or truth_box is None:
        return {"box_iou": float("nan"), "centre_error_mm": float("nan")}
    return {"box_iou": box_iou(box, truth_box), "centre_error_mm": box_centre_error_mm(box, truth_box, spacing_xyz)}


def mask_box(mask, label, name):
    idx = np.argwhere(mask)
    if len(idx) == 0:
        return None
    return OrganBox(label, name, idx.min(0)[::-1].tolist(), idx.max(0)[::-1].tolist())


def uncertainty_scores(o, truth_region):
    """Mean u inside the box, and AUROC of u for the ensemble's error voxels there."""
    inner = o.box_in_region
    u = o.u[inner]
    errors = o.masks["ensemble"][inner] != truth_region[inner]
    return {"mean_uncertainty": float(u.mean()) if u.size else float("nan"),
            "uncertainty_auroc": auroc(u, errors)}


# ----------------------------------------------------------------------------------------------
# One case

class CaseInputs:
    """What one query case needs: CT, truth, the organs to score (dataset values and names)."""

    def __init__(self, dataset, case_id, organs):
        t = dataset.case(case_id)
        self.case_id = case_id
        self.image_path = t.image_path
        self.reference, self.volume = read_ct(t.image_path)
        _, self.truth = t.read_labels(reference=self.reference)
        self.organs = organs  # {dataset value: name}
        self.spacing_xyz = np.array(self.reference.GetSpacing())
        self.spacing_zyx = self.spacing_xyz[::-1]
        # the numpy axis of the axial slices (URSAMLib.orientation: canonical z is index axis axes[2])
        self.axial_axis = 2 - Orientation.of(self.reference).axes[2]
        present = set(np.unique(self.truth).tolist())
        self.scored = {v: n for v, n in organs.items() if v in present}
        self.truth_boxes = {b.label: b for b in boxes_from_labels(self.truth, organs, labels=list(self.scored))}

    def scan(self):
        """The case as the runner reads it (already read here; the localizer reads the file)."""
        return Scan(self.reference, self.volume, str(self.image_path), self.case_id)

    def manual_boxes(self, seed):
        """The paper's simulated user: the true boxes perturbed on the axial slices SAM sees, whatever the
        file's axis order (METHOD.md §5)."""
        seed = (seed * 1000003 + zlib.crc32(self.case_id.encode())) % (2 ** 32)
        orientation = Orientation.of(self.reference)
        return [orientation.box_to_input(b) for b in boxes_from_labels(
            orientation.to_canonical(self.truth), self.organs, MANUAL_PERTURB_PX, seed, labels=list(self.scored))]


def run_case(case, support_lib, lib_to_ds, methods, backend, settings, localizer_options=None, sweep=False,
             progress=None, prompt_modes=None, calibration=None, review_threshold=None):
    """Every method on one case: ``(rows, sweep_rows, info)``.

    The SAM methods are the masks of :func:`URSAMLib.runner.run_scan` with
    ``settings``, what ``ursam segment`` runs; ``backend(percentile)`` gives a
    :class:`URSAMLib.sam.views.Views` shared by the case's runs (None: no
    SAM method runs). ``prompt_modes`` (default: the settings' mode): the SAM
    methods run once per mode; with several modes their rows are named
    ``method@mode`` (the manual baseline and ``sweep`` go with the first mode).
    ``calibration``: the support library's fusion calibration; the first
    mode's run uses it, and adds the rows of the fusion and of its ablations
    (without SAM, without rectification). ``review_threshold``: the user's (None: the calibration's per
    organ).
    """
    progress = progress or Progress()
    prompt_modes = list(prompt_modes or [settings.prompts.mode])
    t_case = time.perf_counter()
    info = {"case": case.case_id, "warnings": []}
    warn = progress.warn

    def note(msg):
        info["warnings"].append(msg)
        warn(f"{case.case_id}: {msg}")

    lib_values = [v for v, d in lib_to_ds.items() if d in case.scored]
    missing = [n for v, n in case.organs.items() if v not in case.scored]
    if missing:
        note(f"no ground truth for {', '.join(missing)} in this case; not scored")
    sub = Progress(callback=progress.callback, cancel=progress.cancel, quiet=True)
    sub.warn = note
    sam_methods = [m for m in methods if m in SAM_METHODS]
    runs_sam = bool(sam_methods or "manual" in methods) and backend is not None
    manual_boxes = case.manual_boxes(settings.params.seed) if "manual" in methods else []
    source = LibrarySource(support_lib, lib_values, dict(localizer_options or {}), missing="skip",
                           relabel=lib_to_ds, keep=set(case.scored))
    # the calibration the evaluation was given, or none (never one the support library happens to hold)
    job = ScanJob(case.scan(), source, settings.with_mode(prompt_modes[0]), calibration, calibration is not None,
                  baselines={"manual": manual_boxes} if manual_boxes else {},
                  compare_modes=tuple(prompt_modes[1:]), local=_local(calibration),
                  review_threshold=review_threshold, sam_everywhere=True)
    if not runs_sam:
        job.stop_after = "localize"
    outcome = run_scan(job, backend, sub)
    localization = outcome.localization
    info["localization"] = localization.info
    info["localize_seconds"] = round(outcome.timings["localize_seconds"], 2)
    raw = {lib_to_ds[b["label"]]: OrganBox(lib_to_ds[b["label"]], b["name"], b["min_ijk"], b["max_ijk"])
           for b in localization.info.get("raw_boxes", []) if b["label"] in lib_to_ds}
    rows, sweep_rows = [], []

    def add_row(value, method, pred, box, extra=None):
        row = {"case": case.case_id, "organ": case.organs[value], "label": value, "method": method}
        row.update(score_mask(pred, case.truth == value, case.spacing_zyx, case.axial_axis))
        row.update(box_scores(box, case.truth_boxes.get(value), case.spacing_xyz))
        row.update({"mean_uncertainty": float("nan"), "uncertainty_auroc": float("nan")})
        row.update(extra or {})
        rows.append(row)

    if runs_sam:
        segmentations = {prompt_modes[0]: outcome.segmentation, **outcome.compared}
        first = None
        for i_mode, mode in enumerate(prompt_modes):
            segmentation = segmentations.get(mode)
            if segmentation is None:  # no organ was localized: every SAM method's mask is empty
                for method in sam_methods:
                    for value in case.scored:
                        add_row(value, method + ("" if len(prompt_modes) == 1 else f"@{mode}"),
                                np.zeros(case.volume.shape, bool), raw.get(value))
                continue
            result = segmentation.result
            suffix = "" if len(prompt_modes) == 1 else f"@{mode}"
            timings = {k: (round(v, 2) if isinstance(v, float) else v) for k, v in result.timings.items()}
            prompt_info = result.prompt_info
            if i_mode == 0:
                info["sam_timings"] = timings
                first = result
            info.setdefault("mode_timings", {})[mode] = timings
            info.setdefault("prompts", {})[mode] = {k: v for k, v in prompt_info.items() if k != "options"}
            if "prior_seconds" in prompt_info and "prior" not in info:
                info["prior"] = {"seconds": round(prompt_info["prior_seconds"]
                                                  + prompt_info.get("deformable", {}).get("seconds", 0.0), 2)}
            info["rectified_method"] = result.rectified_method
            main = {o.label: o for o in result.main_organs()}
            has_prior = any(o.prior is not None for o in main.values())
            truth = result.to_canonical(case.truth)  # on the grid of the organs' maps
            for method in sam_methods:
                names = [method] + ([URSAM_ATLAS] if method == URSAM and has_prior else [])
                for name in names:
                    labels = result.label_map(name)
                    for value in case.scored:
                        extra = None
                        if name == "ensemble" and value in main and main[value].u is not None:
                            o = main[value]
                            extra = uncertainty_scores(o, truth[o.sl] == value)
                        if name in MAPPED and value in main and main[value].u is not None:
                            o = main[value]
                            u, flagged = result.organ_map(o, o.u), result.organ_map(o, o.m_unc)
                            extra = {**(extra or {}), **region_scores(labels == value, case.truth == value, u,
                                                                      flagged, case.spacing_zyx)}
                        add_row(value, name + suffix, labels == value, raw.get(value), extra)
            if i_mode == 0:
                info["quality"] = quality_outcomes(case, result)
            if i_mode == 0 and result.rectified_method == FUSION:
                for name, variant in ((FUSION, None), ("fusion-no-sam", "no_sam"), ("fusion-no-rect", "no_rectify")):
                    for row in _fusion_rows(result, case, calibration, variant, raw):
                        add_row(*row[:4], extra=row[4])
        if len(prompt_modes) > 1:
            _mode_seconds(info, {m for m in prompt_modes if settings.prompts.zoomed(m)})
        if "manual" in methods and first is not None:
            labels = first.label_map("auto", prompt_set="manual")
            mboxes = {b.label: b for b in manual_boxes}
            for value in case.scored:
                add_row(value, "manual", labels == value, mboxes.get(value))
        if sweep and first is not None:
            sweep_rows = _sweep(case, first, settings.params)
    if "atlas" in methods:
        if not localization.warps_labels:
            # MedLAM registers nothing: the atlas baseline registers the supports itself.
            localization = relabeled(localize_registration(case.image_path, support_lib, organs=lib_values,
                                                           progress=sub, missing="skip"), lib_to_ds, set(case.scored))
        t0 = time.perf_counter()
        atlas = WarpedSupports.affine(localization).atlas(case.reference)
        info["atlas_seconds"] = round(time.perf_counter() - t0, 2)
        for value in case.scored:
            m = atlas == value
            add_row(value, "atlas", m, mask_box(m, value, case.organs[value]))
        warped = outcome.warped
        if warped is not None and warped.deformable.method != "none":
            # The same majority vote with the deformable registrations the slice-adaptive prompts used, and the
            # label fusions of classic multi-atlas tools on those registrations: locally weighted votes, STAPLE.
            method = warped.deformable.method
            atlas = warped.atlas(case.reference)
            lw = _vote_labels(outcome, "lw")
            staple = warped.atlas(case.reference, fusion="staple")
            for value in case.scored:
                m = atlas == value
                votes = _input_prior(outcome, value, "frac")
                extra = region_scores(m, case.truth == value, binary_entropy(votes), (votes > 0) & (votes < 1),
                                      case.spacing_zyx)
                add_row(value, f"atlas@{method}", m, mask_box(m, value, case.organs[value]), extra)
            for value in case.scored:
                votes = _input_prior(outcome, value, "lw")
                m = lw == value
                extra = region_scores(m, case.truth == value, binary_entropy(votes),
                                      binary_entropy(votes) >= LW_FLAG, case.spacing_zyx)
                add_row(value, f"atlas-lw@{method}", m, mask_box(m, value, case.organs[value]), extra)
                m = staple == value
                add_row(value, f"atlas-staple@{method}", m, mask_box(m, value, case.organs[value]))
    info["seconds"] = round(time.perf_counter() - t_case, 2)
    return rows, sweep_rows, info


def quality_outcomes(case, result):
    """The quality estimate of each scored organ of ``result`` (its report's predicted Dice, interval,
    review, ranked slices and the Dice model's features) beside the truth: JSON-ready
    :class:`URSAMLib.quality.metrics.OrganOutcome` fields, so that a rerun rebuilds the quality section from
    the saved cases."""
    labels = result.label_map(result.rectified_method)
    error_map = result.error_map()
    main = {o.label: o for o in result.main_organs()}
    out = []
    for value in case.scored:
        o = main.get(value)
        q = result.quality.get(o.name) if o is not None else None
        if q is None:
            continue
        pred, truth = labels == value, case.truth == value
        wrong = pred != truth
        per_slice = np.moveaxis(wrong, case.axial_axis, 0).reshape(wrong.shape[case.axial_axis], -1).sum(1)
        ranked = np.array(q.slices, float).reshape(-1, 2)
        z = ranked[:, 0].astype(int)
        out.append({"case": case.case_id, "organ": case.organs[value], "predicted": float(q.predicted_dice),
                    "low": float(q.interval[0]), "high": float(q.interval[1]), "true_dice": dice(pred, truth),
                    "slices": z.tolist(), "expected_per_slice": ranked[:, 1].tolist(),
                    "errors_per_slice": per_slice[z].astype(int).tolist(), "total_errors": int(wrong.sum()),
                    "auroc": voxel_auroc(error_map, pred, truth, case.spacing_zyx) if error_map is not None
                    else float("nan"), "review": q.review, "calibrated": bool(q.calibrated),
                    # the Dice model's inputs as the run saw them: which evidence follows the true Dice
                    # (benchmarks/quality_features.py) is read from the saved cases, no run repeated
                    "features": {k: round(float(v), 6) for k, v in q.features.items()}})
    return out


def quality_summary(infos):
    """``(scores, outcomes, calibrated)``: :class:`URSAMLib.quality.metrics.QualityScores` of every case's
    quality outcomes (None: none), the outcomes, and how many of them a calibrated model estimated."""
    outcomes = [OrganOutcome(d["case"], d["organ"], d["predicted"], d["low"], d["high"], d["true_dice"],
                             np.array(d["expected_per_slice"], float), np.array(d["errors_per_slice"], float),
                             d["total_errors"], float("nan") if d["auroc"] is None else d["auroc"], d["review"])
                for inf in infos.values() for d in inf.get("quality", [])]
    if not outcomes:
        return None, [], 0
    calibrated = sum(bool(d["calibrated"]) for inf in infos.values() for d in inf.get("quality", []))
    return quality_scores(outcomes), outcomes, calibrated


def quality_section(scores, outcomes, calibrated):
    """table.md's quality section: how well the predicted Dice, its interval, the ranked slices and the
    per-voxel error map point at the result's true errors."""
    d = scores.dice
    organs = list(dict.fromkeys(o.organ for o in outcomes))
    lines = ["## Quality estimate: does it say which organs and slices are wrong?", "",
             f"Over {d.n} case x organ pairs of the written result ({calibrated} estimated by the library's "
             "calibrated quality model, the others by the expected Dice of the probability alone): the "
             "predicted Dice against the true Dice (Spearman, mean absolute error; pooled, and the mean of the "
             "per-organ values), how often the interval holds the true Dice, the share of an organ's error "
             "voxels (whole scan) on the top 10 % and 20 % of its ranked slices (a random ranking's share and "
             "the best possible ranking's beside it), and the voxel AUROC of the error map for the error "
             "voxels within 1 cm of the organ.", "",
             "| | Spearman | MAE | interval holds | top 10 % slices (random, best) | top 20 % slices (random, best) "
             "| voxel AUROC | to check |", "|---|---|---|---|---|---|---|---|",
             f"| pooled | {_fmt(d.spearman)} | {_fmt(d.mae)} | {_fmt(d.coverage)} | "
             f"{_fmt(scores.slices['top10'])} ({_fmt(scores.slices['random10'])}, {_fmt(scores.slices['oracle10'])}) | "
             f"{_fmt(scores.slices['top20'])} ({_fmt(scores.slices['random20'])}, {_fmt(scores.slices['oracle20'])}) | "
             f"{_fmt(scores.auroc)} | {scores.review.get('flagged', 0)} of {len(outcomes)} |",
             f"| within organ (mean) | {_fmt(d.within_spearman)} | {_fmt(d.within_mae)} | | | | | |"]
    for name in organs:
        mine = [o for o in outcomes if o.organ == name]
        s = quality_scores(mine)
        lines.append(f"| {name} | {_fmt(s.dice.spearman)} | {_fmt(s.dice.mae)} | {_fmt(s.dice.coverage)} | "
                     f"{_fmt(s.slices['top10'])} ({_fmt(s.slices['random10'])}, {_fmt(s.slices['oracle10'])}) | "
                     f"{_fmt(s.slices['top20'])} ({_fmt(s.slices['random20'])}, {_fmt(s.slices['oracle20'])}) | "
                     f"{_fmt(s.auroc)} | {s.review.get('flagged', 0)} of {len(mine)} |")
    return "\n".join(lines + [""])


#: the SAM methods whose uncertainty map (SAM's entropy, M_unc) the evaluation scores
MAPPED = ("ensemble", URSAM, URSAM_ATLAS)
#: the locally weighted vote's flags: where its entropy reaches that of a 1:3 vote
LW_FLAG = float(binary_entropy(np.float32(0.25)))


def _local(calibration):
    return calibration.local if calibration is not None else LocalWeighting()


def _input_prior(outcome, value, which):
    """One organ's vote (``frac`` or ``lw``) on the case's own grid (zeros where it has none)."""
    canonical = outcome.canonical
    prior = outcome.warped.priors.get(value)
    shape = canonical.volume.shape
    if prior is None or getattr(prior, which) is None:
        votes = np.zeros(shape, np.float32)
    else:
        votes = prior.on(tuple(slice(0, n) for n in shape), which)
    return canonical.orientation.to_input(votes)


def _vote_labels(outcome, which):
    """A label map of votes of at least one half, overlaps to the organ of the higher vote."""
    shape = outcome.canonical.input_volume.shape
    labels, best = np.zeros(shape, np.int32), np.zeros(shape, np.float32)
    for value in outcome.warped.priors:
        v = _input_prior(outcome, value, which)
        m = (v >= 0.5) & (v > best)
        labels[m], best[m] = value, v[m]
    return labels


def _fusion_rows(result, case, calibration, variant, raw):
    """``(value, method, mask, box, extra)`` rows of the fusion (``variant`` None) or of one of its
    ablations, re-fused from the result's cached maps (no SAM rerun); the result is restored after."""
    main = [o for o in result.main_organs() if o.fusion is not None]
    name = {None: FUSION, "no_sam": "fusion-no-sam", "no_rectify": "fusion-no-rect"}[variant]
    models = calibration.variant(variant).organs if variant else calibration.organs
    saved = [(o.fusion, o.fused, dict(o.masks)) for o in main]
    try:
        for o in main:
            o.fusion = models.get(o.name, o.fusion)
            pipeline.finish_organ(o, result.params)
        labels = result.label_map(FUSION)
        out = []
        by_label = {o.label: o for o in main}
        for value in case.scored:
            o = by_label.get(value)
            pred = labels == value
            extra = None
            if o is not None and o.fused is not None:
                u, flagged = result.organ_map(o, o.fused.uncertainty), result.organ_map(o, o.fused.flagged)
                extra = region_scores(pred, case.truth == value, u, flagged, case.spacing_zyx)
            out.append((value, name, pred, raw.get(value), extra))
        return out
    finally:
        for o, (fusion, fused, masks) in zip(main, saved):
            o.fusion, o.fused, o.masks = fusion, fused, masks


def _mode_seconds(info, zoomed):
    """Seconds per case of each prompt mode as if it ran alone. Modes that see the same view of the
    scan (zoomed or not, ``zoomed``: the zoomed modes) shared their slice embeddings, so each is
    charged its own slices at its view's mean encoder seconds per slice."""
    timings = info.get("mode_timings", {})
    per_slice = {}
    for view in (True, False):
        ts = [t for mode, t in timings.items() if (mode in zoomed) == view]
        calls = sum(t.get("encoder_calls", 0) for t in ts)
        if calls:
            per_slice[view] = sum(t.get("encoder_seconds", 0.0) for t in ts) / calls
    prior = info.get("prior", {}).get("seconds", 0.0)
    out = {}
    for mode, t in timings.items():
        enc = t["distinct_slices"] * per_slice.get(mode in zoomed, float("nan"))
        sam = enc + t.get("decoder_seconds", 0.0) + t.get("rectify_seconds", 0.0)
        out[mode] = round(info["localize_seconds"] + (prior if mode != "box3d" else 0.0) + sam, 1)
    info["encoder_seconds_per_slice"] = {("zoomed" if view else "whole slice"): round(v, 3)
                                         for view, v in per_slice.items()}
    info["mode_seconds_alone"] = out


def _sweep(case, result, params):
    """UR-SAM under each rectification setting of SWEEP_GRID, on the cached SAM maps (no SAM rerun)."""
    rows = []
    main = result.main_organs()
    saved = [dict(o.masks) for o in main], [o.m_unc for o in main], [o.info for o in main]
    try:
        for opts in SWEEP_GRID:
            p = replace(params, rectify=opts)
            for o in main:
                pipeline.finish_organ(o, p)
            labels = result.label_map(pipeline.URSAM)
            for value in case.scored:
                pred = labels == value
                t = case.truth == value
                rows.append({"case": case.case_id, "organ": case.organs[value], "label": value,
                             "method": variant_name(opts), "scope": opts.scope, "lower": opts.lower,
                             "alpha_h": opts.alpha_h, "dice": dice(pred, t),
                             "dice_gt_slices": _gt_slice_dice(pred, t, case.axial_axis)})
    finally:
        for o, masks, m_unc, inf in zip(main, *saved):
            o.masks, o.m_unc, o.info = masks, m_unc, inf
    return rows


# ----------------------------------------------------------------------------------------------
# Tables

def _fmt(v, digits=3):
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    if isinstance(v, float) and math.isinf(v):
        return "inf"
    return f"{v:.{digits}f}"


def _mean(values):
    vals = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return float(np.mean(vals)) if vals else float("nan")


def _median(values):
    vals = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return float(np.median(vals)) if vals else float("nan")


def pivot(rows, key, methods, organs, agg=_mean):
    """{method: {organ: aggregate over cases}}, with "Avg" the mean over organs."""
    table = {}
    for m in methods:
        per = {}
        for organ in organs:
            vals = [r[key] for r in rows if r["method"] == m and r["organ"] == organ]
            per[organ] = agg(vals) if vals else float("nan")
        finite = [v for v in per.values() if not math.isnan(v) and not math.isinf(v)]
        per["Avg"] = float(np.mean(finite)) if finite else float("nan")
        table[m] = per
    return table


def method_label(m):
    """A method's name in the tables: ``ursam@slice`` is "UR-SAM [slice]"."""
    base, _, mode = m.partition("@")
    return f"{LABELS.get(base, base)} [{mode}]" if mode else LABELS.get(m, m)


def table_methods(methods, prompt_modes, deformable_method=None, calibrated=False):
    """The row names of the tables: each SAM method once per prompt mode where several are compared;
    ``deformable_method``: the deformable stage the run warped the support labels with (None: none);
    ``calibrated``: the fusion's rows too."""
    prompt_modes = list(prompt_modes)
    out = []
    for m in methods:
        # (ursam+atlas rows exist where the run warped the support labels)
        names = [m, URSAM_ATLAS] if m == URSAM else [m]
        for name in names:
            if m in SAM_METHODS and len(prompt_modes) > 1:
                out += [f"{name}@{mode}" for mode in prompt_modes]
            else:
                out.append(name)
        if m == URSAM and calibrated:
            out += [FUSION, "fusion-no-sam", "fusion-no-rect"]
        if m == "atlas" and deformable_method not in (None, "none"):
            out += [f"{a}@{deformable_method}" for a in ("atlas", "atlas-lw", "atlas-staple")]
    return out


def modes_section(rows, infos, prompt_modes, shown):
    """Markdown: mean Dice of the ensemble and UR-SAM per prompt mode, beside the atlas, with seconds per case."""
    if len(prompt_modes) < 2:
        return ""
    lines = ["", "## Prompt modes: mean Dice over organs and cases, seconds per case", "",
             "| prompt mode | Ensemble | UR-SAM | UR-SAM, atlas prior in rectification | seconds per case (alone) |",
             "|---|---|---|---|---|"]
    for mode in prompt_modes:
        ens, urs, ura = (_mean([r["dice"] for r in rows if r["method"] == f"{m}@{mode}"])
                         for m in ("ensemble", URSAM, URSAM_ATLAS))
        secs = _mean([inf.get("mode_seconds_alone", {}).get(mode) for inf in infos.values()])
        lines.append(f"| {mode} | {_fmt(ens)} | {_fmt(urs)} | {_fmt(ura)} | {_fmt(secs, 0)} |")
    for m in shown:
        if m.startswith("atlas"):
            secs = _mean([inf.get("localize_seconds", float("nan")) + inf.get("atlas_seconds", 0.0)
                          + (inf.get("prior", {}).get("seconds", 0.0) if "@" in m else 0.0)
                          for inf in infos.values()])
            lines.append(f"| {method_label(m)} | – | {_fmt(_mean([r['dice'] for r in rows if r['method'] == m]))} "
                         f"| – | {_fmt(secs, 0)} |")
    lines += ["", "Seconds alone: localization, the deformable stage and warped prior (slice, propagate), "
              "the mode's own slices at the case's mean encoder seconds per slice, its decoder and "
              "rectification seconds (the modes share one encoder pass per slice in this run).", ""]
    return "\n".join(lines)


def markdown_table(table, organs, label_of=method_label, digits=3):
    head = "| method | " + " | ".join(organs) + " | Avg |"
    sep = "|---|" + "---|" * (len(organs) + 1)
    lines = [head, sep]
    for m, per in table.items():
        lines.append(f"| {label_of(m)} | " + " | ".join(_fmt(per[o], digits) for o in organs)
                     + f" | {_fmt(per['Avg'], digits)} |")
    return "\n".join(lines)


def organ_order(rows, names):
    seen = {r["organ"] for r in rows}
    return [n for n in names.values() if n in seen]


def write_tables(out, rows, sweep_rows, names, methods, header, extra=""):
    organs = organ_order(rows, names)
    cases = sorted({r["case"] for r in rows})
    present = [m for m in methods if any(r["method"] == m for r in rows)]
    parts = [f"# {header}", "",
             f"{len(cases)} query case(s): {', '.join(cases)}.", "",
             "## Dice, every slice of the predicted box and the whole volume (METHOD.md §6)", "",
             markdown_table(pivot(rows, "dice", present, organs), organs), "",
             "## Dice on ground-truth slices only (the paper's protocol; shown for comparison)", "",
             markdown_table(pivot(rows, "dice_gt_slices", present, organs), organs), "",
             "## HD95 (mm), median over cases (an empty mask counts as inf)", "",
             markdown_table(pivot(rows, "hd95_mm", present, organs, _median), organs, digits=1), ""]
    def first(base):
        # with several prompt modes the rows are base@mode: the first mode's stand for the method
        return next((m for m in present if m == base or m.startswith(base + "@")), None)

    loc = [m for m in (first("auto"), "manual", "atlas") if m in present]
    if loc:
        label = {"auto": "Localized box (before margin)", "manual": "Manual box (simulated)",
                 "atlas": "Atlas mask's box"}
        parts += ["## Localization: box IoU with the true box", "",
                  markdown_table(pivot(rows, "box_iou", loc, organs), organs, lambda m: label[m.split("@")[0]]),
                  "", "## Localization: box centre error (mm)", "",
                  markdown_table(pivot(rows, "centre_error_mm", loc, organs), organs,
                                 lambda m: label[m.split("@")[0]], digits=1), ""]
    ens = first("ensemble")
    if ens:
        unc = {"mean u": pivot(rows, "mean_uncertainty", [ens], organs)[ens],
               "AUROC": pivot(rows, "uncertainty_auroc", [ens], organs)[ens]}
        parts += ["## Uncertainty inside the box: mean entropy, and AUROC of the entropy for the ensemble's "
                  "error voxels", "", markdown_table(unc, organs, lambda m: m), ""]
    unc = uncertainty_section(rows, present)
    if unc:
        parts += [unc]
    if extra:
        parts += [extra]
    atomic_write_text(out / "table.md", "\n".join(parts))
    if sweep_rows:
        variants = list(dict.fromkeys(r["method"] for r in sweep_rows))
        t = pivot(sweep_rows, "dice", variants, organs)
        base = pivot(rows, "dice", [m for m in (first("auto"), first("ensemble"), first("ursam")) if m], organs)
        lines = ["# Rectification settings (METHOD.md §4) on the same SAM maps", "",
                 "Mean Dice (whole volume). The UR-SAM row of table.md uses the run's own setting.", "",
                 markdown_table({**base, **t}, organs), ""]
        ranked = sorted(variants, key=lambda v: -t[v]["Avg"])
        lines += ["Best settings by Avg: " + "; ".join(f"{v} {t[v]['Avg']:.3f}" for v in ranked[:3]), ""]
        atomic_write_text(out / "sweep.md", "\n".join(lines))
    return organs, present


def uncertainty_summary(rows, methods):
    """Per method with an uncertainty map: the mean voxel AUROC of its uncertainty for its errors over the
    organs' regions, the share of its error voxels in its flagged voxels, the flagged share of its
    segmented volume, and Spearman's correlation of the mean uncertainty near each organ with its Dice
    over the case x organ pairs."""
    out = {}
    for m in methods:
        rs = [r for r in rows if r["method"] == m and _finite(r.get("region_auroc"))]
        if not rs:
            continue
        errors = sum(r["error_voxels"] for r in rs)
        segmented = sum(r["segmented_voxels"] for r in rs)
        out[m] = {"auroc": _mean([r["region_auroc"] for r in rs]),
                  "errors_flagged": sum(r["flagged_errors"] for r in rs) / errors if errors else float("nan"),
                  "flagged_share": sum(r["flagged_voxels"] for r in rs) / segmented if segmented else float("nan"),
                  "spearman": spearman([r["mean_uncertainty_near"] for r in rs], [r["dice"] for r in rs]),
                  "pairs": len(rs)}
    return out


def _finite(v):
    return v is not None and not (isinstance(v, float) and math.isnan(v)) and v != ""


def uncertainty_section(rows, methods):
    summary = uncertainty_summary(rows, methods)
    if not summary:
        return ""
    lines = ["## Uncertainty: does it point at the errors?", "",
             "Over each organ's region (truth or prediction grown by 1 cm): the voxel AUROC of the method's "
             "uncertainty for its error voxels; the share of the error voxels that are flagged; the flagged "
             "voxels as a share of the segmented volume; and Spearman's correlation, over case x organ pairs, "
             "of the mean uncertainty within 1 cm of the prediction with the Dice (negative: more uncertain, "
             "worse).", "",
             "| method | AUROC | errors flagged | flagged / segmented | Spearman (u, Dice) | pairs |",
             "|---|---|---|---|---|---|"]
    for m, s in summary.items():
        lines.append(f"| {method_label(m)} | {_fmt(s['auroc'])} | {_fmt(s['errors_flagged'])} | "
                     f"{_fmt(s['flagged_share'])} | {_fmt(s['spearman'])} | {s['pairs']} |")
    return "\n".join(lines + [""])


def write_csv(path, rows, columns):
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(columns), extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: (_csv_value(r.get(k))) for k in columns})
    atomic_write_text(path, buf.getvalue())


def _csv_value(v):
    if isinstance(v, float):
        if math.isnan(v):
            return ""
        if math.isinf(v):
            return "inf"
        return f"{v:.6g}"
    return v


def write_boxplot(path, rows, organs, methods):
    """Dice per organ (groups) and method (colours)."""
    import matplotlib  # noqa: PLC0415 (matplotlib loads only where a figure is drawn)

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415 (matplotlib loads only where a figure is drawn)

    fig, ax = plt.subplots(figsize=(min(20.0, max(6.0, 0.2 * len(organs) * max(1, len(methods)) + 2)), 4.5))
    colors = plt.get_cmap("tab10")
    width = 0.8 / max(1, len(methods))
    for j, m in enumerate(methods):
        data = [[r["dice"] for r in rows if r["method"] == m and r["organ"] == o] or [np.nan] for o in organs]
        pos = np.arange(len(organs)) + (j - (len(methods) - 1) / 2) * width
        color = colors(j % 10)
        bp = ax.boxplot(data, positions=pos, widths=width * 0.9, patch_artist=True, showfliers=False,
                        manage_ticks=False, medianprops={"color": "black", "linewidth": 1})
        for patch in bp["boxes"]:
            patch.set_facecolor(color)
            patch.set_alpha(0.6)
        # Every case as a dot: with few cases a box alone hides them.
        for x, vals in zip(pos, data):
            ax.scatter(np.full(len(vals), x), vals, s=8, color=color, edgecolors="black", linewidths=0.3,
                       zorder=3)
        ax.plot([], [], color=color, lw=6, label=LABELS.get(m, m))
    ax.set_xticks(np.arange(len(organs)))
    ax.set_xticklabels(organs, rotation=30, ha="right")
    ax.set_ylabel("Dice")
    ax.set_ylim(0, 1)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=7, ncol=min(8, len(methods)), loc="lower center", bbox_to_anchor=(0.5, 1.0),
              frameon=False)
    fig.tight_layout()
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=100)
    finally:
        plt.close(fig)


# ----------------------------------------------------------------------------------------------
# The whole evaluation

def _config_hash(config):
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16]


def evaluate_case(case_id, ds, organs, support, lib_to_ds, methods, settings, localizer_options, sweep,
                  prompt_modes, calibration=None, review_threshold=None, views=None, progress=None):
    """One query case read and run (:func:`run_case`): ``(rows, sweep_rows, info)``. ``views(percentile)``
    gives SAM's views of the case (None: no SAM method runs)."""
    case = CaseInputs(ds, case_id, organs)
    return run_case(case, support, lib_to_ds, methods, views, settings, localizer_options, sweep, progress,
                    prompt_modes, calibration, review_threshold)


def _case_task(case_id, case_args, backend_options, needs_sam):
    """On a Dask worker: one case with the worker's own SAM model (loaded once per worker process)."""
    share = len(case_args[8]) > 1  # several prompt modes share the slice embeddings of a view
    progress = Progress(quiet=True)
    progress.warn = progress.warnings.append  # run_case keeps them in the case's info; the client shows them
    views = (lambda percentile: Views(worker_backend(backend_options, percentile), share=share)) if needs_sam \
        else None
    return evaluate_case(case_id, *case_args, views=views, progress=progress)


def _cases_on(executor, pending, case_args, backend_options, needs_sam, progress):
    """``(case_id, (rows, sweep_rows, info))`` of the pending cases, run on the executor's workers."""
    if not pending:
        return
    futures = {executor.submit(_case_task, c, case_args, backend_options, needs_sam, key=f"ursam-case-{c}"): c
               for c in pending}
    progress.info(f"{len(pending)} case(s) on {executor.describe()}")
    for future, result, error in executor.completed(list(futures)):
        case_id = futures[future]
        if error is not None:
            raise URSAMError(f"case {case_id} failed: {error}")
        for warning in result[2].get("warnings", []):
            progress.warn(f"{case_id}: {warning}")
        yield case_id, result


def evaluate(dataset, out_dir, methods=ALL_METHODS, support_from=None, cases=None, settings=None,
             localizer_options=None, sweep=False, backend_name=None, progress=None, overwrite=False, organs=None,
             prompt_modes=None, calibration=None, executor=None, backend_options=None, review_threshold=None):
    """Run and score every method on the query cases of ``dataset``; returns the summary dict.

    ``settings``: the run's :class:`URSAMLib.settings.Settings` (the same as
    ``ursam segment``'s); ``prompt_modes``: prompt modes to compare (default:
    the settings' mode); ``localizer_options``: options of the localizer
    beyond the settings (support workers, the MedLAM checkpoint and device).
    ``calibration``: the fusion's calibration on the support library (a
    :class:`URSAMLib.calibration.file.Calibration`; None: none); its rows and its
    ablations' join the tables.

    ``backend_options``: the SAM model (:class:`URSAMLib.sam.BackendOptions`,
    default the backend named ``backend_name``), loaded once per
    normalization, only if a case needs SAM. ``executor``: a
    :class:`URSAMLib.batch.executor.Executor` that runs the cases as tasks on
    its Dask workers, each loading the model once; None: one case after
    another here.
    Finished cases in ``out_dir/cases`` are reused when the
    configuration matches; a different configuration is an error unless
    ``overwrite``.
    """
    progress = progress or Progress()
    settings = (settings or Settings()).check()
    backend_options = backend_options or BackendOptions(name=backend_name or DEFAULT_BACKEND)
    backend_name = backend_options.name
    localizer_options = dict(localizer_options or {})
    methods = list(methods)
    prompt_modes = [check_mode(m) for m in (prompt_modes or [settings.prompts.mode])]
    if any(m != "box3d" for m in prompt_modes) and settings.localizer != "registration":
        raise URSAMError(f"prompt modes {', '.join(m for m in prompt_modes if m != 'box3d')} need the "
                         "registration localizer (the support labels are warped with its registrations)")
    warped = any(settings.warps_labels() or m != "box3d" for m in prompt_modes) and settings.localizer == "registration"
    deformable_method = settings.deformable.method if warped else None
    ds = Library(dataset, role="query")
    support = Library(support_from) if support_from else Library(dataset, role="support")
    query_ids = list(cases) if cases else ds.case_ids("query")
    support_ids = set(support.case_ids())
    if not query_ids:
        raise URSAMError("dataset has no query cases", ds.meta_path)
    known = set(ds.case_ids("query")) | set(ds.meta.get("extra", [])) | set(ds.meta.get("support", []))
    for c in query_ids:
        if c not in known and not (ds.path / "cases" / c).is_dir():
            raise URSAMError(f"case {c!r} is not in the dataset", ds.meta_path)
        if Path(support.path).resolve() == Path(ds.path).resolve() and c in support_ids:
            raise URSAMError(f"case {c!r} is a support scan; it cannot also be a query", ds.meta_path)
    by_name = {n.lower(): v for v, n in ds.names.items()}
    lib_to_ds = {v: by_name[n.lower()] for v, n in support.names.items() if n.lower() in by_name}
    if not lib_to_ds:
        raise URSAMError("the support library and the dataset share no organ name", support.meta_path)
    if organs is not None:
        wanted = set(ds.resolve_organs(organs))
        lib_to_ds = {k: v for k, v in lib_to_ds.items() if v in wanted}
        if not lib_to_ds:
            raise URSAMError("the support library labels none of the requested organs", support.meta_path)
    organs = {d: ds.names[d] for d in sorted(lib_to_ds.values())}

    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise URSAMError("output path exists and is not a folder", out)
    (out / "cases").mkdir(parents=True, exist_ok=True)
    config = {"ursam_version": __version__, "dataset": str(ds.path.absolute()),
              "supports": str(Path(support.path).absolute()), "support_ids": sorted(support_ids),
              "methods": methods, "settings": settings.result_json(), "prompt_modes": prompt_modes,
              "backend": backend_name, "localizer_options": localizer_options, "sweep": bool(sweep),
              "manual_perturb_px": MANUAL_PERTURB_PX, "organs": sorted(organs.values()),
              "calibration": calibration.sha256 if calibration is not None else None,
              "review_threshold": review_threshold}
    digest = _config_hash(config)
    config_path = out / "config.json"
    if config_path.exists():
        old = json.loads(config_path.read_text(encoding="utf-8"))
        if old.get("hash") != digest:
            if not overwrite:
                raise URSAMError("output folder holds an evaluation with other settings (use --overwrite to "
                                 "start it anew, or another folder)", config_path)
            for f in (out / "cases").glob("*.json"):
                f.unlink()
    write_json({**config, "hash": digest}, config_path)

    models = {}

    def case_views(percentile):
        """SAM's views of one case: the modes that see the same view share its slice embeddings."""
        if percentile not in models:
            models[percentile] = backend_options.make(percentile)
        return Views(models[percentile], share=len(prompt_modes) > 1)

    saved_cases, pending = {}, []
    for i, case_id in enumerate(query_ids):
        path = out / "cases" / f"{case_id}.json"
        if path.exists():
            saved = json.loads(path.read_text(encoding="utf-8"))
            if saved.get("hash") == digest:
                progress.info(f"[{i + 1}/{len(query_ids)}] {case_id}: finished before, skipped")
                saved_cases[case_id] = saved
                continue
        pending.append(case_id)
    needs_sam = any(m in SAM_METHODS or m == "manual" for m in methods)
    case_args = (ds, organs, support, lib_to_ds, methods, settings, localizer_options, sweep, prompt_modes,
                 calibration, review_threshold)
    if executor is None:
        def finished_cases():
            for case_id in pending:
                progress.info(f"[{query_ids.index(case_id) + 1}/{len(query_ids)}] {case_id}")
                yield case_id, evaluate_case(case_id, *case_args, views=case_views if needs_sam else None,
                                             progress=progress)
        finished = finished_cases()
    else:
        finished = _cases_on(executor, pending, case_args, backend_options, needs_sam, progress)
    for case_id, (rows, sweep_rows, info) in finished:
        saved_cases[case_id] = {"hash": digest, "rows": rows, "sweep_rows": sweep_rows, "info": info}
        write_json(saved_cases[case_id], out / "cases" / f"{case_id}.json")
        by_m = {m: _mean([r["dice"] for r in rows if r["method"] == m])
                for m in table_methods(methods, prompt_modes, deformable_method, calibration is not None) if any(r["method"] == m for r in rows)}
        progress.info(f"{case_id}: " + ", ".join(f"{m} {v:.3f}" for m, v in by_m.items())
                      + f" ({info['seconds']:.0f} s)")
    all_rows, all_sweep, infos = [], [], {}
    for case_id in query_ids:
        saved = saved_cases[case_id]
        all_rows += saved["rows"]; all_sweep += saved.get("sweep_rows", []); infos[case_id] = saved["info"]
    write_csv(out / "results.csv", all_rows, COLUMNS)
    if all_sweep:
        write_csv(out / "sweep.csv", all_sweep,
                  ("case", "organ", "label", "method", "scope", "lower", "alpha_h", "dice", "dice_gt_slices"))
    header = f"UR-SAM evaluation: {ds.meta.get('name', ds.path.name)}, backend {backend_name}"
    written = {inf.get("rectified_method") for inf in infos.values()} - {None}
    if len(written) == 1:
        header += (f"\n\n`ursam segment` with these settings writes {method_label(written.pop())} "
                   "as rectified.nii.gz.")
    shown = table_methods(methods, prompt_modes, deformable_method, calibration is not None)
    modes_table = modes_section(all_rows, infos, prompt_modes, shown)
    quality, outcomes, calibrated = quality_summary(infos)
    quality_table = quality_section(quality, outcomes, calibrated) if quality is not None else ""
    organ_names, present = write_tables(out, all_rows, all_sweep, ds.names, shown, header,
                                        extra="\n".join(t for t in (modes_table, quality_table) if t))
    write_boxplot(out / "dice_boxplot.png", all_rows, organ_names, present)
    table = pivot(all_rows, "dice", present, organ_names)
    reg_secs = [s for inf in infos.values() for s in inf.get("localization", {}).get("registration_seconds", {}).values()]
    summary = {"config": config, "cases": list(infos), "mean_dice": {m: table[m]["Avg"] for m in present},
               "uncertainty": uncertainty_summary(all_rows, present),
               "dice_table": table, "registration_seconds_per_support": {
                   "mean": _mean(reg_secs), "max": max(reg_secs) if reg_secs else None},
               "case_info": infos}
    if modes_table:
        summary["modes_table"] = modes_table
    if quality is not None:
        summary["quality"] = quality.to_json()
        summary["quality_table"] = quality_table
    write_json(_strict_json(summary), out / "summary.json")
    return summary


def _strict_json(v):
    """NaN as null and inf as "inf", so summary.json is strict JSON for other tools."""
    if isinstance(v, dict):
        return {k: _strict_json(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_strict_json(x) for x in v]
    if isinstance(v, float) and (math.isnan(v) or math.isinf(v)):
        return None if math.isnan(v) else "inf"
    return v
