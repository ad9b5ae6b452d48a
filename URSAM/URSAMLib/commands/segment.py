"""``ursam segment``: boxes (or a template library) in, every output of a run out."""
from __future__ import annotations

from pathlib import Path

from ..errors import URSAMError
from ..progress import Progress
from .options import (add_localizer_options, add_method_options, add_prompt_options, add_sam_options,
                      backend_from_args, localizer_options, percentile_for, settings_from_args)


def add_parser(sub):
    p = sub.add_parser("segment", help="segment the organs of a CT",
                       description="Segment the organs of a CT inside 3D boxes with augmented SAM prompts, "
                                   "and write the ensemble, uncertainty and rectified masks.")
    p.add_argument("image", help="CT: NIfTI, NRRD, MHA, or a DICOM series folder")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--boxes", help="box file (JSON, voxel indices)")
    src.add_argument("--templates", metavar="LIB",
                     help="localize the organs from this template library first (also saves boxes.json)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--reference", help="reference label map (same label values as the boxes): "
                                        "scores every method and prints the Dice table")
    p.add_argument("--calibration", metavar="FILE",
                   help="the fusion's calibration (default: the template library's calibration.json, made by "
                        "`ursam templates calibrate`; without one, UR-SAM with the atlas prior)")
    p.add_argument("--no-calibration", action="store_true",
                   help="ignore the library's calibration: the uncalibrated result (UR-SAM with the atlas prior)")
    p.add_argument("--overwrite", action="store_true", help="replace the files of a non-empty output folder")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    add_sam_options(p)
    add_method_options(p)
    add_prompt_options(p)
    add_localizer_options(p, templates=False)
    p.set_defaults(func=main)
    return p


def localize_from_args(args, settings, progress):
    """The :class:`URSAMLib.localize.Localization` of ``args.image`` from ``args.templates``."""
    from ..localize import localize

    if settings.prompts.mode != "box3d" and settings.localizer != "registration":
        raise URSAMError(f"--prompts {settings.prompts.mode} needs --localizer registration "
                         "(the warped support labels)")
    localization = localize(args.image, args.templates, organs=args.organs, method=settings.localizer,
                            progress=progress, margin=settings.margin, **localizer_options(args))
    if not localization.boxes:
        raise URSAMError("no organ could be localized from the template library", args.templates)
    return localization


def main(args):
    from ..boxes import load_boxes, save_boxes
    from ..evaluation.metrics import dice_table, format_dice_table
    from ..imageio import read_ct, read_labels
    from ..localization import Localization
    from ..orientation import Orientation
    from ..outputs import check_output_dir
    from ..segment import segment_query, write_results

    progress = Progress(quiet=args.quiet)
    check_output_dir(args.out, args.overwrite)
    reference, volume = read_ct(args.image)
    size = reference.GetSize()
    calibration = None
    if args.templates:
        settings = settings_from_args(args)
        localization = localize_from_args(args, settings, progress)
        if not (args.no_calibration or args.paper) and settings.warps_labels(localization):
            from ..calibration import find_calibration

            calibration = find_calibration(localization.library, args.calibration, progress)
    else:
        if args.calibration:
            raise URSAMError("--calibration goes with --templates (the fusion needs the warped support labels)")
        if args.organs:
            raise URSAMError("--organs goes with --templates; with --boxes, edit the box file")
        boxes = load_boxes(args.boxes, size, warn=progress.warn)
        settings = settings_from_args(args, boxes=boxes)
        if settings.margin != (0, 0.0):
            orientation = Orientation.of(reference)  # the margin is on the slices SAM sees
            boxes = [orientation.add_margin(b, settings.margin[0], settings.margin[1]) for b in boxes]
        localization = Localization.from_boxes(boxes, Path(args.boxes).absolute())
    if args.atlas_prior == "on" and not settings.warps_labels(localization):
        progress.warn("the atlas prior in rectification needs the warped support labels (a template library "
                      "and the registration localizer); it is off for these boxes")
    truth = read_labels(args.reference, reference, "reference label map")[1] if args.reference else None
    percentile = percentile_for(args, volume, args.image, progress)
    backend = backend_from_args(args, progress, percentile)
    source = {"templates": str(Path(args.templates).absolute())} if args.templates else \
        {"boxes": str(Path(args.boxes).absolute())}
    inputs = {"image": str(Path(args.image).absolute()), **source,
              "margin_z_xy": list(settings.margin), "normalization": "percentile" if percentile else "ct-window"}
    if args.templates:
        inputs["localization"] = localization.info
    result = segment_query(volume, reference, localization, backend, settings, progress=progress, inputs=inputs,
                           calibration=calibration)
    extra_files = {}
    if args.templates:
        # Written after the run, so propagate's file holds the boxes it chose on each slice.
        extra_files["boxes.json"] = lambda path: save_boxes(result.boxes, path, extra={
            "localization": localization.info, "prompts": result.prompt_info})
        result.warnings += [f"{name} was not localized ({why}); it was skipped"
                            for name, why in localization.info.get("skipped", {}).items()]
    table = dice_table(result, truth) if truth is not None else None
    write_results(result, args.out, args.overwrite, progress, extra_files=extra_files,
                  extra_report={"dice_vs_reference": table} if table else None)
    if table:
        print(format_dice_table(table))
    if not args.quiet:
        t = result.timings
        print(f"wrote {len(result.boxes)} organs to {args.out} in {t['total_seconds']:.1f} s "
              f"({t['distinct_slices']} slices, {t['encoder_calls']} encoder calls)")
    return 0
