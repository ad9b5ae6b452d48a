"""The leave-one-out runs of a calibration: each support segmented with the others as its templates.

Each support is segmented exactly as a query would be, through
:func:`URSAMLib.runner.run_scan`, in every candidate prompt mode at once (one
pipeline pass). Per organ, its evidence (SAM's ensemble, the atlas votes),
the truth over its region and the masks of the existing methods become a
:class:`Case`; a support's cases are kept in the user's cache folder, so a
rerun of the calibration resumes.
"""
from __future__ import annotations

import hashlib
import json

import numpy as np

from .. import __version__
from ..atomic import atomic_path
from ..fusion import Evidence
from ..pipeline import MAIN
from ..runner import LibrarySource, ScanJob, run_scan
from ..sam.fast_encoder import cache_dir
from .fit import Case


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
        refs = {k: o.masks[k] for k in ("ensemble", "ursam", "ursam+atlas") if k in o.masks}
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
    job = ScanJob(template.image_path, LibrarySource(library.without(case_id), missing="skip"), settings,
                  joint_modes=tuple(modes), local=local)
    outcome = run_scan(job, lambda percentile: backend, progress)
    if outcome.segmentation is None:
        return {}
    _, truth = template.read_labels(reference=outcome.scan.reference)
    truth = outcome.canonical.orientation.to_canonical(truth)
    return {mode: cases_of_run(run, truth) for mode, run in outcome.segmentation.runs.items()}
