"""``ursam localize``: organ boxes of a CT from a template library, no SAM."""
from ..boxes import save_boxes
from ..errors import URSAMError
from ..progress import Progress


TEMPLATES_HELP = "template library: dataset.json + cases/<id>/image.* and labels.*"


def add_localizer_options(p, templates=True, margin=True, required=False):
    """Template library options shared by localize, segment and evaluate.

    ``templates=False`` leaves out --templates (segment puts it beside --boxes;
    evaluate names its supports otherwise); ``margin=False`` leaves out
    --box-margin (segment has its own --margin).
    """
    from ..localize import LOCALIZERS

    g = p.add_argument_group("auto-localization (METHOD.md §1)")
    if templates:
        g.add_argument("--templates", metavar="LIB", required=required, help=TEMPLATES_HELP)
    g.add_argument("--organs", help="comma-separated organ names or label values (default: all of the library)")
    g.add_argument("--localizer", default="registration", choices=sorted(LOCALIZERS),
                   help="how supports are matched to the query (default: registration)")
    if margin:
        g.add_argument("--box-margin", default="2,10", metavar="Z,XY",
                       help="margin added to localized boxes: Z slices, XY px of SAM's 1024 grid "
                            "(default 2,10, METHOD.md §1)")
    g.add_argument("--workers", type=int, default=None,
                   help="support scans registered at once (default: one per core)")
    g.add_argument("--deformable", action="store_true",
                   help="add a B-spline stage after the affine registration (slower)")
    g.add_argument("--localizer-checkpoint", metavar="PATH",
                   help="MedLAM checkpoint for --localizer medlam (from `ursam train-localizer`)")
    g.add_argument("--localizer-device", default="auto",
                   help="device of the MedLAM network: auto, cpu or cuda (default: auto)")


def parse_pair(text, option):
    try:
        z, xy = (float(v) for v in str(text).split(","))
    except ValueError:
        raise URSAMError(f"{option} must be Z,XY (two numbers), got {text!r}") from None
    if z < 0 or xy < 0:
        raise URSAMError(f"{option} must not be negative, got {text!r}")
    return int(round(z)), xy


def localizer_options(args, margin=None):
    """Keyword options of :func:`URSAMLib.localize.localize` from parsed arguments."""
    opts = {"margin": margin if margin is not None else parse_pair(args.box_margin, "--box-margin")}
    if args.localizer == "registration":
        if args.workers is not None:
            if args.workers < 1:
                raise URSAMError(f"--workers must be at least 1, got {args.workers}")
            opts["workers"] = args.workers
        if args.deformable:
            opts["deformable"] = True
    if args.localizer == "medlam":
        if not args.localizer_checkpoint:
            raise URSAMError("--localizer medlam needs --localizer-checkpoint PATH "
                             "(train one with `ursam train-localizer`)")
        opts["checkpoint"] = args.localizer_checkpoint
        opts["device"] = args.localizer_device
    return opts


def add_parser(sub):
    p = sub.add_parser("localize", help="find organ boxes in a CT from a template library",
                       description="Register each support scan of a template library to the CT, carry each "
                                   "organ's extreme points across, fuse them (median) and write the 3D boxes "
                                   "as a box file for `ursam segment --boxes`.")
    p.add_argument("image", help="CT: NIfTI, NRRD, MHA, or a DICOM series folder")
    p.add_argument("--out", required=True, help="box file to write (JSON)")
    p.add_argument("--quiet", action="store_true", help="no progress messages")
    add_localizer_options(p, required=True)
    from .segment import add_prompt_options

    add_prompt_options(p)
    p.set_defaults(func=main)
    return p


def main(args):
    from ..localize import localize
    from ..prompts import default_mode

    progress = Progress(quiet=args.quiet)
    mode = args.prompts or default_mode(args.localizer)
    per_slice = mode != "box3d"
    if per_slice and args.localizer != "registration":
        raise URSAMError(f"--prompts {mode} needs --localizer registration (the warped support labels)")
    boxes, info = localize(args.image, args.templates, organs=args.organs, method=args.localizer,
                           progress=progress, keep_transforms=per_slice, **localizer_options(args))
    if not boxes:
        raise URSAMError("no organ could be localized", args.image)
    extra = {"localization": info}
    if per_slice:
        # The box file carries the warped prior's box on each slice; `ursam segment --prompts slice`
        # uses them as they are, `--prompts propagate` as its fallback.
        from dataclasses import replace
        from ..imageio import read_image
        from ..prompts import prompts_from_registrations
        from ..templates import Library
        from .segment import prompt_options

        popts, dopts = prompt_options(args)
        reference = read_image(args.image, "image")
        boxes, _, extra["prompts"], _ = prompts_from_registrations(
            reference, boxes, info.pop("registrations"), Library(args.templates), replace(popts, mode="slice"),
            dopts, query=args.image, progress=progress)
    save_boxes(boxes, args.out, extra=extra)
    if not args.quiet:
        secs = info.get("registration_seconds", {})
        per = f", {max(secs.values()):.1f} s per support at most" if secs else ""
        print(f"wrote {len(boxes)} boxes to {args.out} ({info.get('seconds', 0):.1f} s{per})")
    return 0
