"""``ursam correct``: a box on one slice corrects one organ of a result there and on the slices around it."""
from __future__ import annotations

from ..correction import CorrectionOptions
from ..correction_files import correct_result, undo_last
from ..errors import URSAMError
from ..progress import Progress
from ..sam import ENCODER_PATHS


def parse_box(text, where=None):
    """``X0,Y0,X1,Y1`` as four whole numbers; URSAMError (one line, naming the result folder) otherwise."""
    try:
        values = [int(v) for v in str(text).split(",")]
    except ValueError:
        values = []
    if len(values) != 4:
        raise URSAMError(f"--box must be four whole numbers X0,Y0,X1,Y1, got {text!r}", where)
    return values


def add_parser(sub):
    defaults = CorrectionOptions()
    p = sub.add_parser(
        "correct", help="correct one organ of a result from a box on one slice (or undo the last correction)",
        description="SAM segments the organ on slice K from the box, then carries the new mask to the slices "
                    "around it, each prompted from the mask just made, until the new mask agrees with the "
                    "result, the organ ends, SAM is unsure where it disagrees, or the slice limit. Only the "
                    "organ changes; other organs keep their voxels. Slice and box are the input file's voxel "
                    "indices (slice K along its third axis, as in box files). The model is the one report.json "
                    "names. The folder is rewritten atomically; --undo restores it as it was before the last "
                    "correction.")
    p.add_argument("result", metavar="RESULT_DIR", help="a folder ursam segment wrote")
    p.add_argument("--organ", help="the organ to correct (its name or label value)")
    p.add_argument("--slice", type=int, metavar="K", help="the slice of the box (the file's third axis)")
    what = p.add_mutually_exclusive_group()
    what.add_argument("--box", metavar="X0,Y0,X1,Y1", help="the organ's box on slice K (inclusive voxels)")
    what.add_argument("--remove", action="store_true", help="remove the organ from slice K")
    what.add_argument("--undo", action="store_true", help="undo the last correction")
    p.add_argument("--no-propagate", action="store_true", help="correct slice K only")
    p.add_argument("--max-slices", type=int, default=defaults.max_slices, metavar="N",
                   help=f"visit at most N slices on each side of K (default {defaults.max_slices})")
    p.add_argument("--take-others", action="store_true",
                   help="the organ may take voxels other organs hold (by default they stay theirs)")
    p.add_argument("--image", help="the input CT, where it is no longer where report.json says")
    g = p.add_argument_group("SAM model (default: the one report.json names)")
    g.add_argument("--device", default=None, help="auto, cpu or cuda (default: auto)")
    g.add_argument("--encoder", default=None, choices=["auto", "eager"] + list(ENCODER_PATHS),
                   help="image encoder path (default: auto)")
    g.add_argument("--checkpoint", help="the checkpoint of a sam-vit-* or medsam result, where it has moved")
    p.add_argument("--quiet", action="store_true", help="print nothing but errors")
    p.set_defaults(func=main)
    return p


def main(args):
    if args.undo:
        if args.organ or args.slice is not None or args.box or args.remove:
            raise URSAMError("--undo takes no --organ, --slice, --box or --remove", args.result)
        record = undo_last(args.result)
        if not args.quiet:
            print(f"undid the correction of {record['organ']} on slice {record['slice']} "
                  f"({len(record['slices_changed'])} slices restored) in {args.result}")
        return 0
    if not args.organ or args.slice is None or not (args.box or args.remove):
        raise URSAMError("ursam correct needs --organ NAME --slice K and --box X0,Y0,X1,Y1 or --remove "
                         "(or --undo)", args.result)
    options = CorrectionOptions(propagate=not args.no_propagate, max_slices=args.max_slices,
                                take_others=args.take_others).check()
    model = {"device": args.device, "encoder": args.encoder, "checkpoint": args.checkpoint}
    box = None if args.remove else parse_box(args.box, args.result)
    record = correct_result(args.result, args.organ, args.slice, box, args.remove, options,
                            image=args.image, model=model, progress=Progress(quiet=args.quiet))
    if not args.quiet:
        stops = "; ".join(f"{d}: {s['why']}" for d, s in record.stops.items())
        print(f"corrected {record.organ} in {args.result}: slices {record.slices_changed or 'none'} changed "
              f"(+{record.voxels_added} / -{record.voxels_removed} voxels) in {record.seconds:.1f} s ({stops})")
    return 0
