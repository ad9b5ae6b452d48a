"""``ursam batch``: a cohort of scans through ``ursam segment``, one Dask task per scan."""
from __future__ import annotations

import sys
from pathlib import Path

from ..batch.run import run_batch
from ..batch.scans import find_scans
from ..dicom.export import require_dicom_inputs
from ..progress import Progress
from .options import (
    TEMPLATES_HELP,
    add_calibration_options,
    add_dicom_options,
    add_executor_options,
    add_localizer_options,
    add_method_options,
    add_prompt_options,
    add_sam_options,
    executor_from_args,
    job_from_args,
)


def add_parser(sub):
    p = sub.add_parser("batch", help="segment every scan of a folder or a manifest (Dask)",
                       description="Run `ursam segment` on every scan of INPUT, one task per scan on Dask "
                                   "distributed (a cluster of worker processes on this machine, or an existing "
                                   "cluster), each worker loading the model once. DIR/<id>/ gets what `ursam "
                                   "segment` writes; summary.csv, failed.csv and summary.md cover the cohort. "
                                   "A rerun skips the scans finished with the same inputs and settings. "
                                   "Exit code 0: every scan finished; 1: some failed; 2: bad arguments.")
    p.add_argument("input", metavar="INPUT",
                   help="a folder of scans (NIfTI, NRRD, MHA files; DICOM series in sub-folders) or a CSV manifest "
                        "with the columns id,image and optionally labels (Dice in the summary) and boxes (a box "
                        "file per scan, instead of --templates)")
    p.add_argument("--templates", metavar="LIB", help="localize every scan's organs from this library; "
                                                      + TEMPLATES_HELP)
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (a rerun resumes it)")
    p.add_argument("--overwrite", action="store_true",
                   help="run again where DIR holds a batch with other settings, or write into a folder that "
                        "holds other files")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    add_calibration_options(p)
    add_dicom_options(p, series=False)
    add_executor_options(p, what="scans")
    add_sam_options(p)
    add_method_options(p)
    add_prompt_options(p)
    add_localizer_options(p, templates=False)
    p.set_defaults(func=main)
    return p


def main(args):
    progress = Progress(quiet=args.quiet)
    executor = executor_from_args(args)  # checks --workers / --scheduler; starts only where scans must run
    skipped = []
    scans = find_scans(args.input, skipped)
    for path, why in skipped:
        progress.info(f"skipped {path}: {why}")
    template = job_from_args(args)  # each scan fills in its image, box file, labels and folder
    if template.dicom_out:
        require_dicom_inputs(s.image for s in scans)
    if args.device not in ("auto", "cpu") and not args.scheduler:
        from ..sam.backends import resolve_device  # noqa: PLC0415 (imports torch: only where a GPU is named)

        resolve_device(args.device)  # a device this machine lacks is a bad argument, not a failure of every scan
    try:
        result = run_batch(scans, args.out, executor, template, overwrite=args.overwrite, progress=progress,
                           source=Path(args.input).absolute())
    except KeyboardInterrupt:
        print("ursam: interrupted; the finished scans are kept in the output folder: rerun to resume",
              file=sys.stderr, flush=True)
        return 130
    done = len(result.done_before) + len(result.ran)
    failed = f", {len(result.failed)} failed (failed.csv)" if result.failed else ""
    print(f"{done} of {result.scans} scans finished in {args.out} ({len(result.ran)} in this run, "
          f"{len(result.done_before)} before){failed}; summary.csv, summary.md")
    return result.exit_code
