"""``ursam localize``: organ boxes of a CT from a template library, no SAM."""
from __future__ import annotations

from dataclasses import replace

from ..boxes import save_boxes
from ..localization import parse_margin
from ..localizers import LibrarySource
from ..progress import Progress
from ..prompt_modes import PromptOptions, default_mode, prompt_set
from ..registration.deformable import DeformableOptions
from ..runner import ScanJob, run_scan
from ..settings import Settings
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
    progress = Progress(quiet=args.quiet)
    mode = args.prompts or default_mode(args.localizer)
    settings = Settings(prompts=PromptOptions(mode=mode, zoom=args.zoom),
                        deformable=DeformableOptions(method=args.deformable),
                        margin=parse_margin(args.margin) if args.margin else None, localizer=args.localizer)
    job = ScanJob(args.image, LibrarySource(args.templates, args.organs, localizer_options(args)), settings,
                  stop_after="localize" if mode == "box3d" else "warp")
    outcome = run_scan(job, None, progress)
    localization = outcome.localization
    boxes = localization.boxes
    extra = {"localization": localization.info}
    if outcome.warped is not None:
        # The box file carries the warped prior's box on each slice; `ursam segment --prompts slice`
        # uses them as they are, `--prompts propagate` as its fallback.
        canonical = outcome.canonical
        slices = prompt_set([canonical.box_to_canonical(b) for b in boxes], outcome.warped,
                            replace(outcome.settings.prompts, mode="slice"), canonical.reference.GetSize())
        boxes = [canonical.box_to_input(b) for b in slices.boxes]
        extra["prompts"] = slices.info
    save_boxes(boxes, args.out, extra=extra)
    if not args.quiet:
        info = localization.info
        secs = info.get("registration_seconds", {})
        per = f", {max(secs.values()):.1f} s per support at most" if secs else ""
        print(f"wrote {len(boxes)} boxes to {args.out} ({info.get('seconds', 0):.1f} s{per})")
    return 0
