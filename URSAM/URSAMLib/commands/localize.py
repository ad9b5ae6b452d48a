"""``ursam localize``: organ boxes of a CT from a template library, no SAM."""
from __future__ import annotations

from ..boxes import save_boxes
from ..progress import Progress
from .options import add_localizer_options, add_prompt_options, localizer_options


def add_parser(sub):
    p = sub.add_parser("localize", help="find organ boxes in a CT from a template library",
                       description="Register each support scan of a template library to the CT, carry each "
                                   "organ's extreme points across, fuse them (median) and write the 3D boxes "
                                   "as a box file for `ursam segment --boxes`.")
    p.add_argument("image", help="CT: NIfTI, NRRD, MHA, or a DICOM series folder")
    p.add_argument("--out", required=True, help="box file to write (JSON)")
    p.add_argument("--quiet", action="store_true", help="no progress messages")
    add_localizer_options(p, required=True)
    add_prompt_options(p)
    p.set_defaults(func=main, n_aug=None)
    return p


def main(args):
    from dataclasses import replace

    from ..imageio import read_image
    from ..localization import DEFAULT_MARGIN, parse_margin
    from ..prompt_modes import PromptOptions, default_mode, make_prompts
    from ..registration.deformable import DeformableOptions
    from ..settings import Settings
    from ..scan import localize_scan

    progress = Progress(quiet=args.quiet)
    mode = args.prompts or default_mode(args.localizer)
    settings = Settings(prompts=PromptOptions(mode=mode, zoom=args.zoom),
                        deformable=DeformableOptions(method=args.deformable),
                        margin=parse_margin(args.margin) if args.margin else DEFAULT_MARGIN,
                        localizer=args.localizer).check()
    localization = localize_scan(args.image, args.templates, settings, args.organs, localizer_options(args),
                                 progress)
    boxes = localization.boxes
    extra = {"localization": localization.info}
    if mode != "box3d":
        # The box file carries the warped prior's box on each slice; `ursam segment --prompts slice`
        # uses them as they are, `--prompts propagate` as its fallback.
        reference = read_image(args.image, "image")
        priors, info = localization.priors(reference, settings.deformable, progress)
        slice_opts = replace(settings.prompts, mode="slice")
        boxes, _ = make_prompts(boxes, priors, slice_opts, reference.GetSize())
        extra["prompts"] = {"mode": "slice", "options": slice_opts.to_json(), **info}
    save_boxes(boxes, args.out, extra=extra)
    if not args.quiet:
        info = localization.info
        secs = info.get("registration_seconds", {})
        per = f", {max(secs.values()):.1f} s per support at most" if secs else ""
        print(f"wrote {len(boxes)} boxes to {args.out} ({info.get('seconds', 0):.1f} s{per})")
    return 0
