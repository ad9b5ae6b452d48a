"""Seconds per support and atlas Dice of each deformable stage after the affine registration.

Usage (from the repository root)::

    python benchmarks/deformable_options.py ../shared/data/hn-openkbp --cases pt_34 \
        --supports pt_4,pt_13 --methods none,demons,bspline,elastix --out /tmp/deformable.json

For each query case the supports are registered once (affine, as the
localizer does), then each deformable method refines every support; the
table gives the wall and CPU seconds of the deformable stage per support and
the Dice of the majority-vote atlas built with those transforms, per organ.
Supports run one after another with ``--threads`` ITK threads, so the
seconds compare across methods on a shared machine (CPU seconds are the
steadier figure when other jobs load the cores). ``elastix`` needs
itk-elastix (``pip install 'ursam[elastix]'``); it is skipped without it.
"""
import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "URSAM"))

import pickle
import tempfile

from URSAMLib.atlas_prior import atlas_labels  # noqa: E402
from URSAMLib.localizers import localize  # noqa: E402
from URSAMLib.metrics import dice  # noqa: E402
from URSAMLib.orientation import canonical  # noqa: E402
from URSAMLib.registration import deformable  # noqa: E402
from URSAMLib.registration.affine import SupportRegistration
from URSAMLib.templates import Library  # noqa: E402


def support_library(dataset, ids, folder):
    """A template library of some of ``dataset``'s supports (links, no copies) in ``folder``."""
    src = Library(dataset)
    folder = Path(folder)
    (folder / "cases").mkdir(parents=True, exist_ok=True)
    for c in ids:
        link = folder / "cases" / c
        if not link.exists():
            link.symlink_to((Path(dataset) / "cases" / c).resolve())
    meta = {"name": f"{src.meta.get('name', 'lib')}-{len(ids)}", "labels": src.meta["labels"], "support": ids}
    (folder / "dataset.json").write_text(json.dumps(meta))
    return Library(folder)


def overrides(items):
    """``FIELD=VALUE`` items as DeformableOptions keywords: ``a=4`` a number, ``a=60,40,20`` a tuple."""
    out = {}
    for item in items:
        key, _, value = item.partition("=")
        nums = [float(v) for v in value.split(",")]
        nums = [int(v) if v.is_integer() and key != "window" else v for v in nums]
        out[key] = tuple(nums) if "," in value else nums[0]
    return out


def _affine(image_path, lib, case_id, args):
    """The localizer's affine registrations of the supports (from ``--cache`` when there)."""

    path = Path(args.cache) / f"{case_id}_{'-'.join(lib.case_ids())}.pkl" if args.cache else None
    if path is not None and path.exists():
        saved = pickle.loads(path.read_bytes())
        return [SupportRegistration(c, sitk.ReadTransform(str(path.with_suffix(f".{c}.tfm"))), s, m, {}, {})
                for c, s, m in saved]
    regs = localize(image_path, lib, workers=1, threads=args.threads).registrations
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        for r in regs:
            sitk.WriteTransform(r.transform, str(path.with_suffix(f".{r.case_id}.tfm")))
        path.write_bytes(pickle.dumps([(r.case_id, r.seconds, r.metric) for r in regs]))
    return regs


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("dataset")
    p.add_argument("--cases", required=True, help="comma-separated query case ids")
    p.add_argument("--supports", help="comma-separated support ids (default: the dataset's support list)")
    p.add_argument("--methods", default="none,demons,bspline,elastix")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="a DeformableOptions field for every method, e.g. demons_sigma_mm=4 or "
                        "demons_iterations=60,40,20 (repeatable)")
    p.add_argument("--cache", help="folder keeping the affine registrations between runs")
    p.add_argument("--out", help="JSON file of the results")
    args = p.parse_args(argv)

    ds = Library(args.dataset)
    ids = args.supports.split(",") if args.supports else ds.case_ids("support")
    lib = support_library(args.dataset, ids, tempfile.mkdtemp(prefix="ursam-lib-"))
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(args.threads)
    results = []
    for case_id in args.cases.split(","):
        t = ds.case(case_id)
        query = t.read_image()
        ref_labels, truth = t.read_labels(reference=query)
        t0 = time.perf_counter()
        regs = _affine(t.image_path, lib, case_id, args)
        affine_s = time.perf_counter() - t0
        for method in args.methods.split(","):
            if method == "elastix" and not deformable.elastix_available():
                print(f"{case_id}: elastix skipped (itk-elastix is not installed)")
                continue
            opts = deformable.DeformableOptions(method=method, threads=args.threads, **overrides(args.set))
            walls, cpus, refined = [], [], []
            for r in regs:
                w0, c0 = time.perf_counter(), time.process_time()
                refined += deformable.refine_registrations(canonical(query), [r], lib, opts)
                walls.append(time.perf_counter() - w0)
                cpus.append(time.process_time() - c0)
            atlas = atlas_labels(query, refined, lib, list(lib.names))
            per = {n: round(dice(atlas == v, truth == v), 3) for v, n in lib.names.items() if (truth == v).any()}
            row = {"case": case_id, "method": method, "options": args.set, "supports": len(regs),
                   "wall_s_per_support": round(float(np.mean(walls)), 1),
                   "cpu_s_per_support": round(float(np.mean(cpus)), 1),
                   "affine_wall_s_all_supports": round(affine_s, 1),
                   "atlas_dice": per, "atlas_mean_dice": round(float(np.mean(list(per.values()))), 3)}
            results.append(row)
            print(json.dumps(row), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))
    print("\n| case | method | wall s/support | CPU s/support | atlas mean Dice |\n|---|---|---|---|---|")
    for r in results:
        print(f"| {r['case']} | {r['method']} | {r['wall_s_per_support']} | {r['cpu_s_per_support']} "
              f"| {r['atlas_mean_dice']:.3f} |")


if __name__ == "__main__":
    main()
