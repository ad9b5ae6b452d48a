"""How well URSAM's quality estimate says which organs are wrong, by how much, and on which slices.

Usage (from the repository root; every step is resumable and writes outside the repository)::

    # 0. the calibration, whose leave-one-out runs land in the user cache
    ursam templates calibrate ../shared/data/hn-openkbp --out /tmp/q/hn_calibration.json
    # 1. those runs turned into the quality model's training cases, each fused by a model fitted without
    #    its support (WORK/library_cases.pkl), and once more without each support in turn for the nested
    #    cross-validation (WORK/library_cases_wo_<support>.pkl)
    python benchmarks/quality_eval.py library ../shared/data/hn-openkbp --calibration /tmp/q/hn_calibration.json \
        --work /tmp/q
    # 2. each query run once through the default calibrated pipeline (as `ursam segment --templates`);
    #    per organ its fused probability, sources, image, per-support warped labels, and the whole-scan
    #    result and truth, dumped to WORK/dumps/<case>.npz
    python benchmarks/quality_eval.py dump ../shared/data/hn-openkbp --calibration /tmp/q/hn_calibration.json \
        --work /tmp/q
    # 3. candidate Dice models compared by the library's nested cross-validation, the one with the lowest
    #    MAE fitted on the library alone, applied to the dumped queries, and scored
    python benchmarks/quality_eval.py score ../shared/data/hn-openkbp --calibration /tmp/q/hn_calibration.json \
        --work /tmp/q

The queries never enter a fit: step 3 fits on the library's cases (step 1) and only scores the queries.
``score`` prints every candidate's figures on the library and on the queries, baselines, the shipped
model's figures per organ, and the aims; it writes WORK/quality_scores.json.
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


# ----------------------------------------------------------------------------------------------
# library: the leave-one-out runs as the quality model's training cases

def _cache(dataset, calibration, given=None):
    """The calibration's cache folder of leave-one-out runs: ``given``, else the one holding a run of
    every support of the calibration."""
    from URSAMLib.sam.fast_encoder import cache_dir

    if given:
        return Path(given)
    for folder in sorted((cache_dir() / "calibration").glob("*")):
        if all((folder / f"{c}.npz").is_file() for c in calibration.supports):
            return folder
    raise SystemExit("no calibration cache with every support's runs: run `ursam templates calibrate` first")


def library_inputs(dataset, calibration, cache=None):
    """``(per_support, spacing, labels, names)`` of the library: the cached runs, each support's voxel size,
    its label map, and the organ names."""
    from URSAMLib.calibration import _load_cases

    lib = Library(dataset, role="support")
    folder = _cache(dataset, calibration, cache)
    per_support, spacing, labels = {}, {}, {}
    for cid in calibration.supports:
        per_support[cid] = _load_cases(folder / f"{cid}.npz")
        t = lib.case(cid)
        reference, _ = read_ct(t.image_path)
        _, arr = t.read_labels(reference=reference)
        sp = tuple(reference.GetSpacing()[::-1])
        spacing[cid], labels[cid] = sp, (arr, sp)
    return per_support, spacing, labels, dict(lib.names)


def main_library(args):
    import pickle

    from URSAMLib.quality import held_out_cases

    dataset = Path(args.dataset)
    calibration = Calibration.load(args.calibration)
    per_support, spacing, _, _ = library_inputs(dataset, calibration, args.cache)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    sets = [("library_cases.pkl", ())] + [(f"library_cases_wo_{s}.pkl", (s,)) for s in calibration.supports]
    if args.first_only:
        sets = sets[:1]
    for name, exclude in sets:
        path = work / name
        if path.is_file():
            continue
        t0 = time.perf_counter()
        cases = held_out_cases(per_support, spacing, calibration.budget, exclude=exclude,
                               progress=lambda m: print("  " + m, flush=True))
        with open(path.with_suffix(".tmp"), "wb") as f:
            pickle.dump(cases, f)
        path.with_suffix(".tmp").replace(path)
        print(f"{name}: {len(cases)} cases in {time.perf_counter() - t0:.0f} s", flush=True)


# ----------------------------------------------------------------------------------------------
# score: fit on the library, predict the dumped queries, and score

#: Dice models compared on the library's nested cross-validation: (features, organ-offset ridge or None);
#: the default is the one with the lowest cross-validated MAE there
MODELS = {
    "expected": (("expected_dice",), None),
    "expected_voxel": (("expected_dice_voxel",), None),
    "expected_voxel+organ": (("expected_dice_voxel",), 3.0),
    "vote": (("mask_vote_dice",), None),
    "vote+organ": (("mask_vote_dice",), 3.0),
    "expected+vote": (("expected_dice", "mask_vote_dice"), None),
    "expected_voxel+vote+organ": (("expected_dice_voxel", "mask_vote_dice"), 3.0),
    "expected_voxel+vote+agreement+organ": (("expected_dice_voxel", "mask_vote_dice", "support_agreement",
                                             "abs_log_volume_ratio"), 3.0),
    "vote+contrast+organ": (("mask_vote_dice", "ring_contrast"), 3.0),
    "expected_voxel+contrast+organ": (("expected_dice_voxel", "ring_contrast"), 3.0),
    "expected_voxel+vote+contrast+organ": (("expected_dice_voxel", "mask_vote_dice", "ring_contrast"), 3.0),
    "all+organ": (None, 3.0),  # every feature
}


def query_organs(path, stats_of=None):
    """Per organ of a dumped query: its OrganEvidence (the result as the label map has it), and what
    scoring needs (whole-scan prediction and truth, its region, spacing, true Dice)."""
    from URSAMLib.quality import OrganEvidence, input_slice_index

    with np.load(path) as data:
        meta = json.loads(str(data["meta"]))
        labels, truth = data["labels"], data["truth"]
        spacing = tuple(meta["spacing_zyx"])
        out = []
        for o in meta["organs"]:
            k = o["name"] + "|"
            sl = tuple(slice(a, b) for a, b in o["sl"])
            sources = {key[len(k) + 4:]: data[key] for key in data.files if key.startswith(k + "src:")}
            pred = labels == o["label"]
            ev = OrganEvidence(o["name"], data[k + "p"], pred[sl], sources, spacing, o["n_supports"],
                               input_slice_index(None, sl[0].start, sl[0].stop - sl[0].start),
                               data[k + "intensity"].astype(np.float32))
            out.append({"case": meta["case"], "name": o["name"], "label": o["label"], "sl": sl, "evidence": ev,
                        "pred": pred, "truth": truth == o["label"], "spacing": spacing, "dice": o["dice"],
                        "fused_mask": data[k + "mask"]})
    return out


def _full(shape, sl, values):
    out = np.zeros(shape, np.float32)
    out[sl] = values
    return out


def _fmt(v):
    return "  nan" if v is None or not np.isfinite(v) else f"{v:+.3f}" if v < 0 else f"{v:.3f}"


def print_dice_scores(title, scores):
    print(f"{title}: n {scores.n}, Spearman {_fmt(scores.spearman)}, MAE {_fmt(scores.mae)}, coverage "
          f"{_fmt(scores.coverage)}; within organ: Spearman {_fmt(scores.within_spearman)}, MAE "
          f"{_fmt(scores.within_mae)}")


def main_score(args):
    import pickle

    from URSAMLib.quality import (FEATURES, OrganOutcome, PairPrediction, cross_validated_pairs,
                                  dice_prediction_scores, fit_from, quality_scores, review_scores, slice_share,
                                  training_set, voxel_auroc)
    from URSAMLib.quality.features import base_error
    from URSAMLib.quality.model import conformal_half_width
    from URSAMLib.quality.report import slice_errors
    from URSAMLib.uncertainty import binary_entropy

    dataset = Path(args.dataset)
    work = Path(args.work)
    calibration = Calibration.load(args.calibration)
    _, _, labels, names = library_inputs(dataset, calibration, args.cache)
    with open(work / "library_cases.pkl", "rb") as f:
        first = pickle.load(f)
    nested = {}
    for s in calibration.supports:
        path = work / f"library_cases_wo_{s}.pkl"
        if path.is_file():
            with open(path, "rb") as f:
                nested[s] = training_set(pickle.load(f), {k: v for k, v in labels.items() if k != s}, names)
    ts = training_set(first, labels, names)
    all_features = tuple(FEATURES) + ("expected_dice_voxel", "organ_mean_dice")
    sets = {k: (fs or all_features, l2o) for k, (fs, l2o) in MODELS.items()}
    report = {"library": {}, "query": {}}
    print(f"library: {len(first)} held-out cases, mean Dice {np.mean([c.dice for c in first]):.3f}; nested sets for "
          f"{len(nested)} supports")

    # -- the library's own cross-validation: which Dice model, and the interval's half-width --------
    library_pairs, half_widths = {}, {}
    for key, (fs, l2o) in sets.items():
        if len(nested) == len(calibration.supports):
            pairs = cross_validated_pairs(first, nested, fs, args.l2, l2o)
        else:  # without the nested sets: each support's residual from a model of the others (first level)
            pairs = []
            for s in ts.supports:
                idx = [i for i, c in enumerate(first) if c.support != s]
                sub = training_set([first[i] for i in idx], {k: v for k, v in labels.items() if k != s}, names)
                m = fit_from(sub, fs, args.l2, l2_organ=l2o)
                pairs += [PairPrediction(s, c.organ, *_pi(m, c), c.dice) for c in first if c.support == s]
        library_pairs[key] = pairs
        half_widths[key] = conformal_half_width([p.true_dice - p.predicted for p in pairs], 0.8,
                                                [p.predicted for p in pairs])
        sc = dice_prediction_scores(pairs)
        report["library"][key] = {**sc.to_json(), "half_width": half_widths[key]}
        print_dice_scores(f"  library CV [{key}] (half-width {half_widths[key]:.3f})", sc)
    chosen = args.features or min(sets, key=lambda k: (round(report["library"][k]["mae"], 3),
                                                      -report["library"][k]["spearman"]))
    print(f"chosen on the library (lowest cross-validated MAE): {chosen}")

    # -- the queries ------------------------------------------------------------------------------
    dumps = sorted((work / "dumps").glob("*.npz"))
    organs = [o for path in dumps for o in query_organs(path)]
    models = {k: fit_from(ts, fs, args.l2, half_widths[k], l2_organ=l2o) for k, (fs, l2o) in sets.items()}
    organ_mean = {n: s.mean_dice for n, s in ts.stats.items()}
    thresholds = {n: s.threshold for n, s in ts.stats.items() if s.threshold is not None}
    pairs = {k: [] for k in sets}
    base = {"organ mean (library)": [], "expected Dice": [], "-mean entropy": []}
    aurocs = {"fused entropy": [], "base error": [], "voxel model": []}
    shares = {"voxel model": [], "base error": [], "oracle (true errors)": []}
    counts = []  # (expected wrong voxels by the voxel model, by the calibrated probability, true wrong voxels)
    outcomes = []  # the chosen model's, as `ursam evaluate` would gather them
    for o in organs:
        ev = o["evidence"]
        for k, m in models.items():
            q = m.assess(ev)
            pairs[k].append(PairPrediction(o["case"], o["name"], q.predicted_dice, q.interval[0], q.interval[1],
                                           o["dice"]))
            if k == chosen:
                shipped = q
        ent = binary_entropy(ev.probability)
        feats = models["expected"].features(ev)
        base["organ mean (library)"].append(PairPrediction(o["case"], o["name"], organ_mean[o["name"]], 0, 1,
                                                           o["dice"]))
        base["expected Dice"].append(PairPrediction(o["case"], o["name"], feats["expected_dice"], 0, 1, o["dice"]))
        base["-mean entropy"].append(PairPrediction(o["case"], o["name"], -float(ent[ev.mask].mean()) if ev.mask.any()
                                                    else 0.0, 0, 1, o["dice"]))
        err_true = o["pred"] != o["truth"]
        shape = err_true.shape
        maps = {"fused entropy": ent, "base error": base_error(ev.probability, ev.mask),
                "voxel model": models[chosen].error_map(ev)}
        for name, values in maps.items():
            aurocs[name].append(voxel_auroc(_full(shape, o["sl"], values), o["pred"], o["truth"], o["spacing"]))
        per_slice_true = err_true[o["sl"][0]].reshape(o["sl"][0].stop - o["sl"][0].start, -1).sum(1)
        total = int(err_true.sum())
        counts.append((float(maps["voxel model"].sum()), float(maps["base error"].sum()), total))
        outcomes.append(OrganOutcome(o["case"], o["name"], shipped.predicted_dice, shipped.interval[0],
                                     shipped.interval[1], o["dice"], slice_errors(shipped.error), per_slice_true,
                                     total, aurocs["voxel model"][-1], shipped.review))
        for name in shares:
            expected = per_slice_true if name.startswith("oracle") else slice_errors(maps[name])
            s10, r10 = slice_share(expected, per_slice_true, total, 0.1)
            s20, r20 = slice_share(expected, per_slice_true, total, 0.2)
            shares[name].append((o["name"], s10, r10, s20, r20))

    print(f"\nqueries: {len(dumps)} scans, {len(organs)} organs, mean true Dice "
          f"{np.mean([o['dice'] for o in organs]):.3f}")
    for k in sets:
        sc = dice_prediction_scores(pairs[k])
        report["query"][k] = sc.to_json()
        print_dice_scores(f"  [{k}]{' (chosen)' if k == chosen else ''}", sc)
    for k, ps in base.items():
        sc = dice_prediction_scores(ps)
        report["query"]["baseline: " + k] = sc.to_json()
        print(f"  baseline {k}: Spearman {_fmt(sc.spearman)}, within organ {_fmt(sc.within_spearman)}"
              + (f", MAE {_fmt(sc.mae)}, within organ {_fmt(sc.within_mae)}" if k != "-mean entropy" else ""))
    sc = dice_prediction_scores(pairs[chosen])
    truth_by_organ = {}
    for p in pairs[chosen]:
        truth_by_organ.setdefault(p.organ, []).append(p.true_dice)
    oracle = [PairPrediction(p.case, p.organ, float(np.mean(truth_by_organ[p.organ])), 0, 1, p.true_dice)
              for p in pairs[chosen]]
    so = dice_prediction_scores(oracle)
    report["query"]["reference: the true mean Dice of each organ over the queries"] = so.to_json()
    print(f"  reference (not a predictor) the queries' own mean Dice per organ: Spearman {_fmt(so.spearman)}, "
          f"MAE {_fmt(so.mae)}")
    print(f"\nper organ [{chosen}] (slices: share of the organ's wrong voxels on its top 10 % / 20 % of ranked "
          "slices, random and best ranking in brackets; AUROC of the voxel error model, entropy's in brackets):")
    org_names = sorted({o["name"] for o in organs}, key=lambda n: [v for v, m in names.items() if m == n][0])
    report["per_organ"] = {}
    for n in org_names:
        q = quality_scores([x for x in outcomes if x.organ == n])
        au0 = np.nanmean([a for a, o in zip(aurocs["fused entropy"], organs) if o["name"] == n])
        bias = np.mean([p.predicted - p.true_dice for p in pairs[chosen] if p.organ == n])
        d, sl_ = q.dice, q.slices
        report["per_organ"][n] = {**q.to_json(), "bias": bias, "auroc_entropy": au0}
        print(f"  {n:10s} n {d.n:2d}  Spearman {_fmt(d.spearman)}  MAE {_fmt(d.mae)}  bias {_fmt(bias)}  "
              f"coverage {_fmt(d.coverage)}  top10% {_fmt(sl_['top10'])} ({_fmt(sl_['random10'])}, "
              f"{_fmt(sl_['oracle10'])})  top20% {_fmt(sl_['top20'])} ({_fmt(sl_['random20'])}, "
              f"{_fmt(sl_['oracle20'])})  AUROC {_fmt(q.auroc)} ({_fmt(au0)})")
    print("\nslices (share of an organ's error voxels on its top ranked slices, mean over case x organ):")
    report["slices"] = {}
    for name, sh in shares.items():
        vals = np.array([x[1:] for x in sh], float)
        m = np.nanmean(vals, 0)
        report["slices"][name] = {"top10": m[0], "random10": m[1], "top20": m[2], "random20": m[3]}
        print(f"  by {name}: top 10 % {m[0]:.3f} (random {m[1]:.3f}), top 20 % {m[2]:.3f} (random {m[3]:.3f})")
    c = np.array(counts)
    report["expected_vs_true_errors"] = {"voxel model": float(c[:, 0].sum() / c[:, 2].sum()),
                                         "base error": float(c[:, 1].sum() / c[:, 2].sum())}
    print(f"expected / true wrong voxels, all organs: voxel model {c[:, 0].sum() / c[:, 2].sum():.3f}, "
          f"calibrated probability {c[:, 1].sum() / c[:, 2].sum():.3f}")
    print("voxel AUROC for the error voxels (organ's neighbourhood, mean over case x organ):")
    report["auroc"] = {}
    for name, vals in aurocs.items():
        report["auroc"][name] = float(np.nanmean(vals))
        print(f"  {name}: {np.nanmean(vals):.3f}")
    rv = review_scores(pairs[chosen], thresholds)
    report["review"] = {"thresholds": thresholds, **rv}
    print(f"review ('check' below the library's mean held-out Dice of the organ {thresholds}): {rv}")
    for t in (0.6, 0.7):
        rv = review_scores(pairs[chosen], {n: t for n in thresholds})
        report[f"review at {t}"] = rv
        print(f"review at a user threshold of {t}: {rv}")
    report["chosen"] = chosen
    final = quality_scores(outcomes, thresholds)
    report["shipped"] = final.to_json()
    d = final.dice
    print(f"\nAIMS [{chosen}, fitted on the library alone; {d.n} query organs]:\n"
          f"  Spearman predicted vs true Dice: pooled {d.spearman:.3f} (aim >= 0.7), within organ "
          f"{d.within_spearman:.3f} (aim >= 0.4)\n"
          f"  MAE: pooled {d.mae:.3f}, within organ {d.within_mae:.3f} (aim <= 0.06)\n"
          f"  80 % interval holds the true Dice: {d.coverage:.3f} (aim >= 0.75)\n"
          f"  top 20 % of ranked slices hold {final.slices['top20']:.3f} of the wrong voxels (aim >= 0.5; random "
          f"{final.slices['random20']:.3f}, best possible {final.slices['oracle20']:.3f}); top 10 %: "
          f"{final.slices['top10']:.3f} (random {final.slices['random10']:.3f}, best {final.slices['oracle10']:.3f})\n"
          f"  voxel AUROC of the error probability: {final.auroc:.3f} (aim >= 0.88; fused entropy "
          f"{np.nanmean(aurocs['fused entropy']):.3f})\n"
          f"  the result's Dice: unchanged (the estimate only reads the result)")
    with open(work / "quality_scores.json", "w") as f:
        json.dump(report, f, indent=1, default=float)


def _pi(model, case):
    q = model.assess(case.evidence)
    return q.predicted_dice, q.interval[0], q.interval[1]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="step", required=True)
    d = sub.add_parser("dump", help="run each query once and dump what the quality estimate needs")
    d.add_argument("dataset")
    d.add_argument("--calibration", required=True)
    d.add_argument("--work", default="/tmp/q")
    d.add_argument("--cases", help="comma-separated query ids (default: every query)")
    d.set_defaults(func=main_dump)
    b = sub.add_parser("library", help="the library's leave-one-out runs fused without their own support")
    b.add_argument("dataset")
    b.add_argument("--calibration", required=True)
    b.add_argument("--work", default="/tmp/q")
    b.add_argument("--cache", help="the calibration's cache folder (default: found by its supports)")
    b.add_argument("--first-only", action="store_true",
                   help="only the cases the final model is fitted on, not the nested ones of its interval")
    b.set_defaults(func=main_library)
    c = sub.add_parser("score", help="fit on the library, predict the dumped queries, print the figures")
    c.add_argument("dataset")
    c.add_argument("--calibration", required=True)
    c.add_argument("--work", default="/tmp/q")
    c.add_argument("--cache", help="the calibration's cache folder (default: found by its supports)")
    c.add_argument("--features", choices=list(MODELS), help="the Dice model's features (default: the "
                   "set with the lowest cross-validated MAE on the library)")
    c.add_argument("--l2", type=float, default=1.0, help="the Dice model's ridge (default 1)")
    c.set_defaults(func=main_score)
    args = p.parse_args()
    args.func(args)


if __name__ == "__main__":
    main()
