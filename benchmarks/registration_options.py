"""Seconds per support and accuracy of the support registrations (affine, then the deformable stage) by option.

Usage (from the repository root)::

    python benchmarks/registration_options.py ../shared/data/hn-openkbp --cases pt_34,pt_59,pt_60 \
        --variant base --variant 'samples=10000' --variant 'deformable:demons_shrink=4,2;demons_iterations=40,30'

A variant is ``;``-separated ``FIELD=VALUE`` items: fields of
``RegistrationOptions`` (the affine registration of the localizer), then from
the item marked ``deformable:`` on, fields of ``DeformableOptions``; ``base``
is the defaults. For
each query case and variant the supports are registered as ``ursam segment
--templates`` does (in parallel, one ITK thread each, so runs repeat), then
refined by the deformable stage. Reported per variant: CPU seconds per support
of the affine registration and of the deformable stage (the steadier figure on
a shared machine; wall seconds too), the IoU of each localized box (before the
margin) with the box of the organ's labels, and the Dice of the majority-vote
atlas with the affine and with the deformable transforms. The last line is one
JSON object.
"""
import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import SimpleITK as sitk

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "URSAM"))

from URSAMLib.atlas_prior import atlas_labels  # noqa: E402
from URSAMLib.boxes import OrganBox, box_iou, boxes_from_labels  # noqa: E402
from URSAMLib.localizers import localize  # noqa: E402
from URSAMLib.metrics import dice  # noqa: E402
from URSAMLib.orientation import canonical  # noqa: E402
from URSAMLib.registration.deformable import DeformableOptions, refine_registrations  # noqa: E402
from URSAMLib.templates import Library  # noqa: E402


def _value(text):
    if text.lower() in ("none", "true", "false"):
        return {"none": None, "true": True, "false": False}[text.lower()]
    nums = [float(v) for v in text.split(",")]
    nums = [int(v) if v.is_integer() else v for v in nums]
    return tuple(nums) if "," in text else nums[0]


def parse_variant(text):
    """``(registration options, deformable options)`` keyword dicts of a variant."""
    reg, dfm = {}, {}
    if text.strip() in ("", "base"):
        return reg, dfm
    target = reg
    for item in text.split(";"):
        item = item.strip()
        if item.startswith("deformable:"):  # this item and the ones after it
            target, item = dfm, item[len("deformable:"):]
        key, _, value = item.partition("=")
        target[key.strip()] = _value(value.strip())
    return reg, dfm


_AFFINE = {}


def run_case(ds, case_id, reg_opts, dfm_opts):
    t = ds.case(case_id)
    query = sitk.Cast(t.read_image(), sitk.sitkFloat32)
    _, truth = t.read_labels(reference=query)
    names = {int(k): v for k, v in ds.meta["labels"].items()}
    lib = Library(ds.path)
    key = (case_id, repr(sorted(reg_opts.items())))
    if key not in _AFFINE:  # variants of the deformable stage alone share the affine registrations
        c0, w0 = time.process_time(), time.perf_counter()
        loc = localize(query, lib, **reg_opts)
        _AFFINE[key] = (loc, time.process_time() - c0, time.perf_counter() - w0)
    loc, affine_cpu, affine_wall = _AFFINE[key]
    opts = DeformableOptions(**dfm_opts)
    c0, w0 = time.process_time(), time.perf_counter()
    refined = refine_registrations(canonical(query), loc.registrations, lib, opts)
    dfm_cpu, dfm_wall = time.process_time() - c0, time.perf_counter() - w0
    n = len(loc.registrations)
    truth_boxes = {b.label: b for b in boxes_from_labels(truth, names)}
    iou = {}
    for b in loc.info["raw_boxes"]:
        if b["label"] in truth_boxes:
            iou[names[b["label"]]] = round(box_iou(OrganBox(b["label"], b["name"], b["min_ijk"], b["max_ijk"]),
                                                   truth_boxes[b["label"]]), 3)
    values = sorted(v for v in names if (truth == v).any())

    def atlas_dice(regs):
        atlas = atlas_labels(query, regs, lib, values)
        return {names[v]: round(float(dice(atlas == v, truth == v)), 3) for v in values}

    return {"case": case_id, "supports": n,
            "affine_cpu_s_per_support": round(affine_cpu / n, 2), "affine_wall_s": round(affine_wall, 1),
            "affine_s_per_support": {r.case_id: round(r.seconds, 2) for r in loc.registrations},
            "deformable_cpu_s_per_support": round(dfm_cpu / n, 2), "deformable_wall_s": round(dfm_wall, 1),
            "box_iou": iou, "atlas_dice": atlas_dice(loc.registrations),
            "atlas_deformable_dice": atlas_dice(refined)}


def summary(rows):
    mean = statistics.mean
    return {"affine_cpu_s_per_support": round(mean(r["affine_cpu_s_per_support"] for r in rows), 2),
            "deformable_cpu_s_per_support": round(mean(r["deformable_cpu_s_per_support"] for r in rows), 2),
            "box_iou": round(mean(v for r in rows for v in r["box_iou"].values()), 3),
            "atlas_dice": round(mean(v for r in rows for v in r["atlas_dice"].values()), 3),
            "atlas_deformable_dice": round(mean(v for r in rows for v in r["atlas_deformable_dice"].values()), 3)}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("dataset")
    p.add_argument("--cases", help="comma-separated query case ids (default: the dataset's queries)")
    p.add_argument("--variant", action="append", default=[], help="options to try (repeatable; default: base)")
    p.add_argument("--out", help="JSON file of the results")
    args = p.parse_args(argv)
    ds = Library(args.dataset)
    cases = args.cases.split(",") if args.cases else ds.case_ids("query")
    out = {}
    for text in args.variant or ["base"]:
        reg, dfm = parse_variant(text)
        rows = []
        for case_id in cases:
            rows.append(run_case(ds, case_id, reg, dfm))
            print(json.dumps({"variant": text, **rows[-1]}), flush=True)
        out[text] = {"summary": summary(rows), "cases": rows}
        print(f"{text}: {json.dumps(out[text]['summary'])}", flush=True)
    print("\n| variant | affine CPU s/support | deformable CPU s/support | box IoU | atlas Dice | "
          "deformable atlas Dice |\n|---|---|---|---|---|---|")
    for text, v in out.items():
        s = v["summary"]
        print(f"| {text} | {s['affine_cpu_s_per_support']} | {s['deformable_cpu_s_per_support']} | {s['box_iou']} "
              f"| {s['atlas_dice']} | {s['atlas_deformable_dice']} |")
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=1))
    print(json.dumps({k: v["summary"] for k, v in out.items()}))


if __name__ == "__main__":
    main()
