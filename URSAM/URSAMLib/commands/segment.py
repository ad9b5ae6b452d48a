"""``ursam segment``: boxes (or a template library) in, every output of a run out."""
from __future__ import annotations

from ..metrics import format_dice_table
from ..progress import Progress
from ..runner import BoxSource, LibrarySource, ScanJob, run_scan
from .options import (add_calibration_options, add_localizer_options, add_method_options, add_prompt_options,
                      add_sam_options, backend_options_from_args, calibration_from_args, check_source_options,
                      localizer_options, settings_from_args)


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
    add_calibration_options(p)
    p.add_argument("--overwrite", action="store_true", help="replace the files of a non-empty output folder")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    add_sam_options(p)
    add_method_options(p)
    add_prompt_options(p)
    add_localizer_options(p, templates=False)
    p.set_defaults(func=main)
    return p


def job_from_args(args, progress=None):
    """The :class:`URSAMLib.runner.ScanJob` of ``ursam segment``'s arguments (its calibration read, so that a
    bad file fails before any registration)."""
    check_source_options(args)
    settings = settings_from_args(args)
    if args.templates:
        source = LibrarySource(args.templates, args.organs, localizer_options(args))
    else:
        source = BoxSource(args.boxes)
    return ScanJob(args.image, source, settings, calibration_from_args(args, settings, progress),
                   modality=args.modality, reference=args.reference, out=args.out, overwrite=args.overwrite,
                   atlas_prior_asked=args.atlas_prior == "on")


def main(args):
    progress = Progress(quiet=args.quiet)
    backend = backend_options_from_args(args)
    job = job_from_args(args, progress)
    outcome = run_scan(job, backend.make, progress)
    if outcome.dice_table:
        print(format_dice_table(outcome.dice_table))
    if not args.quiet:
        result = outcome.result
        t = result.timings
        print(f"wrote {len(result.boxes)} organs to {args.out} in {t['total_seconds']:.1f} s "
              f"({t['distinct_slices']} slices, {t['encoder_calls']} encoder calls)")
    return 0
