"""Calibration of the atlas–SAM fusion on the template library itself (``ursam templates calibrate``).

Each support scan is segmented with the other supports as its templates
(leave one out, :mod:`.runs`), in every candidate prompt mode, exactly as a
query would be. Per organ, the evidence of those runs then decides the
fusion's sources, weights, temperature, threshold, rectification and flag
threshold (:mod:`.fit`). :func:`calibrate` writes ``calibration.json`` (into
the library, or where ``out`` says; :mod:`.file`) with every choice and the
leave-one-out Dice of every source and of the fused result. The query scans
of an evaluation never enter it.
"""
from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

from ..atlas_prior import LocalWeighting
from ..errors import URSAMError
from ..fusion import DEFAULT_REVIEW_BUDGET
from ..progress import Progress
from ..settings import Settings
from .file import CALIBRATION_FILE, CANDIDATE_MODES, MIN_SUPPORTS, Calibration
from .fit import fit_organ
from .runs import cache_folder, cache_key, load_cases, save_cases, support_cases


def calibrate(library, backend, settings=None, progress=None, out=None, modes=CANDIDATE_MODES,
              budget=DEFAULT_REVIEW_BUDGET, local=None):
    """Calibrate the fusion on ``library`` (leave one out); writes and returns the :class:`Calibration`.

    ``backend``: the SAM backend of the leave-one-out runs; ``budget``: the
    review budget the flag thresholds are fitted for (a query is capped at it).
    """
    progress = progress or Progress()
    settings = (settings or Settings()).check()
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
