"""How well URSAM's quality estimate says which organs are wrong, by how much, and on which slices.

Usage (from the repository root; every step is resumable and writes outside the repository)::

    # 1. the library's own leave-one-out runs (cached by `ursam templates calibrate`) turned into the
    #    quality model's training cases, each fused by a model fitted without it
    python benchmarks/quality_eval.py library ../shared/data/hn-openkbp --calibration /tmp/q/hn_calibration.json \
        --work /tmp/q
    # 2. each query run once through the default calibrated pipeline; what the quality estimate needs,
    #    and the truth, dumped per organ to WORK/dumps/<case>.npz
    python benchmarks/quality_eval.py dump ../shared/data/hn-openkbp --calibration /tmp/q/hn_calibration.json \
        --work /tmp/q
    # 3. the quality model fitted on the library alone, applied to the dumped queries, and scored
    python benchmarks/quality_eval.py score ../shared/data/hn-openkbp --work /tmp/q

The queries never enter a fit: step 3 fits on the library's cases (step 1) and only scores the queries.
``score`` prints the figures per aim (pooled, within organ, per organ) and writes WORK/quality_scores.json.
"""
import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "URSAM"))

from URSAMLib.calibration import Calibration  # noqa: E402
from URSAMLib.cli import build_parser  # noqa: E402
from URSAMLib.commands.options import settings_from_args  # noqa: E402
from URSAMLib.evaluation.metrics import dice  # noqa: E402
from URSAMLib.imageio import read_ct  # noqa: E402
from URSAMLib.localize import localize  # noqa: E402
from URSAMLib.orientation import Orientation  # noqa: E402
from URSAMLib.pipeline import FUSION, label_map  # noqa: E402
from URSAMLib.progress import Progress  # noqa: E402
from URSAMLib.registration.warp import warp_labels  # noqa: E402
from URSAMLib.scan import BackendOptions  # noqa: E402
from URSAMLib.segment import segment_query  # noqa: E402
from URSAMLib.templates import Library  # noqa: E402


# ----------------------------------------------------------------------------------------------
# dump: one calibrated run per query

def _default_settings(dataset):
    """The settings `ursam segment CT --templates LIB` runs with (its own argument defaults)."""
    args = build_parser().parse_args(["segment", "ct.nii.gz", "--templates", str(dataset), "--out", "unused"])
    return settings_from_args(args)


def dump_case(dataset, case_id, calibration, backend, settings, out_path, progress):
    """Run one query as `ursam segment` does and keep, per organ over its region, what the quality
    estimate reads and what scoring it needs (truth is kept whole: the scores look past the region)."""
    support = Library(dataset, role="support")
    query = Library(dataset, role="query").case(case_id)
    reference, volume = read_ct(query.image_path)
    _, truth = query.read_labels(reference=reference)
    t0 = time.perf_counter()
    localization = localize(query.image_path, support, method=settings.localizer, progress=progress,
                            margin=settings.margin, missing="skip")
    result = segment_query(volume, reference, localization, backend, settings, progress, calibration=calibration)
    seconds = time.perf_counter() - t0
    orient = Orientation.of(reference)
    canonical_ref = orient.canonical_image(reference)
    shape = tuple(canonical_ref.GetSize())[::-1]
    labels = label_map(result.organs, FUSION, shape)
    truth_c = result.to_canonical(truth)
    regs = localization.refined(settings.deformable)
    templates = {t.case_id: t for t in support.templates()}
    values = [o.label for o in result.main_organs()]
    warped = {r.case_id: np.asarray(_array(warp_labels(canonical_ref, r, templates[r.case_id], values)))
              for r in regs}
    arrays = {"labels": labels.astype(np.uint8), "truth": truth_c.astype(np.uint8)}
    meta = {"case": case_id, "seconds": round(seconds, 1), "spacing_zyx": list(canonical_ref.GetSpacing()[::-1]),
            "orientation": orient.to_json(), "registrations": [r.to_json() for r in localization.registrations],
            "organs": []}
    for o in result.main_organs():
        if o.fused is None:
            continue
        k = f"{o.name}|"
        ev = o.evidence()
        for s, a in ev.sources.items():
            arrays[k + "src:" + s] = a.astype(np.float32)
        arrays[k + "frac"] = o.prior.on(o.sl, "frac")
        arrays[k + "p"] = o.fused.probability.astype(np.float32)
        arrays[k + "mask"] = o.fused.mask
        arrays[k + "intensity"] = o.intensity.astype(np.float16)
        for cid, w in warped.items():
            arrays[k + "sup:" + cid] = w[o.sl] == o.label
        meta["organs"].append({"name": o.name, "label": int(o.label),
                               "sl": [[s.start, s.stop] for s in o.sl], "box_min_ijk": list(o.box.min_ijk),
                               "box_max_ijk": list(o.box.max_ijk), "fusion": o.fusion.to_json(),
                               "n_supports": int(o.prior.n_supports),
                               "dice": dice(labels == o.label, truth_c == o.label)})
    arrays["meta"] = np.array(json.dumps(meta))
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_suffix(".tmp.npz")
    np.savez_compressed(tmp, **arrays)
    tmp.replace(out_path)
    return meta


def _array(image):
    import SimpleITK as sitk

    return sitk.GetArrayFromImage(image)


def main_dump(args):
    dataset = Path(args.dataset)
    calibration = Calibration.load(args.calibration)
    settings = _default_settings(dataset)
    progress = Progress(quiet=True)
    backend = BackendOptions().make()
    ids = args.cases.split(",") if args.cases else Library(dataset, role="query").case_ids()
    for case_id in ids:
        out = Path(args.work) / "dumps" / f"{case_id}.npz"
        if out.is_file():
            continue
        meta = dump_case(dataset, case_id, calibration, backend, settings, out, progress)
        print(f"{case_id}: {meta['seconds']} s, Dice " +
              ", ".join(f"{o['name']} {o['dice']:.3f}" for o in meta["organs"]), flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="step", required=True)
    d = sub.add_parser("dump", help="run each query once and dump what the quality estimate needs")
    d.add_argument("dataset")
    d.add_argument("--calibration", required=True)
    d.add_argument("--work", default="/tmp/q")
    d.add_argument("--cases", help="comma-separated query ids (default: every query)")
    d.set_defaults(func=main_dump)
    args = p.parse_args()
    args.func(args)


if __name__ == "__main__":
    main()
