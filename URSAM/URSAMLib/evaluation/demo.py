"""``ursam demo``: the whole automatic pipeline on a synthetic cohort, no data needed.

1. makes a small synthetic abdominal CT cohort (:mod:`URSAMLib.phantom`);
2. builds a template library from some of the "patients" with the same code
   as ``ursam templates add``, and checks it;
3. localizes the organs of another patient from the library and segments
   them with the default backend (LiteMedSAM), writing exactly what
   ``ursam segment --templates`` writes (masks, uncertainty, .seg.nrrd,
   report.json, boxes.json, overview.png);
4. scores every method against the phantom's truth and prints the Dice table
   (also saved as ``dice.md``).

Layout of ``DIR``: ``cohort/`` (all patients, dataset layout), ``templates/``
(the library), ``segment/`` (the outputs of the segmented patient), ``dice.md``.
"""
from __future__ import annotations

import shutil
import time
from pathlib import Path

from .. import pipeline
from ..atlas_prior import WarpedSupports
from ..atomic import atomic_write_text
from ..calibrate import calibrate as calibrate_library
from ..errors import URSAMError
from ..imageio import read_labels
from ..localizers import LibrarySource
from ..metrics import dice
from ..outputs import check_output_dir
from ..progress import STAGE_MODEL, Progress
from ..runner import ScanJob, run_scan
from ..sam import BackendOptions
from ..settings import Settings
from ..templates import Library
from .evaluate import markdown_table, pivot
from .phantom import PhantomGrid, make_cohort

DEMO_METHODS = pipeline.METHODS + ("atlas",)


def make_demo_data(out_dir, n_templates=3, grid=None, seed=0, progress=None, timings=None):
    """The demo's data in ``out_dir``: ``(library, query)``, the template library (``templates/``,
    built from the cohort's support patients as ``ursam templates add`` builds one) and the query
    patient (a :class:`URSAMLib.templates.Template` of ``cohort/``, its truth as its labels).

    The same seed makes the same cohort; ``ursam demo`` and the Slicer module's demo data both come
    from here.
    """
    progress = progress or Progress()
    timings = {} if timings is None else timings
    grid = grid or PhantomGrid()
    if n_templates < 1:
        raise URSAMError(f"the demo needs at least 1 template patient, got {n_templates}")
    out = Path(out_dir)
    t0 = time.perf_counter()
    progress.stage(f"making a synthetic cohort of {n_templates + 1} patients")
    cohort = make_cohort(out / "cohort", n_templates=n_templates, n_queries=1, seed=seed, grid=grid)
    ds = Library(cohort, role="query")
    timings["cohort_seconds"] = time.perf_counter() - t0

    progress.stage("building the template library")
    lib_path = out / "templates"
    if (lib_path / "dataset.json").exists():
        shutil.rmtree(lib_path)
    lib = Library.create(lib_path, ds.names, name="ursam-demo-templates")
    for case_id in ds.case_ids("support"):
        t = ds.case(case_id)
        lib.add(t.image_path, t.labels_path, case_id=case_id, names=ds.names)
    lib.check()
    return lib, ds.case(ds.case_ids("query")[0])


def run_demo(out_dir, n_templates=3, grid=None, seed=0, backend=None, settings=None, progress=None,
             overwrite=False, calibrate=False):
    """Run the demo into ``out_dir``; returns ``{"table": markdown, "dice": {method: {organ: d}}, ...}``.

    ``settings``: those of ``ursam segment --templates`` (default: its defaults).
    ``calibrate``: calibrate the fusion on the demo's library first (``ursam
    templates calibrate``; needs at least 3 template patients), so that the
    query is segmented with the calibrated fusion.
    """
    progress = progress or Progress()
    grid = grid or PhantomGrid()
    if n_templates < 1:
        raise URSAMError(f"the demo needs at least 1 template patient, got {n_templates}")
    out = check_output_dir(out_dir, overwrite)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    timings = {}

    t0 = time.perf_counter()
    lib, query = make_demo_data(out, n_templates, grid, seed, progress, timings)
    timings["library_seconds"] = time.perf_counter() - t0 - timings["cohort_seconds"]

    settings = (settings or Settings()).check()
    if backend is None:
        progress.stage(f"{STAGE_MODEL} litemedsam")
        backend = BackendOptions().make()
    calibration = None
    if calibrate:
        t0 = time.perf_counter()
        calibration = calibrate_library(lib, backend, settings, progress)
        timings["calibration_seconds"] = time.perf_counter() - t0
    job = ScanJob(query.image_path, LibrarySource(lib), settings, calibration, calibrate, reference=query.labels_path,
                  out=str(out / "segment"), overwrite=overwrite)
    outcome = run_scan(job, lambda percentile: backend, progress)
    result, localization = outcome.result, outcome.localization
    info = localization.info
    timings["localize_seconds"] = outcome.timings["localize_seconds"]
    timings["segment_seconds"] = result.timings["total_seconds"]
    _, truth = read_labels(query.labels_path, outcome.scan.reference)

    values = sorted(lib.names)
    atlas = WarpedSupports.affine(localization).atlas(outcome.scan.reference)
    rows = []
    methods = [m for m in DEMO_METHODS if m != pipeline.FUSION or calibration is not None]
    for method in methods:
        labels = atlas if method == "atlas" else result.label_map(method)
        for v in values:
            if (truth == v).any():
                rows.append({"method": method, "organ": lib.names[v], "dice": dice(labels == v, truth == v)})
    organs = [lib.names[v] for v in values if (truth == v).any()]
    table = pivot(rows, "dice", methods, organs)
    text = markdown_table(table, organs)
    timings["total_seconds"] = time.perf_counter() - t_start
    note = (f"Dice of {query.case_id} (synthetic CT) against its phantom truth; {n_templates} template "
            f"patients; LiteMedSAM on {result.timings['distinct_slices']} slices; "
            f"{timings['total_seconds']:.0f} s in all.")
    atomic_write_text(out / "dice.md", f"# ursam demo\n\n{note}\n\n{text}\n")
    progress.done()
    return {"table": text, "dice": table, "timings": timings, "query": query.case_id, "note": note,
            "rectified_method": result.rectified_method,
            "registration_seconds": info["registration_seconds"]}
