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
import SimpleITK as sitk

from . import __version__
from .atlas_prior import LocalWeighting, warp_labels
from .atomic import atomic_path, atomic_write_text, cache_dir
from .calibration.file import CALIBRATION_FILE, CANDIDATE_MODES, MIN_SUPPORTS, Calibration
from .calibration.fit import Case, fit_organ
from .errors import URSAMError
from .fusion import DEFAULT_REVIEW_BUDGET, Evidence
from .localizers import LibrarySource
from .metrics import dice
from .orientation import Orientation
from .pipeline import ENSEMBLE, MAIN, URSAM, URSAM_ATLAS
from .progress import Progress
from .quality.library import fit_quality, held_out_cases
from .runner import ScanJob, run_scan
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


#: what one support's cached runs hold; a new format is not served from an older cache
RUNS_FORMAT = 2


def cache_key(library, settings, modes, local):
    digest = hashlib.sha256()
    parts = {"version": __version__, "format": RUNS_FORMAT, "settings": settings.to_json(), "modes": list(modes),
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


#: how many of an organ's best-fitting supports the calibration tries for its vote (None: every one)
SELECTION_CANDIDATES = (2, 3, 5, 8, None)


def _k_name(k):
    return "all" if k is None else str(k)


def selection_dice(warped, grid, truth, library):
    """``{organ name: {k: Dice}}``: per organ, the Dice of the majority vote of its ``k`` best-fitting
    supports' warped labels (:data:`SELECTION_CANDIDATES`) against ``truth`` (on ``grid``, the canonical
    grid)."""
    by_id = {t.case_id: t for t in library.templates()}
    values = list(warped.values)
    masks = {}
    for r in sorted(warped.registrations, key=lambda r: (r.metric, r.case_id)):
        arr = sitk.GetArrayFromImage(warp_labels(grid, r, by_id[r.case_id].read_labels(), values))
        masks[r.case_id] = (r, arr)
    out = {}
    for value in values:
        voters = [(r, arr == value) for r, arr in masks.values() if value in r.points]
        t = truth == warped.relabel.get(value, value)
        if not voters or not t.any():
            continue
        scores = {}
        for k in SELECTION_CANDIDATES:
            chosen = voters if k is None or k >= len(voters) else voters[:k]
            vote = np.mean([m for _, m in chosen], axis=0) > 0.5
            scores[_k_name(k)] = dice(vote, t)
        out[library.names.get(value, str(value))] = scores
    return out


def support_cases(library, case_id, backend, settings, modes, local, progress, per_organ=None):
    """Segment one support with the others as templates, in every mode: ``({mode: {organ name: Case}},
    selection)``, ``selection``: :func:`selection_dice` of the run's warped supports. ``per_organ``:
    ``{organ name: k}``, each organ voted by its ``k`` best-fitting supports, as a query of the calibrated
    library is (None: every support votes)."""
    template = library.case(case_id)
    # uncalibrated: the runs are what a calibration is fitted on (a calibration the library has already
    # must not leak into them)
    source = LibrarySource(library.without(case_id), missing="skip", per_organ=per_organ)
    job = ScanJob(template.image_path, source, settings, use_calibration=False, joint_modes=tuple(modes),
                  local=local)
    outcome = run_scan(job, lambda percentile: backend, progress)
    if outcome.segmentation is None:
        return {}, {}
    _, truth = template.read_labels(reference=outcome.scan.reference)
    truth = outcome.canonical.orientation.to_canonical(truth)
    cases = {mode: cases_of_run(run, truth) for mode, run in outcome.segmentation.runs.items()}
    return cases, selection_dice(outcome.warped, outcome.canonical.reference, truth, library)


def fit_library_quality(library, per_support, ids, budget):
    """The quality estimate (:class:`URSAMLib.quality.model.QualityModel`) of the leave-one-out runs: each
    support's organs fused by a model fitted without that support, and the estimate fitted on those."""
    spacing, labels = {}, {}
    for case_id in ids:
        image, arr = library.case(case_id).read_labels()
        orientation = Orientation.of(image)  # the runs are on the canonical grid
        spacing[case_id] = orientation.canonical_image(image).GetSpacing()[::-1]
        labels[case_id] = (orientation.to_canonical(arr), spacing[case_id])
    cases = held_out_cases({c: per_support[c] for c in ids}, spacing, budget, fit_fusion=fit_organ)
    return fit_quality(cases, labels, library.names)


def choose_per_organ(selections):
    """Per organ, the number of best-fitting supports whose vote did best over the leave-one-out runs
    (``selections``: their :func:`selection_dice`); ties go to more supports. ``{name: k or None}``."""
    out = {}
    names = {n for s in selections for n in s}
    for name in sorted(names):
        runs = [s[name] for s in selections if name in s]
        means = {k: float(np.mean([r[_k_name(k)] for r in runs])) for k in SELECTION_CANDIDATES}
        best = max(means.values())
        chosen = [k for k in SELECTION_CANDIDATES if means[k] >= best - 1e-9]
        out[name] = chosen[-1]
    return out


#: at most this many supports are segmented with the others as their templates: a large library is
#: calibrated on a subset that covers every organ
MAX_QUERIES = 12
#: each organ is in at least this many of the subset's supports (where the library has that many)
MIN_PER_ORGAN = 4


def choose_queries(library, ids, max_queries=MAX_QUERIES, seed=0):
    """The supports a calibration segments (leave one out): every one, or in a library of more than
    ``max_queries``, a seeded subset of that size in which every organ appears in at least
    :data:`MIN_PER_ORGAN` supports (where the library has that many). Returns the ids in library order."""
    if max_queries is None or len(ids) <= max_queries:
        return list(ids)
    organs = {c: {int(v) for v in np.unique(library.case(c).read_labels()[1]) if v} for c in ids}
    order = list(np.random.default_rng(seed).permutation(len(ids)))
    chosen = []
    # first the supports an organ still lacks (the organ held by the fewest supports first), then at random
    for value in sorted(library.names, key=lambda v: sum(v in organs[c] for c in ids)):
        need = min(MIN_PER_ORGAN, sum(value in organs[c] for c in ids))
        for i in order:
            if sum(value in organs[c] for c in chosen) >= need or len(chosen) >= max_queries:
                break
            if value in organs[ids[i]] and ids[i] not in chosen:
                chosen.append(ids[i])
    for i in order:
        if len(chosen) >= max_queries:
            break
        if ids[i] not in chosen:
            chosen.append(ids[i])
    return [c for c in ids if c in chosen]


def calibrate(library, backend, settings=None, progress=None, out=None, modes=CANDIDATE_MODES,
              budget=DEFAULT_REVIEW_BUDGET, local=None, max_queries=MAX_QUERIES, max_minutes=None, seed=0):
    """Calibrate the fusion on ``library`` (leave one out); writes and returns the :class:`Calibration`.

    ``backend``: the SAM backend of the leave-one-out runs; ``budget``: the
    review budget the flag thresholds are fitted for (a query is capped at it).
    ``max_queries``: a larger library is calibrated on a subset of its
    supports (:func:`choose_queries`, seeded by ``seed``); ``max_minutes``:
    no new leave-one-out run starts after this many minutes (the fit takes
    the runs done; a rerun resumes). The subset and what was run are in the
    calibration's ``queries``.
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
    queries = choose_queries(library, ids, max_queries, seed)
    per_support, selections, stopped = {}, [], []
    for i, case_id in enumerate(queries):
        path = folder / f"{case_id}.npz"
        selection_path = folder / f"{case_id}.selection.json"
        if not path.is_file():
            if max_minutes is not None and time.perf_counter() - t0 > 60.0 * max_minutes:
                stopped.append(case_id)
                continue
            progress.info(f"[{i + 1}/{len(queries)}] {case_id}: segmented with the other {len(ids) - 1} supports")
            cases, selection = support_cases(library, case_id, backend, settings, modes, local, progress)
            atomic_write_text(selection_path, json.dumps(selection))
            save_cases(path, cases)
        # the fit always reads the runs back as the cache keeps them (sources as float16): a calibration
        # made with its runs equals one resumed from them
        per_support[case_id] = load_cases(path)
        if selection_path.is_file():
            selections.append(json.loads(selection_path.read_text(encoding="utf-8")))
    ids = [c for c in queries if c in per_support]
    per_organ = choose_per_organ(selections)
    if any(k is not None and k < len(library.case_ids()) - 1 for k in per_organ.values()):
        # A query votes with each organ's best-fitting supports: the runs the fusion and the quality
        # estimate are fitted on vote the same way (every support voting, a registration that lands off
        # dilutes the vote, and a model fitted on those runs misjudges a query's sharper one).
        tag = hashlib.sha256(json.dumps(per_organ, sort_keys=True).encode()).hexdigest()[:12]
        for i, case_id in enumerate(ids):
            path = folder / f"{case_id}.selected-{tag}.npz"
            if not path.is_file():
                progress.info(f"[{i + 1}/{len(ids)}] {case_id}: segmented again, each organ voted by its "
                              "best-fitting supports")
                cases, _ = support_cases(library, case_id, backend, settings, modes, local, progress, per_organ)
                save_cases(path, cases)
            per_support[case_id] = load_cases(path)
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
    progress.stage("fitting the quality estimate")
    quality = fit_library_quality(library, per_support, ids, budget)
    calibration = Calibration(organs, ablations, loo, list(library.case_ids()), settings.to_json(), tuple(modes),
                              local, budget, time.perf_counter() - t0,
                              queries={"segmented": ids, "subset": len(queries) < len(library.case_ids()),
                                       "max_queries": max_queries, "not_run": stopped, "seed": seed},
                              per_organ=per_organ, quality=quality)
    return calibration.save(Path(out) if out else Path(library.path) / CALIBRATION_FILE)
