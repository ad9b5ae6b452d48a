"""``ursam segment``: boxes (or a template library) in, every output of a run out."""
from __future__ import annotations

from ..metrics import format_dice_table
from ..runner import run_scan
from .options import (
    add_calibration_options,
    add_dicom_options,
    add_localizer_options,
    add_method_options,
    add_prompt_options,
    add_sam_options,
    job_from_args,
)


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


def main(args):
    job = job_from_args(args)
    outcome = run_scan(job)
    if outcome.dice_table:
        print(format_dice_table(outcome.dice_table))
    if not args.quiet:
        t = outcome.result.timings
        print(f"wrote {len(outcome.result.boxes)} organs to {args.out} in {t['total_seconds']:.1f} s "
              f"({t['distinct_slices']} slices, {t['encoder_calls']} encoder calls)")
    return 0
