"""The cohort summary of ``ursam batch``: summary.csv, failed.csv and summary.md, from each scan's report.json.

Every figure is read from the report.json that the scan's run wrote (the
volumes as they are there), so the summary and the scans' folders cannot
disagree. The files are rewritten atomically as scans finish.
"""
from __future__ import annotations

import csv
import io
import math

from ..atomic import atomic_write_text

SUMMARY_FILES = ("summary.csv", "failed.csv", "summary.md")
#: one row per scan and organ (a failed scan: one row, its status)
COLUMNS = ("id", "organ", "label", "status", "volume_ml", "predicted_dice", "dice_low", "dice_high", "review",
           "mean_uncertainty", "flagged_ml", "flagged_share", "dice", "seconds")
FAILED_COLUMNS = ("id", "image", "error")
#: rows of summary.md's table of scans to review first (summary.csv has them all)
REVIEW_ROWS = 50
#: the report timings that add up to a scan's own seconds (loading the model is the worker's, once)
SCAN_TIMINGS = ("read_seconds", "localize_seconds", "total_seconds", "write_seconds")


def rows_from_report(scan_id, report, status):
    """summary.csv's rows of one scan from its report.json: one per organ, and one per organ that the
    localizer could not place (status ``not localized``)."""
    sx, sy, sz = report["image"]["spacing_xyz"]
    voxel_ml = sx * sy * sz / 1000.0
    timings = report.get("timings_seconds", {})
    seconds = round(sum(float(timings.get(k) or 0.0) for k in SCAN_TIMINGS), 2)
    method = report.get("rectified_method", {}).get("name")
    dice = (report.get("dice_vs_reference") or {}).get(method, {})
    rows = []
    for organ in report.get("organs", []):
        flagged = organ["flagged_voxels"]
        u = organ.get("mean_uncertainty_in_box")
        quality = organ.get("quality") or {}
        low, high = quality.get("interval") or (None, None)
        rows.append({"id": scan_id, "organ": organ["name"], "label": organ["label"], "status": status,
                     "volume_ml": organ["rectified_ml"],
                     "predicted_dice": _rounded(quality.get("predicted_dice")), "dice_low": _rounded(low),
                     "dice_high": _rounded(high), "review": quality.get("review"),
                     "mean_uncertainty": None if u is None else round(u, 6),
                     "flagged_ml": round(flagged * voxel_ml, 3),
                     "flagged_share": None if organ.get("flagged_fraction") is None
                     else round(organ["flagged_fraction"], 4),
                     "flagged_or_rectified_ml": (organ.get("flagged_or_rectified_voxels") or 0) * voxel_ml,
                     "dice": None if dice.get(organ["name"]) is None else round(dice[organ["name"]], 4),
                     "seconds": seconds})
    skipped = report.get("inputs", {}).get("localization", {}).get("skipped", {})
    for name in skipped:
        rows.append({"id": scan_id, "organ": name, "status": "not localized", "seconds": seconds})
    return rows


def _rounded(v, digits=4):
    return None if v is None else round(float(v), digits)


def _value(v):
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return ""
    return repr(v) if isinstance(v, float) else v


def _csv(rows, columns):
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(columns), extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: _value(r.get(k)) for k in columns})
    return buf.getvalue()


def _mean(values):
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def scan_figures(scan_rows):
    """One scan's totals: volume, flagged volume, flagged share (flagged over flagged-or-segmented volume, all
    organs together), mean uncertainty and Dice; its worst organ (the lowest predicted Dice) and the organs
    the quality estimate says to check."""
    organs = [r for r in scan_rows if r["status"] != "not localized"]
    predicted = [r for r in organs if r.get("predicted_dice") is not None]
    worst = min(predicted, key=lambda r: (r["predicted_dice"], r["organ"])) if predicted else None
    volume = sum(r["volume_ml"] for r in organs)
    flagged = sum(r["flagged_ml"] for r in organs)
    union = sum(r["flagged_or_rectified_ml"] for r in organs)
    return {"organs": len(organs), "volume_ml": volume, "flagged_ml": flagged,
            "flagged_share": flagged / union if union else 0.0,
            "mean_uncertainty": _mean([r["mean_uncertainty"] for r in organs]),
            "dice": _mean([r.get("dice") for r in organs]), "seconds": organs[0]["seconds"] if organs else None,
            "not_localized": [r["organ"] for r in scan_rows if r["status"] == "not localized"],
            "worst_organ": worst["organ"] if worst else None,
            "worst_predicted_dice": worst["predicted_dice"] if worst else None,
            "to_check": [r["organ"] for r in organs if r.get("review") == "check"]}


def review_order(figures):
    """Scan ids, the one to open first first: by its worst organ's predicted Dice, lowest first (a
    scan that has no quality estimate after those that have, by flagged share), then by id."""
    def key(i):
        f = figures[i]
        worst = f["worst_predicted_dice"]
        return (worst is None, worst if worst is not None else -f["flagged_share"], i)
    return sorted(figures, key=key)


def _f(v, digits=3):
    if v is None:
        return "–"
    if isinstance(v, float) and math.isinf(v):
        return "inf"
    return f"{v:.{digits}f}"


def _cell(text):
    return str(text).replace("|", "\\|").replace("\n", " ")


def markdown(order, rows, failed, header):
    done = [i for i in order if i in rows]
    before = sum(1 for i in done if rows[i] and rows[i][0]["status"] == "done before")
    lines = ["# URSAM batch summary", ""]
    if header.get("input"):
        lines += [f"Input: `{header['input']}`; backend {header.get('backend', '')}; settings hash "
                  f"`{header.get('settings_hash', '')[:16]}`.", ""]
    pending = len(order) - len(done) - len([i for i in order if i in failed])
    lines += [f"{len(order)} scans: {len(done)} finished ({before} in earlier runs), {len(failed)} failed"
              + (f", {pending} not finished yet" if pending else "") + ".", ""]
    figures = {i: scan_figures(rows[i]) for i in done}
    ranked = review_order(figures)
    lines += ["## Scans to review first", "",
              "Worst organ first: the scan whose lowest predicted Dice is lowest opens the list (scans without a "
              "quality estimate follow, highest flagged share first; the flagged share is the volume flagged as "
              "uncertain over the volume flagged or segmented). The first "
              f"{REVIEW_ROWS}; summary.csv has every scan and organ.",
              "", "| scan | worst organ | its predicted Dice | organs to check | organs | volume ml | flagged share | "
              "Dice | seconds | not localized |", "|---|---|---|---|---|---|---|---|---|---|"]
    for i in ranked[:REVIEW_ROWS]:
        f = figures[i]
        lines.append(f"| {_cell(i)} | {_cell(f['worst_organ'] or '–')} | {_f(f['worst_predicted_dice'])} | "
                     f"{_cell(', '.join(f['to_check']))} | {f['organs']} | {_f(f['volume_ml'], 1)} | "
                     f"{_f(f['flagged_share'])} | {_f(f['dice'])} | "
                     f"{_f(f['seconds'], 1)} | {_cell(', '.join(f['not_localized']))} |")
    organs = {}
    for i in done:
        for r in rows[i]:
            organs.setdefault(r["organ"], []).append(r)
    if organs:
        lines += ["", "## Organs", "", "| organ | scans | mean predicted Dice | to check | mean volume ml | "
                  "mean flagged share | mean Dice | not localized |", "|---|---|---|---|---|---|---|---|"]
        for name, rs in organs.items():
            seg = [r for r in rs if r["status"] != "not localized"]
            lines.append(f"| {_cell(name)} | {len(seg)} | {_f(_mean([r.get('predicted_dice') for r in seg]))} | "
                         f"{sum(r.get('review') == 'check' for r in seg)} | "
                         f"{_f(_mean([r['volume_ml'] for r in seg]), 1)} | "
                         f"{_f(_mean([r['flagged_share'] for r in seg]))} | {_f(_mean([r.get('dice') for r in seg]))} | "
                         f"{len(rs) - len(seg)} |")
    if failed:
        lines += ["", "## Failed", "", "| scan | error |", "|---|---|"]
        lines += [f"| {_cell(i)} | {_cell(failed[i]['error'])} |" for i in order if i in failed]
    return "\n".join(lines) + "\n"


def write_summaries(out, order, rows, failed, header):
    """summary.csv, failed.csv and summary.md in ``out``, each written whole (atomically)."""
    table = []
    for i in order:
        if i in rows:
            table += rows[i]
        elif i in failed:
            table.append({"id": i, "status": "failed"})
        else:
            table.append({"id": i, "status": "not finished"})
    atomic_write_text(out / "summary.csv", _csv(table, COLUMNS))
    atomic_write_text(out / "failed.csv", _csv([failed[i] for i in order if i in failed], FAILED_COLUMNS))
    atomic_write_text(out / "summary.md", markdown(order, rows, failed, header))
