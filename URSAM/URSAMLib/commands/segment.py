"""``ursam segment``: boxes (or a template library) in, every output of a run out."""
from __future__ import annotations

from ..progress import Progress
from .options import (add_calibration_options, add_dicom_options, add_localizer_options, add_method_options,
                      add_prompt_options, add_sam_options, backend_options_from_args, dicom_out_from_args,
                      localizer_options, settings_from_args, uses_calibration)


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
    add_dicom_options(p)
    p.add_argument("--overwrite", action="store_true", help="replace the files of a non-empty output folder")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    add_sam_options(p)
    add_method_options(p)
    add_prompt_options(p)
    add_localizer_options(p, templates=False)
    p.set_defaults(func=main)
    return p


def job_from_args(args):
    """The :class:`URSAMLib.scan.ScanJob` of ``ursam segment``'s arguments."""
    from ..scan import ScanJob

    return ScanJob(image=args.image, out=args.out, templates=args.templates, boxes=args.boxes,
                   reference=args.reference, organs=args.organs, modality=args.modality,
                   atlas_prior=args.atlas_prior, localizer_options=localizer_options(args),
                   overwrite=args.overwrite, calibration=args.calibration, use_calibration=uses_calibration(args),
                   series=args.series, dicom_out=dicom_out_from_args(args))


def main(args):
    from ..evaluation.metrics import format_dice_table
    from ..scan import segment_scan

    progress = Progress(quiet=args.quiet)
    job = job_from_args(args)
    backend = backend_options_from_args(args)
    outcome = segment_scan(job, lambda boxes: settings_from_args(args, boxes=boxes),
                           lambda percentile: backend.make(percentile, progress), progress)
    if outcome.dice_table:
        print(format_dice_table(outcome.dice_table))
    if not args.quiet:
        result = outcome.result
        t = result.timings
        print(f"wrote {len(result.boxes)} organs to {args.out} in {t['total_seconds']:.1f} s "
              f"({t['distinct_slices']} slices, {t['encoder_calls']} encoder calls)")
    return 0
