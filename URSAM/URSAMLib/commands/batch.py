"""``ursam batch``: a cohort of scans through ``ursam segment``, one Dask task per scan."""
from __future__ import annotations

from ..progress import Progress
from .options import (TEMPLATES_HELP, add_calibration_options, add_dicom_options, add_executor_options,
                      add_localizer_options, add_method_options, add_prompt_options, add_sam_options,
                      backend_options_from_args, dicom_out_from_args, executor_from_args, localizer_options,
                      settings_from_args, uses_calibration)


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
    import sys
    from pathlib import Path

    from ..batch.run import run_batch
    from ..batch.scans import find_scans
    from ..errors import URSAMError
    from ..scan import ScanJob

    progress = Progress(quiet=args.quiet)
    executor = executor_from_args(args)  # checks --workers / --scheduler; starts only where scans must run
    skipped = []
    scans = find_scans(args.input, skipped)
    for path, why in skipped:
        progress.info(f"skipped {path}: {why}")
    if args.organs and not args.templates:
        raise URSAMError("--organs goes with --templates; with box files, edit the box files")
    if args.calibration and not args.templates:
        raise URSAMError("--calibration goes with --templates (the fusion needs the warped support labels)")
    dicom_out = dicom_out_from_args(args)
    if dicom_out:
        from ..dicom.export import require_dicom_inputs

        require_dicom_inputs(s.image for s in scans)
    template = ScanJob(image="", out="", templates=args.templates, organs=args.organs, modality=args.modality,
                       atlas_prior=args.atlas_prior, localizer_options=localizer_options(args),
                       calibration=args.calibration, use_calibration=uses_calibration(args), dicom_out=dicom_out)
    settings = settings_from_args(args) if args.templates else None
    if not args.templates:
        settings_from_args(args, boxes=[])  # the options' own checks, before any scan
    backend = backend_options_from_args(args)
    if args.device not in ("auto", "cpu") and not args.scheduler:
        from ..sam.backends import resolve_device

        resolve_device(args.device)  # a device this machine lacks is a bad argument, not a failure of every scan
    try:
        result = run_batch(scans, args.out, executor, template, settings, backend,
                           settings_for_boxes=None if args.templates else
                           lambda boxes: settings_from_args(args, boxes=boxes),
                           overwrite=args.overwrite, progress=progress, source=Path(args.input).absolute())
    except KeyboardInterrupt:
        print("ursam: interrupted; the finished scans are kept in the output folder: rerun to resume",
              file=sys.stderr, flush=True)
        return 130
    done = len(result.done_before) + len(result.ran)
    failed = f", {len(result.failed)} failed (failed.csv)" if result.failed else ""
    print(f"{done} of {result.scans} scans finished in {args.out} ({len(result.ran)} in this run, "
          f"{len(result.done_before)} before){failed}; summary.csv, summary.md")
    return result.exit_code
