"""Making a calibration of the atlas–SAM fusion on the template library itself (``ursam templates calibrate``).

Each support scan is segmented with the other supports as its templates
(leave one out), exactly as a query would be, through
:func:`URSAMLib.runner.run_scan`, in every candidate prompt mode at once (one
pipeline pass). Per organ, its evidence (SAM's ensemble, the atlas votes),
the truth over its region and the masks of the existing methods become a
:class:`URSAMLib.calibration.fit.Case`; a support's cases are kept in the
user's cache folder, so a rerun resumes. The evidence then decides the
fusion's sources, weights, temperature, threshold, rectification and flag
threshold (:mod:`URSAMLib.calibration.fit`). :func:`calibrate` writes
``calibration.json`` (into the library, or where ``out`` says;
:mod:`URSAMLib.calibration.file`) with every choice and the leave-one-out Dice
of every source and of the fused result. The query scans of an evaluation
never enter it.
"""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from . import __version__
from .atlas_prior import LocalWeighting
from .atomic import atomic_path
from .calibration.file import CALIBRATION_FILE, CANDIDATE_MODES, MIN_SUPPORTS, Calibration
from .calibration.fit import Case, fit_organ
from .errors import URSAMError
from .fusion import DEFAULT_REVIEW_BUDGET, Evidence
from .localizers import LibrarySource
from .pipeline import ENSEMBLE, MAIN, URSAM, URSAM_ATLAS
from .progress import Progress
from .runner import ScanJob, run_scan
from .sam.fast_encoder import cache_dir
from .settings import Settings


def cases_of_run(run, truth):
    """``{organ name: Case}`` of one mode's run (:class:`URSAMLib.segment.ModeRun`) on a calibration scan;
    ``truth``: its label map on the run's (canonical) grid."""
    out = {}
    for o in run.organs:
        if o.prompt_set != MAIN:
            continue
        evidence = o.evidence()
        if evidence is None or "atlas_lw" not in evidence.sources:
            continue
        t = truth[o.sl] == o.label
        outside = int(np.count_nonzero(truth == o.label)) - int(np.count_nonzero(t))
        if not t.any() and outside == 0:
            continue  # the scan does not have this organ: nothing to learn from it
        refs = {k: o.masks[k] for k in (ENSEMBLE, URSAM, URSAM_ATLAS) if k in o.masks}
        refs["atlas vote"] = o.prior.on(o.sl) > 0.5  # the classic majority of the supports' (unblurred) labels
        out[o.name] = Case(evidence, t, outside, refs)
    return out


def save_cases(path, cases):
    """Per mode and organ: the sources (float16), intensity, truth over the region, outside count."""
    arrays = {}
    for mode, organs in cases.items():
        for name, c in organs.items():
            k = f"{mode}|{name}|"
            for s, a in c.evidence.sources.items():
                arrays[k + "src:" + s] = a.astype(np.float16)
            arrays[k + "intensity"] = c.evidence.intensity.astype(np.float16)
            arrays[k + "truth"] = c.truth
            arrays[k + "outside"] = np.array(c.outside)
            for r, m in c.reference.items():
                arrays[k + "ref:" + r] = m
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as handle:
            np.savez_compressed(handle, **arrays)


def load_cases(path):
    out = {}
    with np.load(path) as data:
        for key in data.files:
            mode, name, what = key.split("|", 2)
            entry = out.setdefault(mode, {}).setdefault(name, {"src": {}, "ref": {}})
            if what.startswith("src:"):
                entry["src"][what[4:]] = data[key].astype(np.float32)
            elif what.startswith("ref:"):
                entry["ref"][what[4:]] = data[key]
            else:
                entry[what] = data[key]
    return {mode: {name: Case(Evidence(e["src"], e["intensity"].astype(np.float32)), e["truth"].astype(bool),
                              int(e["outside"]), e["ref"])
                   for name, e in organs.items()} for mode, organs in out.items()}


def cache_key(library, settings, modes, local):
    digest = hashlib.sha256()
    parts = {"version": __version__, "settings": settings.to_json(), "modes": list(modes),
             "local": local.to_json(),
             # the supports' bytes: a support relabelled or replaced in place is not served from the cache
             "library": library.digest(), "supports": library.case_ids()}
    digest.update(json.dumps(parts, sort_keys=True, default=str).encode())
    return digest.hexdigest()[:16]


def cache_folder(key):
    """Where the leave-one-out runs of a calibration are kept: the user's cache, never the library (it
    may be on a read-only share, and a library holds scans and labels, nothing else)."""
    folder = cache_dir() / "calibration" / key
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def support_cases(library, case_id, backend, settings, modes, local, progress):
    """Segment one support with the others as templates, in every mode: ``{mode: {organ name: Case}}``."""
    template = library.case(case_id)
    # uncalibrated: the runs are what a calibration is fitted on (a calibration the library has already
    # must not leak into them)
    job = ScanJob(template.image_path, LibrarySource(library.without(case_id), missing="skip"), settings,
                  use_calibration=False, joint_modes=tuple(modes), local=local)
    outcome = run_scan(job, lambda percentile: backend, progress)
    if outcome.segmentation is None:
        return {}
    _, truth = template.read_labels(reference=outcome.scan.reference)
    truth = outcome.canonical.orientation.to_canonical(truth)
    return {mode: cases_of_run(run, truth) for mode, run in outcome.segmentation.runs.items()}


def calibrate(library, backend, settings=None, progress=None, out=None, modes=CANDIDATE_MODES,
              budget=DEFAULT_REVIEW_BUDGET, local=None):
    """Calibrate the fusion on ``library`` (leave one out); writes and returns the :class:`Calibration`.

    ``backend``: the SAM backend of the leave-one-out runs; ``budget``: the
    review budget the flag thresholds are fitted for (a query is capped at it).
    """
    progress = progress or Progress()
    settings = (settings or Settings()).resolved()  # the same cache key however "auto" was spelt
    local = local or LocalWeighting()
    ids = library.case_ids()
    if len(ids) < MIN_SUPPORTS:
        raise URSAMError(f"calibration needs at least {MIN_SUPPORTS} support scans (leave one out); the library "
                         f"has {len(ids)}", library.meta_path)
    if settings.localizer != "registration":
        raise URSAMError("calibration needs the registration localizer (the fusion's atlas sources are the "
                         "warped support labels)")
    if not 0 < budget <= 1:
        raise URSAMError(f"the review budget must be in (0, 1], got {budget}")
    t0 = time.perf_counter()
    folder = cache_folder(cache_key(library, settings, modes, local))
    per_support = {}
    for i, case_id in enumerate(ids):
        progress.info(f"[{i + 1}/{len(ids)}] {case_id}: segmented with the other {len(ids) - 1} supports")
        path = folder / f"{case_id}.npz"
        if path.is_file():
            per_support[case_id] = load_cases(path)
            continue
        cases = support_cases(library, case_id, backend, settings, modes, local, progress)
        save_cases(path, cases)
        per_support[case_id] = cases
    progress.stage("fitting the fusion", total=len(library.names))
    organs, ablations, loo = {}, {"no_sam": {}, "no_rectify": {}}, {}
    for k, name in enumerate(library.names.values()):
        progress.step(k, len(library.names))
        by_mode = {m: [per_support[c][m][name] for c in ids if name in per_support[c].get(m, {})] for m in modes}
        by_mode = {m: cs for m, cs in by_mode.items() if len(cs) >= 2}
        if not by_mode:
            continue
        fit = fit_organ(name, by_mode, budget)
        organs[name], loo[name] = fit.model, fit.loo_dice
        ablations["no_sam"][name] = fit.no_sam
        ablations["no_rectify"][name] = replace(fit.model, rectify=None)
    progress.done()
    if not organs:
        raise URSAMError("calibration found no organ that at least two support scans label", library.meta_path)
    calibration = Calibration(organs, ablations, loo, list(ids), settings.to_json(), tuple(modes), local, budget,
                              time.perf_counter() - t0)
    return calibration.save(Path(out) if out else Path(library.path) / CALIBRATION_FILE)
