"""A simulated reviewer correcting results with SAM boxes (URSAMLib.correction).

For each organ, k times: find the slice with the most error voxels against the truth, draw the organ's
tight true box on it (or remove the organ from it where the truth has none there), correct with
propagation. Dice of every organ (whole volume) after 1, 3 and 5 boxes, against no correction and against
pasting the true mask on the same slices only (the slices the corrections changed, and the boxes' own).

    python3 benchmarks/correction_reviewer.py RESULT_DIR:LABELS [RESULT_DIR:LABELS ...] [--boxes 5]
        [--rules default,none,off] [--timing 3] [--json out.json]

RESULT_DIR is a folder ``ursam segment`` wrote, LABELS the reference label map of its input. Each rule is a
stopping rule of the propagation (``default``: the engine's CorrectionOptions; ``none``: no stop where SAM
is unsure; ``loose``: it stops only where SAM disagrees more and is less sure; ``off``: no propagation, the box's slice only; ``zoom``: the default
with SAM zoomed onto the box). The rules share each slice's embedding (computed once per scan), so that
several rules cost little more than one; ``--timing N`` then times N corrections per scan with nothing
cached (a new SliceSam each, as ``ursam correct`` has), the seconds the table reports per correction.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "URSAM"))

from URSAMLib.correction import CorrectionOptions, SliceBox, SliceSam, correct_organ, remove_from_slice  # noqa: E402
from URSAMLib.correction_files import ResultFolder, backend_options, read_canonical_scan  # noqa: E402
from URSAMLib.imageio import read_labels  # noqa: E402
from URSAMLib.metrics import dice  # noqa: E402

RULES = {
    "default": CorrectionOptions(),
    "none": replace(CorrectionOptions(), disagree_dice=0.0),
    "loose": replace(CorrectionOptions(), disagree_dice=0.5, min_stability=0.85),
    "off": replace(CorrectionOptions(), propagate=False),
    "zoom": replace(CorrectionOptions(), zoom=True),
}
CHECKPOINTS = (1, 3, 5)


def worst_slice(labels, truth, label):
    errors = np.count_nonzero((labels == label) != (truth == label), axis=(1, 2))
    z = int(np.argmax(errors))
    return z, int(errors[z])


def true_box(truth, label, z):
    ys, xs = np.nonzero(truth[z] == label)
    if not len(ys):
        return None
    return SliceBox(z, int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max()))


def paste_truth(labels, truth, label, slices):
    out = labels.copy()
    for z in slices:
        plane, want = out[z], truth[z] == label
        plane[(plane == label) & ~want] = 0
        plane[want] = label
    return out


def review_organ(sams, labels, truth, label, options, boxes, audit):
    """One organ, ``boxes`` corrections: Dice after each, of the correction and of pasting the truth."""
    current, oracle_slices = labels, set()
    out = {"dice": [], "oracle": [], "changed": [], "seconds": [], "calls": []}
    sam = sams[options.zoom]
    for _ in range(boxes):
        z, n = worst_slice(current, truth, label)
        if n == 0:  # nothing left to correct: the reviewer stops
            out["dice"].append(out["dice"][-1] if out["dice"] else dice(current == label, truth == label))
            out["oracle"].append(out["oracle"][-1] if out["oracle"] else out["dice"][-1])
            out["changed"].append(0)
            out["seconds"].append(0.0)
            out["calls"].append(0)
            continue
        box = true_box(truth, label, z)
        t0 = time.perf_counter()
        if box is None:
            c = remove_from_slice(current, label, z)
        else:
            c = correct_organ(sam, current, label, box, options)
        out["seconds"].append(time.perf_counter() - t0)
        out["calls"].append(c.encoder_calls)
        if audit is not None:
            for s in c.steps:
                if box is not None and s.z != box.z:
                    audit.append({"dice_before": s.dice_before, "stability": s.stability, "written": s.changed,
                                  "truth_old": dice(current[s.z] == label, truth[s.z] == label),
                                  "truth_new": dice(c.labels[s.z] == label, truth[s.z] == label)
                                  if s.changed else None})
        current = c.labels
        oracle_slices |= set(c.changed) | {z}
        out["changed"].append(len(c.changed))
        out["dice"].append(dice(current == label, truth == label))
        out["oracle"].append(dice(paste_truth(labels, truth, label, oracle_slices) == label, truth == label))
    return out, current


def run_case(spec, rules, boxes, timing, audit):
    result_dir, labels_path = spec.split(":")
    folder = ResultFolder.read(result_dir)
    volume, percentile = read_canonical_scan(folder)
    truth = folder.orientation.to_canonical(read_labels(labels_path, folder.reference, "reference")[1])
    labels = folder.orientation.to_canonical(folder.labels)
    backend = backend_options(folder.report, {"device": "cpu"}).make(percentile)
    keep = volume.shape[0] * 2
    sams = {False: SliceSam(backend, volume, zoom=False, keep=keep), True: SliceSam(backend, volume, zoom=True, keep=keep)}
    case = {"result": result_dir, "organs": {}}
    for label, name in folder.organs():
        if not (truth == label).any():
            continue
        row = {"start": dice(labels == label, truth == label)}
        for rule in rules:
            row[rule], _ = review_organ(sams, labels, truth, label, RULES[rule], boxes,
                                       audit if rule == "none" else None)
        case["organs"][name] = row
        print(f"  {Path(result_dir).name} {name}: start {row['start']:.3f} "
              + " ".join(f"{r} {row[r]['dice'][-1]:.3f}" for r in rules), flush=True)
    # seconds per correction with nothing cached (each correction loads its slices' embeddings anew)
    times = []
    for label, name in folder.organs()[:timing]:
        z, n = worst_slice(labels, truth, label)
        box = true_box(truth, label, z)
        if box is None or n == 0:
            continue
        sam = SliceSam(backend, volume, zoom=False)
        t0, c0 = time.perf_counter(), time.process_time()
        c = correct_organ(sam, labels, label, box, replace(CorrectionOptions(), max_slices=5))
        times.append({"organ": name, "seconds": time.perf_counter() - t0, "cpu_seconds": time.process_time() - c0,
                      "encoder_calls": c.encoder_calls, "slices_visited": len(c.steps)})
    case["timing"] = times
    return case


def mean(values):
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else float("nan")


def table(cases, rules, boxes):
    organs = sorted({o for c in cases for o in c["organs"]}, key=lambda o: [o in c["organs"] for c in cases].index(True))
    lines = []
    for rule in rules:
        checkpoints = [k for k in CHECKPOINTS if k <= boxes]
        head = ["organ", "cases", "no correction"] + [f"{k} box{'es' if k > 1 else ''}" for k in checkpoints] + \
            [f"truth pasted, {k}" for k in checkpoints] + ["slices changed per box", "lower than start"]
        lines += [f"\nrule: {rule}", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        rows = []
        for organ in organs:
            rs = [c["organs"][organ] for c in cases if organ in c["organs"]]
            start = mean([r["start"] for r in rs])
            after = [mean([r[rule]["dice"][k - 1] for r in rs]) for k in checkpoints]
            oracle = [mean([r[rule]["oracle"][k - 1] for r in rs]) for k in checkpoints]
            changed = mean([np.mean(r[rule]["changed"]) for r in rs])
            lower = sum(r[rule]["dice"][min(3, boxes) - 1] < r["start"] - 1e-9 for r in rs)
            rows.append((start, after, oracle))
            lines.append("| " + " | ".join([organ, str(len(rs)), f"{start:.3f}"] + [f"{v:.3f}" for v in after]
                                           + [f"{v:.3f}" for v in oracle] + [f"{changed:.1f}", str(lower)]) + " |")
        start = mean([r[0] for r in rows])
        lines.append("| " + " | ".join(["**mean**", "", f"{start:.3f}"]
                                       + [f"{mean([r[1][i] for r in rows]):.3f}" for i in range(len(checkpoints))]
                                       + [f"{mean([r[2][i] for r in rows]):.3f}" for i in range(len(checkpoints))]
                                       + ["", ""]) + " |")
    times = [t for c in cases for t in c["timing"]]
    if times:
        lines.append(f"\nseconds per correction with nothing cached (max 5 slices each side, {len(times)} corrections): "
                     f"mean {mean([t['seconds'] for t in times]):.1f}, max {max(t['seconds'] for t in times):.1f} "
                     f"(CPU seconds, all threads: mean {mean([t.get('cpu_seconds') for t in times]):.1f}); "
                     f"encoder calls mean {mean([t['encoder_calls'] for t in times]):.1f}")
    return "\n".join(lines)


def audit_summary(audit):
    """How often a propagated slice got worse, by its disagreement with the result and SAM's stability."""
    rows = ["\naudit (rule none: every propagated slice SAM wrote): slices, worse than before, mean Dice change",
            "| dice with the result | stability | slices | worse | mean change |", "|---|---|---|---|---|"]
    written = [a for a in audit if a["written"]]
    for dlo, dhi in ((0, 0.5), (0.5, 0.7), (0.7, 0.9)):
        for slo, shi in ((0, 0.85), (0.85, 1.01)):
            sel = [a for a in written if dlo <= a["dice_before"] < dhi and slo <= a["stability"] < shi]
            if sel:
                change = [a["truth_new"] - a["truth_old"] for a in sel]
                rows.append(f"| {dlo}-{dhi} | {slo}-{min(shi, 1)} | {len(sel)} | {sum(c < 0 for c in change)} | "
                            f"{np.mean(change):+.3f} |")
    return "\n".join(rows)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("cases", nargs="*", metavar="RESULT_DIR:LABELS")
    p.add_argument("--from-json", nargs="+", metavar="JSON", help="print the tables of earlier runs' --json files")
    p.add_argument("--boxes", type=int, default=5, help="boxes per organ (default 5)")
    p.add_argument("--rules", default="default,none,off", help=f"stopping rules to compare ({', '.join(RULES)})")
    p.add_argument("--timing", type=int, default=3, help="corrections timed per scan with nothing cached")
    p.add_argument("--json", help="write every number here")
    args = p.parse_args(argv)
    rules = args.rules.split(",")
    audit, cases = [], []
    for path in args.from_json or []:
        saved = json.loads(Path(path).read_text())
        cases += saved["cases"]
        audit += saved["audit"]
    for spec in args.cases:
        cases.append(run_case(spec, rules, args.boxes, args.timing, audit if "none" in rules else None))
    print(table(cases, rules, args.boxes))
    if audit:
        print(audit_summary(audit))
    if args.json:
        Path(args.json).write_text(json.dumps({"cases": cases, "audit": audit}, indent=1))


if __name__ == "__main__":
    main()
