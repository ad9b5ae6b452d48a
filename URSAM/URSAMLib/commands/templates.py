"""``ursam templates``: build and check a template library of labelled support scans."""
from __future__ import annotations

from ..boxes import read_names
from ..errors import URSAMError


def add_parser(sub):
    p = sub.add_parser("templates", help="add scans to a template library, or check one",
                       description="A template library is a folder: dataset.json (organ names, support case "
                                   "ids) and cases/<id>/image.nii.gz + labels.nii.gz (or labels.seg.nrrd).")
    tsub = p.add_subparsers(dest="templates_command", metavar="ACTION")
    tsub.required = True
    a = tsub.add_parser("add", help="add a labelled CT to a library (created if missing)",
                        description="Copy a CT and its label map into the library as a new support scan. "
                                    "Label values are matched to the library's organs by name.")
    a.add_argument("library", metavar="LIB", help="library folder")
    a.add_argument("--image", required=True, help="CT: NIfTI, NRRD, MHA or a DICOM folder")
    a.add_argument("--labels", required=True, help="label map on the CT's grid, or a Slicer .seg.nrrd")
    a.add_argument("--names", help="dataset.json (or JSON map) naming the label values "
                                   "(not needed for .seg.nrrd, or when the values are the library's)")
    a.add_argument("--id", dest="case_id", help="case id (default: from the image file name)")
    a.set_defaults(func=main_add)
    c = tsub.add_parser("check", help="validate a library and list its organs and scans")
    c.add_argument("library", metavar="LIB", help="library folder")
    c.add_argument("--organs", help="comma-separated organs that must be labelled in some scan")
    c.set_defaults(func=main_check)
    return p


def main_add(args):
    from pathlib import Path

    from ..templates import Library

    names = read_names(args.names) if args.names else None
    lib_path = Path(args.library)
    if (lib_path / "dataset.json").exists():
        lib = Library(lib_path)
    else:
        if lib_path.exists() and (not lib_path.is_dir() or any(lib_path.iterdir())):
            raise URSAMError("folder exists, is not empty and holds no dataset.json; not a template library",
                             lib_path)
        if names is None and not str(args.labels).endswith(".seg.nrrd"):
            raise URSAMError("a new library needs the organ names: give --names dataset.json", args.labels)
        if names is None:
            names = _segment_names(args.labels)
        lib = Library.create(lib_path, names)
    case_id, organs = lib.add(args.image, args.labels, case_id=args.case_id, names=names)
    print(f"added {case_id} to {lib.path} with {len(organs)} organs: {', '.join(organs.values())}")
    return 0


def _segment_names(path):
    from ..imageio import read_seg_nrrd_as_labelmap

    image = read_seg_nrrd_as_labelmap(path)
    return {int(s["labelValue"]): str(s.get("name") or f"label_{s['labelValue']}") for s in image.segments}


def main_check(args):
    from ..templates import Library

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
        print(f"  scan {scan['id']}: {size} voxels at {spacing} mm, {len(scan['organs'])} organs")
    return 0
