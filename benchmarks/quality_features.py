"""Which evidence follows the true Dice: each quality feature's Spearman with the Dice, in the library's
leave-one-out runs (what the Dice model is fitted on) beside the queries of an evaluation.

The Dice model can only rank an organ's cases as well as its inputs follow their Dice. This prints, per
feature of the quality estimate (``URSAMLib.quality.features``), its Spearman with the true Dice over
case x organ pairs, pooled and within organ (the mean of the per-organ values), on both sides, and the
same for the shipped prediction; and how the errors spread over an organ's slices. Both sides are read
from files, nothing is run again::

    ursam templates calibrate ../shared/data/hn-openkbp --out hn_calibration.json
    ursam evaluate ../shared/data/hn-openkbp --calibration hn_calibration.json --methods ursam --out eval_q/
    python3 benchmarks/quality_features.py eval_q/ --calibration hn_calibration.json

The calibration keeps the rows its Dice model was fitted on (``quality.info.training``); the evaluation's
saved cases keep each pair's features as the run saw them (``case_info.quality[i].features``).
"""
import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "URSAM"))

from URSAMLib.metrics import spearman  # noqa: E402


def correlations(rows, value):
    """``(pooled, within, per organ)`` Spearman of ``value(row)`` with each row's true Dice."""
    x = np.array([value(r) for r in rows], float)
    y = np.array([r["dice"] for r in rows], float)
    organs = sorted({r["organ"] for r in rows})
    per = {}
    for o in organs:
        idx = [i for i, r in enumerate(rows) if r["organ"] == o]
        per[o] = spearman(x[idx], y[idx]) if len(idx) >= 3 and np.ptp(x[idx]) > 0 else float("nan")
    finite = [v for v in per.values() if np.isfinite(v)]
    return spearman(x, y), (float(np.mean(finite)) if finite else float("nan")), per


def fail(message):
    """Bad input: one line naming the file, exit code 2 (as the ursam commands)."""
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


def query_rows(eval_dir):
    cases = sorted(Path(eval_dir, "cases").glob("*.json"))
    if not cases:
        fail(f"no saved cases in {Path(eval_dir, 'cases')} (run ursam evaluate first)")
    rows = []
    for path in cases:
        try:
            info = json.loads(path.read_text(encoding="utf-8"))["info"]
        except (OSError, ValueError, KeyError) as e:
            fail(f"cannot read the saved case {path}: {e!r}")
        for q in info.get("quality", []):
            if "features" not in q:
                fail(f"{path} has no quality features (an evaluation of an older URSAM)")
            rows.append({"organ": q["organ"], "dice": q["true_dice"], "predicted": q["predicted"],
                         "features": q["features"], "errors_per_slice": q["errors_per_slice"],
                         "total_errors": q["total_errors"]})
    if not rows:
        fail(f"the cases in {Path(eval_dir, 'cases')} hold no quality estimate")
    return rows


def library_rows(calibration):
    try:
        data = json.loads(Path(calibration).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        fail(f"cannot read the calibration {calibration}: {e}")
    training = ((data.get("quality") or {}).get("info") or {}).get("training")
    if not training:
        fail(f"{calibration} keeps no quality training rows (calibrate it again)")
    return training


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("eval_dir", help="an `ursam evaluate` output folder (its cases/ are read)")
    ap.add_argument("--calibration", help="the calibration the evaluation used (its library's rows)")
    args = ap.parse_args(argv)
    queries = query_rows(args.eval_dir)
    library = library_rows(args.calibration) if args.calibration else None
    features = list(queries[0]["features"])
    print(f"queries: {len(queries)} case x organ pairs"
          + (f"; library leave-one-out runs: {len(library)}" if library else ""))
    print(f"mean predicted Dice {np.mean([r['predicted'] for r in queries]):.3f} against a true "
          f"{np.mean([r['dice'] for r in queries]):.3f}")
    head = f"{'':28s} {'queries: pooled':>16s} {'within':>7s}"
    if library:
        head += f" {'library: pooled':>16s} {'within':>7s}"
    print(head)
    # organ_mean_dice is one value per organ on a query (NaN within organ) and, in the library's runs, the
    # mean of the other supports' Dice (its within-organ Spearman there is -1 by construction)
    lines = [("prediction (shipped)", lambda r: r["predicted"], False)]
    lines += [(f, (lambda r, f=f: r["features"][f]), True) for f in features]
    for name, value, on_library in lines:
        pooled, within, _ = correlations(queries, value)
        text = f"{name:28s} {pooled:+16.3f} {within:+7.3f}"
        if library and on_library and all(name in r["features"] for r in library):
            lp, lw, _ = correlations(library, value)
            text += f" {lp:+16.3f} {lw:+7.3f}"
        print(text)
    organs = sorted({r["organ"] for r in queries})
    means = [f"{o} {np.mean([r['dice'] for r in queries if r['organ'] == o]):.3f}"
             + (f" / {np.mean([r['dice'] for r in library if r['organ'] == o]):.3f}" if library else "")
             for o in organs]
    print("mean Dice per organ, queries" + (" / library's runs" if library else "") + ": " + ", ".join(means))
    # why no slice ranking can put most of an organ's errors on a fifth of its box's slices
    scored = [r for r in queries if r["total_errors"] > 0]
    with_error = np.mean([np.mean(np.array(r["errors_per_slice"]) > 0) for r in scored])
    off = 1.0 - sum(sum(r["errors_per_slice"]) for r in scored) / sum(r["total_errors"] for r in scored)
    print(f"slices: {with_error:.3f} of a box's slices hold an error voxel (mean over pairs); "
          f"{off:.3f} of the error voxels lie off the box's slices")
    best = max(features, key=lambda f: correlations(queries, lambda r: r["features"][f])[1])
    _, within, per = correlations(queries, lambda r: r["features"][best])
    print(f"most within-organ signal on the queries: {best} ({within:+.3f}; "
          + ", ".join(f"{o} {v:+.2f}" for o, v in per.items()) + ")")
    return 0


if __name__ == "__main__":
    sys.exit(main())
