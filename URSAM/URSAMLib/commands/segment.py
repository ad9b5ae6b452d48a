"""``ursam segment``: boxes (or a template library) in, every output of a run out."""
from pathlib import Path

from ..boxes import load_boxes, add_margin, save_boxes
from ..errors import URSAMError
from ..imageio import read_ct
from ..outputs import check_output_dir
from ..progress import Progress
from ..segment import write_results


def add_parser(sub):
    from ..cli import add_sam_options

    p = sub.add_parser("segment", help="segment the organs of a CT",
                       description="Segment the organs of a CT inside 3D boxes with augmented SAM prompts, "
                                   "and write the ensemble, uncertainty and rectified masks.")
    p.add_argument("image", help="CT: NIfTI, NRRD, MHA, or a DICOM series folder")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--boxes", help="box file (JSON, voxel indices)")
    src.add_argument("--templates", metavar="LIB",
                     help="localize the organs from this template library first (also saves boxes.json)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--margin", default=None,
                   help="box margin Z,XY: Z slices, XY px of SAM's 1024 grid "
                        "(default 0,0 for --boxes, 2,10 for --templates as in METHOD.md §1)")
    p.add_argument("--reference", help="reference label map (same label values as the boxes): "
                                        "scores every method and prints the Dice table")
    p.add_argument("--overwrite", action="store_true", help="replace the files of a non-empty output folder")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    add_sam_options(p)
    add_prompt_options(p)
    from .localize import add_localizer_options

    add_localizer_options(p, templates=False, margin=False)
    p.set_defaults(func=main)
    return p


def add_prompt_options(p, several=False):
    """--prompts (and the registration behind the slice-adaptive modes), shared by segment and evaluate."""
    from ..deformable import METHODS
    from ..prompts import MODES, DEFAULT_MODE, PromptOptions

    g = p.add_argument_group("prompt mode (which 2D box each slice gets)")
    default = (f"default {DEFAULT_MODE} with --templates and the registration localizer; box3d with "
               "--localizer medlam; with --boxes, the file's own prompts: slice where it has per-slice boxes, "
               "else box3d")
    if several:
        g.add_argument("--prompts", default=None, metavar="MODES",
                       help=f"comma-separated prompt modes to compare ({', '.join(MODES)}; {default})")
    else:
        g.add_argument("--prompts", default=None, choices=MODES,
                       help="box3d: the paper's one box per organ on every slice; slice: a box per slice from "
                            "the support labels warped into the scan; propagate: from the slice of largest "
                            f"warped area outward, each slice boxed from the previous slice's mask ({default})")
    g.add_argument("--prompt-registration", default="demons", choices=METHODS,
                   help="deformable stage after the affine registration, before the support labels are "
                        "warped for slice/propagate prompts (default demons; elastix needs ursam[elastix])")
    g.add_argument("--zoom", default=PromptOptions.zoom, choices=["auto", "on", "off"],
                   help="SAM sees a crop around the organs instead of the whole slice (auto: for slice and "
                        "propagate, not for the paper's box3d; default auto)")
    g.add_argument("--atlas-prior", default=None, choices=["on", "off"],
                   help="rectification also follows the warped support labels: uncertain voxels most supports "
                        "label are added, voxels almost none label are dropped (needs --templates and the "
                        f"registration localizer; default {'on' if PromptOptions.prior_rectify else 'off'} there)")


def prompt_options(args, mode=None, boxes=None):
    """``(PromptOptions, DeformableOptions)`` from parsed arguments; ``mode`` overrides ``--prompts``
    (evaluate, whose --prompts is a list, sets each mode in turn). ``boxes``: those of a box file
    (``--boxes``), whose own prompts decide the mode when ``--prompts`` is not given."""
    from ..deformable import DeformableOptions, check_method
    from ..prompts import PromptOptions, check_mode, default_mode

    check_method(args.prompt_registration)
    localizer = getattr(args, "localizer", "registration")
    mode = check_mode(mode or args.prompts or default_mode(localizer, boxes))
    warped = boxes is None and localizer == "registration"
    prior = args.atlas_prior == "on" if args.atlas_prior else (PromptOptions.prior_rectify and warped)
    popts = PromptOptions(mode=mode, zoom=args.zoom, prior_rectify=prior)
    return popts, DeformableOptions(method=args.prompt_registration)


def _localize(args, margin, progress, keep_transforms=False):
    """Boxes from the template library (METHOD.md §1), with the margin; see URSAMLib.localize."""
    from ..localize import localize
    from .localize import localizer_options

    if keep_transforms and args.localizer != "registration":
        raise URSAMError(f"--prompts {args.prompts or 'slice'} and --atlas-prior need --localizer registration "
                         "(the warped support labels)")
    boxes, info = localize(args.image, args.templates, organs=args.organs, method=args.localizer,
                           progress=progress, keep_transforms=keep_transforms,
                           **localizer_options(args, margin=margin))
    if not boxes:
        raise URSAMError("no organ could be localized from the template library", args.templates)
    return boxes, info


def parse_margin(text):
    try:
        z, xy = (float(v) for v in text.split(","))
    except ValueError:
        raise URSAMError(f"--margin must be Z,XY (two numbers), got {text!r}") from None
    return int(round(z)), xy


def main(args):
    from ..cli import params_from_args, backend_from_args, percentile_for
    from ..imageio import read_labels
    from ..segment import format_dice_table, segment_with_prompts

    progress = Progress(quiet=args.quiet)
    check_output_dir(args.out, args.overwrite)
    params = params_from_args(args)
    margin = parse_margin(args.margin or ("2,10" if args.templates else "0,0"))
    reference, volume = read_ct(args.image)
    size = reference.GetSize()
    extra_files, localization = {}, None
    registrations, library = None, None
    if args.templates:
        popts, dopts = prompt_options(args)
        needs_registrations = popts.mode != "box3d" or popts.prior_rectify
        boxes, localization = _localize(args, margin, progress, keep_transforms=needs_registrations)
        registrations = localization.pop("registrations", None)
        if needs_registrations:
            from ..templates import Library

            library = Library(args.templates)
    else:
        if args.organs:
            raise URSAMError("--organs goes with --templates; with --boxes, edit the box file")
        boxes = load_boxes(args.boxes, size, warn=progress.warn)
        if margin != (0, 0.0):
            boxes = [add_margin(b, margin[0], margin[1], size) for b in boxes]
        popts, dopts = prompt_options(args, boxes=boxes)
    truth = read_labels(args.reference, reference, "reference label map")[1] if args.reference else None
    percentile = percentile_for(args, volume, args.image, progress)
    backend = backend_from_args(args, progress, percentile)
    source = {"templates": str(Path(args.templates).absolute())} if args.templates else \
        {"boxes": str(Path(args.boxes).absolute())}
    inputs = {"image": str(Path(args.image).absolute()), **source,
              "margin_z_xy": list(margin), "normalization": "percentile" if percentile else "ct-window"}
    if localization is not None:
        inputs["localization"] = localization
    result, boxes, prompt_info = segment_with_prompts(
        volume, reference, boxes, backend, params, popts, registrations, library, dopts, query=args.image,
        progress=progress, inputs=inputs)
    if args.templates:
        # Written after the run, so propagate's file holds the boxes it chose on each slice.
        extra_files["boxes.json"] = lambda path: save_boxes(boxes, path, extra={"localization": localization,
                                                                                "prompts": prompt_info})
    if localization is not None:
        result.warnings += [f"{name} was not localized ({why}); it was skipped"
                            for name, why in localization.get("skipped", {}).items()]
    write_results(result, args.out, args.overwrite, progress, reference=truth, extra_files=extra_files)
    if truth is not None:
        print(format_dice_table(result.dice_table(truth)))
    if not args.quiet:
        t = result.timings
        print(f"wrote {len(boxes)} organs to {args.out} in {t['total_seconds']:.1f} s "
              f"({t['distinct_slices']} slices, {t['encoder_calls']} encoder calls)")
    return 0
