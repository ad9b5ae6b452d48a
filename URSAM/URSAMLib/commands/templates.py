"""``ursam templates``: build and check a template library of labelled support scans."""
from __future__ import annotations

from pathlib import Path

from ..boxes import read_names
from ..calibrate import MAX_QUERIES, calibrate
from ..calibration.file import CANDIDATE_MODES, find_calibration
from ..errors import URSAMError
from ..fusion import DEFAULT_REVIEW_BUDGET
from ..imageio import read_seg_nrrd_as_labelmap
from ..progress import Progress
from ..prompt_modes import parse_modes
from ..templates import Library
from .options import (
    add_method_options,
    add_prompt_options,
    add_sam_options,
    backend_options_from_args,
    settings_from_args,
)


def add_parser(sub):
    p = sub.add_parser("templates", help="add scans to a template library, or check one",
                       description="A template library is a folder: dataset.json (organ names, support case "
                                   "ids) and cases/<id>/image.nii.gz + labels.nii.gz (or labels.seg.nrrd).")
    tsub = p.add_subparsers(dest="templates_command", metavar="ACTION")
    tsub.required = True
    a = tsub.add_parser("add", help="add labelled CTs to a library (created if missing)",
                        description="Copy a CT and its label map (--image, --labels), or every labelled case of a "
                                    "dataset folder (--from), into the library as new support scans. Label values "
                                    "are matched to the library's organs by name; a scan may label any of them.")
    a.add_argument("library", metavar="LIB", help="library folder")
    one = a.add_mutually_exclusive_group(required=True)
    one.add_argument("--image", help="CT: NIfTI, NRRD, MHA or a DICOM folder")
    one.add_argument("--from", dest="source", metavar="FOLDER",
                     help="a dataset folder (dataset.json naming the labels, cases/<id>/image.* and labels.*): "
                          "each of its cases with a label map is added")
    a.add_argument("--labels", help="with --image: label map on the CT's grid, or a Slicer .seg.nrrd")
    a.add_argument("--cases", help="with --from: comma-separated case ids (default: every case with a label map)")
    a.add_argument("--names", help="dataset.json (or JSON map) naming the label values "
                                   "(not needed for .seg.nrrd, or when the values are the library's)")
    a.add_argument("--id", dest="case_id", help="case id (default: from the image file name)")
    a.set_defaults(func=main_add)
    c = tsub.add_parser("check", help="validate a library and list its organs and scans")
    c.add_argument("library", metavar="LIB", help="library folder")
    c.add_argument("--organs", help="comma-separated organs that must be labelled in some scan")
    c.add_argument("--calibration", metavar="FILE",
                   help="show this calibration file (default: the library's calibration.json, if any)")
    c.set_defaults(func=main_check)
    k = tsub.add_parser(
        "calibrate", help="fit the atlas-SAM fusion on the library itself (leave one out)",
        description="Segment each support scan with the other supports as its templates, then fit per organ "
                    "the fusion of SAM's ensemble and the warped support labels (sources, weights, prompt mode, "
                    "temperature, threshold, rectification, flagging threshold), the number of best-fitting "
                    "supports that vote per organ, and the quality estimate (predicted Dice, review thresholds). "
                    "Writes calibration.json into the library (or --out); `ursam segment`, `evaluate` and the "
                    "Slicer module use it. Resumable: what each support's runs computed is kept in the user's "
                    "cache folder (~/.cache/ursam, or $URSAM_CACHE).")
    k.add_argument("library", metavar="LIB", help="library folder (at least 3 support scans)")
    k.add_argument("--out", metavar="FILE", help="where to write the calibration (default: LIB/calibration.json; "
                                                 "give it for a library you cannot write)")
    k.add_argument("--modes", default=",".join(CANDIDATE_MODES),
                   help=f"prompt modes to choose from per organ (default {','.join(CANDIDATE_MODES)})")
    k.add_argument("--budget", type=float, default=DEFAULT_REVIEW_BUDGET,
                   help="review budget: flagged voxels at most this fraction of an organ's segmented volume "
                        f"(default {DEFAULT_REVIEW_BUDGET})")
    k.add_argument("--max-queries", type=int, default=MAX_QUERIES, metavar="N",
                   help="a larger library is calibrated on N of its supports, chosen (seeded by --seed) so that "
                        f"each organ is in several of them (default {MAX_QUERIES})")
    k.add_argument("--max-minutes", type=float, default=None, metavar="M",
                   help="start no new leave-one-out run after M minutes; the fit takes the runs done, and a "
                        "rerun resumes (default: no bound)")
    k.add_argument("--quiet", action="store_true", help="no progress messages")
    add_sam_options(k)
    add_method_options(k)
    add_prompt_options(k)
    k.set_defaults(func=main_calibrate, localizer="registration", margin=None)
    return p


def main_calibrate(args):
    progress = Progress(quiet=args.quiet)
    lib = Library(args.library)
    modes = parse_modes(args.modes)
    settings = settings_from_args(args, mode=args.prompts or modes[0])
    backend = backend_options_from_args(args).make()
    if args.max_queries < 3:
        raise URSAMError(f"--max-queries must be at least 3, got {args.max_queries}")
    calibration = calibrate(lib, backend, settings, progress, out=args.out, modes=modes, budget=args.budget,
                            max_queries=args.max_queries, max_minutes=args.max_minutes, seed=args.seed)
    print(format_calibration(calibration))
    print(f"wrote {calibration.path} ({calibration.seconds:.0f} s)")
    return 0


def format_calibration(calibration):
    """The calibration as the user reads it: per organ the chosen model and its leave-one-out Dice."""
    lines = [f"calibration {calibration.path}: {len(calibration.supports)} supports "
             f"({', '.join(calibration.supports)}), review budget {calibration.budget:g}",
             "| organ | mode | sources (weights) | T | threshold | rectification | LOO Dice: atlas vote "
             "| atlas (local, 0.5) | SAM ensemble | UR-SAM + atlas prior | fusion | fusion (cross-validated) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, m in calibration.organs.items():
        d = calibration.loo_dice.get(name, {})
        weights = ", ".join(f"{k} {v:.2f}" for k, v in m.weights.items() if v) + f"; bias {m.bias:.2f}"
        rect = "none" if not m.rectify else f"{m.rectify.get('lower')}, alpha_h {m.rectify.get('alpha_h')}"
        cells = [d.get(k) for k in ("atlas vote", "atlas_lw (0.5)", "ensemble", "ursam+atlas", "fusion",
                                    "fusion (cross-validated)")]
        lines.append(f"| {name} | {m.sam_mode} | {weights} | {m.temperature:.2f} | {m.threshold:.2f} | {rect} | "
                     + " | ".join("–" if v is None else f"{v:.3f}" for v in cells) + " |")
    return "\n".join(lines)


def main_add(args):
    if args.image and not args.labels:
        raise URSAMError("--image needs --labels (the scan's label map)")
    if args.source:
        source = Library(args.source, role=None)
        names = dict(source.names)
    else:
        names = read_names(args.names) if args.names else None
    lib_path = Path(args.library)
    if (lib_path / "dataset.json").exists():
        lib = Library(lib_path)
    else:
        if lib_path.exists() and (not lib_path.is_dir() or any(lib_path.iterdir())):
            raise URSAMError("folder exists, is not empty and holds no dataset.json; not a template library",
                             lib_path)
        if names is None and not str(args.labels or "").endswith(".seg.nrrd"):
            raise URSAMError("a new library needs the organ names: give --names dataset.json", args.labels)
        if names is None:
            names = _segment_names(args.labels)
        lib = Library.create(lib_path, names)
    if args.source:
        wanted = [c.strip() for c in args.cases.split(",") if c.strip()] if args.cases else None
        added = lib.add_folder(source, wanted)
        print(f"added {len(added)} scans to {lib.path}: " + "; ".join(
            f"{case_id} ({', '.join(organs.values())})" for case_id, organs in added))
        return 0
    case_id, organs = lib.add(args.image, args.labels, case_id=args.case_id, names=names)
    print(f"added {case_id} to {lib.path} with {len(organs)} organs: {', '.join(organs.values())}")
    return 0


def _segment_names(path):
    image = read_seg_nrrd_as_labelmap(path)
    return {int(s["labelValue"]): str(s.get("name") or f"label_{s['labelValue']}") for s in image.segments}


def main_check(args):
    lib = Library(args.library)
    report = lib.check(organs=args.organs, progress=None)
    print(f"template library {lib.path}: {len(report['scans'])} support scans, {len(report['organs'])} organs")
    width = max(len(n) for n in report["organs"])
    for name, n in report["organs"].items():
        flag = "" if n else "   (labelled in no scan)"
        print(f"  {name:<{width}}  in {n} of {len(report['scans'])} scans{flag}")
    for scan in report["scans"]:
        size = "x".join(str(s) for s in scan["size"])
        spacing = "x".join(f"{s:g}" for s in scan["spacing"])
        print(f"  scan {scan['id']}: {size} voxels at {spacing} mm, {len(scan['organs'])} organs: "
              + ", ".join(scan["organs"]))
    progress = Progress(quiet=True)
    progress.warn = lambda message: print(f"  {message}")
    calibration = find_calibration(lib, args.calibration, progress)
    if calibration is not None:
        print(format_calibration(calibration))
    return 0
