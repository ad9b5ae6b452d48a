"""Compare the two localizers (registration and MedLAM) on a dataset's query cases.

Boxes (cheap, no SAM): box IoU and centre error of each organ's localized box
(before the margin) against the true box, and the seconds per case::

    python benchmarks/medlam_compare.py boxes ../shared/data/hn-openkbp \\
        --checkpoint CKPT --out /tmp/loc_compare

Full pipeline (SAM): run ``ursam evaluate`` once per localizer, then put the
two side by side (Dice of auto prompting and UR-SAM, box scores, seconds)::

    ursam evaluate DATA --out /tmp/ev_reg
    ursam evaluate DATA --localizer medlam --localizer-checkpoint CKPT --out /tmp/ev_medlam
    python benchmarks/medlam_compare.py evaluations registration=/tmp/ev_reg medlam=/tmp/ev_medlam

(a DIR may also hold several evaluations, e.g. one per case: all results.csv below it count).

Both modes print a markdown table and write it (with the per-case numbers)
to ``--out``. Finished cases of the boxes mode are kept in ``--out/cases``
and reused, so an interrupted run continues where it stopped.
"""
import argparse
import csv
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "URSAM"))

from URSAMLib.boxes import OrganBox, box_iou, boxes_from_labels  # noqa: E402
from URSAMLib.errors import URSAMError  # noqa: E402
from URSAMLib.imageio import read_labels
from URSAMLib.localizers import localize
from URSAMLib.metrics import box_centre_error_mm  # noqa: E402
from URSAMLib.templates import Library


def _mean(values):
    v = [x for x in values if x is not None and not (isinstance(x, float) and math.isnan(x))]
    return float(np.mean(v)) if v else float("nan")


def _fmt(v, digits):
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}f}"


def localize_case(image, library, method, options, names, truth_path):
    t0, cpu0 = time.perf_counter(), time.process_time()
    info = localize(str(image), library, method=method, missing="skip", **options).info
    seconds, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    ref, truth = read_labels(truth_path)
    spacing = ref.GetSpacing()
    true_boxes = {b.label: b for b in boxes_from_labels(truth, names)}
    organs = {}
    for b in info.get("raw_boxes", []):
        box = OrganBox(b["label"], b["name"], b["min_ijk"], b["max_ijk"])
        t = true_boxes.get(box.label)
        if t is None:
            continue
        organs[box.name] = {"box_iou": box_iou(box, t), "centre_error_mm": box_centre_error_mm(box, t, spacing)}
    for value, t in true_boxes.items():
        if names[value] not in organs:
            organs[names[value]] = {"box_iou": 0.0, "centre_error_mm": None, "missed": True}
    extra = {k: info[k] for k in ("support_seconds", "support_cpu_seconds", "support_features_reused") if k in info}
    # CPU seconds of all threads: what the case costs, however busy the machine was.
    return {"seconds": seconds, "cpu_seconds": cpu, "organs": organs, **extra}


def run_boxes(args):
    import torch  # noqa: PLC0415 (torch loads only where a model runs)

    torch.set_num_threads(args.threads)
    data = Path(args.dataset)
    meta = json.loads((data / "dataset.json").read_text())
    names = {int(k): v for k, v in meta["labels"].items()}
    cases = args.cases.split(",") if args.cases else meta["query"]
    library = Library(data)
    methods = args.localizers.split(",")
    options = {"registration": {}, "medlam": {"checkpoint": args.checkpoint, "device": args.device}}
    if "medlam" in methods and not args.checkpoint:
        raise URSAMError("--checkpoint is needed for the medlam localizer")
    out = Path(args.out)
    (out / "cases").mkdir(parents=True, exist_ok=True)
    results = {m: {} for m in methods}
    for case_id in cases:
        image = data / "cases" / case_id / "image.nii.gz"
        truth = data / "cases" / case_id / "labels.nii.gz"
        for method in methods:
            f = out / "cases" / f"{method}_{case_id}.json"
            if f.exists():
                results[method][case_id] = json.loads(f.read_text())
                continue
            r = localize_case(image, library, method, options[method], names, truth)
            f.write_text(json.dumps(r, indent=1))
            results[method][case_id] = r
            print(f"{case_id} {method}: {r['seconds']:.1f} s, mean IoU "
                  f"{_mean([o['box_iou'] for o in r['organs'].values()]):.3f}", flush=True)
    table = boxes_table(results, names, methods, args)
    (out / "table.md").write_text(table)
    print(table)


def boxes_table(results, names, methods, args):
    organs = list(names.values())
    lines = [f"# Localizers on {len(next(iter(results.values())))} query cases of {Path(args.dataset).name}", ""]
    if "medlam" in methods:
        lines += [f"MedLAM checkpoint: {args.checkpoint}", ""]
    header = "| organ | " + " | ".join(f"IoU {m}" for m in methods) + " | " + \
        " | ".join(f"centre err {m} (mm)" for m in methods) + " |"
    lines += ["Box before the margin against the true box; a missed organ counts IoU 0 (no centre error).", "",
              header, "|" + "---|" * (1 + 2 * len(methods))]
    for organ in organs + ["Avg"]:
        def vals(m, key):
            per = [r["organs"][o][key] for r in results[m].values() for o in r["organs"]
                   if (organ == "Avg" or o == organ)]
            return _mean(per)
        lines.append(f"| {organ} | " + " | ".join(_fmt(vals(m, "box_iou"), 3) for m in methods) + " | " +
                     " | ".join(_fmt(vals(m, "centre_error_mm"), 1) for m in methods) + " |")
    lines += ["", "Seconds per case: wall clock, and CPU time of all threads (not inflated by other work on the "
                  "machine; where recorded).", "",
              "| localizer | wall s per case (mean) | first case | later cases (mean) | CPU s per case (mean) |",
              "|---|---|---|---|---|"]
    for m in methods:
        secs = [r["seconds"] for r in results[m].values()]
        cpu = [r.get("cpu_seconds") for r in results[m].values()]
        later = _mean(secs[1:]) if len(secs) > 1 else float("nan")
        lines.append(f"| {m} | {_mean(secs):.1f} | {secs[0]:.1f} | {_fmt(later, 1)} | {_fmt(_mean(cpu), 1)} |")
    if "medlam" in methods:
        first = [r for r in results["medlam"].values() if not r.get("support_features_reused")]
        if first:
            lines += ["", f"MedLAM's support features are computed once per library and checkpoint "
                          f"({_mean([r.get('support_seconds') for r in first]):.1f} s wall, "
                          f"{_fmt(_mean([r.get('support_cpu_seconds') for r in first]), 1)} s CPU, in the first "
                          f"case) and reused."]
    return "\n".join(lines) + "\n"


def run_evaluations(args):
    runs = {}
    for item in args.runs:
        if "=" not in item:
            raise URSAMError(f"give NAME=DIR, got {item!r}")
        name, folder = item.split("=", 1)
        folder = Path(folder)
        # One evaluation, or a folder of them (one per case, say): every results.csv below it.
        found = sorted(folder.glob("**/results.csv"))
        if not found:
            raise URSAMError("no results.csv (run `ursam evaluate` first)", folder)
        rows, seconds = [], []
        for path in found:
            with path.open() as f:
                rows += list(csv.DictReader(f))
            seconds += [json.loads(p.read_text())["info"].get("localize_seconds")
                        for p in sorted((path.parent / "cases").glob("*.json"))]
        runs[name] = (rows, seconds)
    organs = list(dict.fromkeys(r["organ"] for rows, _ in runs.values() for r in rows))

    def mean_of(rows, method, key, organ):
        return _mean([float(r[key]) for r in rows if r["method"] == method and (organ == "Avg" or r["organ"] == organ)
                      and r[key] not in ("", "nan")])

    names = list(runs)
    cols = [(n, m, k) for n in names for m, k in (("auto", "dice"), ("ursam", "dice"))] + \
           [(n, "auto", "box_iou") for n in names] + [(n, "auto", "centre_error_mm") for n in names]
    label = {"dice": "Dice", "box_iou": "box IoU", "centre_error_mm": "centre err (mm)"}
    cases = {n: sorted({r["case"] for r in rows}) for n, (rows, _) in runs.items()}
    lines = ["# Full pipeline with each localizer (from `ursam evaluate`)", "",
             "Cases: " + "; ".join(f"{n}: {len(c)} ({', '.join(c)})" for n, c in cases.items()), "",
             "| organ | " + " | ".join(f"{label[k]} {m if k == 'dice' else ''} [{n}]".replace("  ", " ")
                                       for n, m, k in cols) + " |",
             "|" + "---|" * (1 + len(cols))]
    for organ in organs + ["Avg"]:
        lines.append(f"| {organ} | " + " | ".join(
            _fmt(mean_of(runs[n][0], m, k, organ), 1 if k == "centre_error_mm" else 3) for n, m, k in cols) + " |")
    lines += ["", "| localizer | localization seconds per case (mean) |", "|---|---|"]
    for n, (_, secs) in runs.items():
        lines.append(f"| {n} | {_fmt(_mean(secs), 1)} |")
    table = "\n".join(lines) + "\n"
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "pipeline_table.md").write_text(table)
    print(table)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="mode", required=True)
    b = sub.add_parser("boxes", help="localize every query case with each localizer; box IoU, centre error, seconds")
    b.add_argument("dataset", help="dataset folder (dataset.json with support and query lists)")
    b.add_argument("--checkpoint", help="MedLAM checkpoint")
    b.add_argument("--localizers", default="registration,medlam")
    b.add_argument("--cases", help="comma-separated case ids (default: the query list)")
    b.add_argument("--device", default="auto")
    b.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    b.add_argument("--out", required=True)
    e = sub.add_parser("evaluations", help="side by side: `ursam evaluate` outputs of each localizer")
    e.add_argument("runs", nargs="+", metavar="NAME=DIR")
    e.add_argument("--out")
    args = p.parse_args(argv)
    try:
        (run_boxes if args.mode == "boxes" else run_evaluations)(args)
    except URSAMError as err:
        print(f"medlam_compare: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
