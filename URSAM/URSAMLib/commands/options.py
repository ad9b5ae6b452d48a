"""The option groups the ``ursam`` commands share, and the settings they make.

Every default shown here is read from the engine's own option classes
(:mod:`URSAMLib.settings`), so ``--help`` and the engine cannot disagree; the
checks are theirs too (``Settings.check``).
"""
from __future__ import annotations

import argparse

from ..batch.executor import Executor
from ..dicom.export import parse_kinds
from ..errors import URSAMError
from ..localization import DEFAULT_MARGIN, parse_margin
from ..localizers import DEFAULT_LOCALIZER, LOCALIZERS, BoxSource, LibrarySource
from ..pipeline import Params
from ..prompt_modes import AUTO, DEFAULT_MODE, MODES, ZOOMS, PromptOptions
from ..quality.model import UNCALIBRATED_THRESHOLD
from ..rectification import LOWER_BOUNDS, SCOPES, RectifyOptions
from ..registration.deformable import METHODS, DeformableOptions
from ..runner import ScanJob
from ..sam import BACKEND_NAMES, DEFAULT_BACKEND, DEFAULT_DEVICE, ENCODER_PATHS, BackendOptions, describe_paths
from ..settings import Settings

TEMPLATES_HELP = "template library: dataset.json + cases/<id>/image.* and labels.*"


def _floats(text, n=None, what="value"):
    try:
        values = [float(v) for v in str(text).split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{what} must be comma-separated numbers, got {text!r}")
    if n is not None and len(values) != n:
        raise argparse.ArgumentTypeError(f"{what} needs {n} numbers, got {text!r}")
    return values


def _on_off(value):
    return "on" if value else "off"


# ----------------------------------------------------------------------------------------------
# SAM

def add_sam_options(p):
    """The SAM model: backend, checkpoint, device, encoder path, intensity normalization."""
    g = p.add_argument_group("SAM backend")
    g.add_argument("--backend", default=DEFAULT_BACKEND, choices=list(BACKEND_NAMES),
                   help=f"SAM model (default: {DEFAULT_BACKEND}, bundled; the others need --checkpoint)")
    g.add_argument("--checkpoint", help="checkpoint file for sam-vit-* and medsam (never downloaded)")
    g.add_argument("--device", default=DEFAULT_DEVICE, help=f"auto, cpu or cuda (default: {DEFAULT_DEVICE})")
    g.add_argument("--encoder", default="auto", choices=["auto", "eager"] + list(ENCODER_PATHS),
                   help="image encoder path (default: auto). " + describe_paths())
    g.add_argument("--modality", choices=["auto", "ct", "other"], default="auto",
                   help="ct: CT window in HU; other (MR, ...): 0.5-99.5 percentile normalization; "
                        "auto: decide from the intensities (default)")
    g.add_argument("--window", type=lambda s: _floats(s, 2, "--window"), default=None,
                   help="CT window LO,HI in HU before min-max (default: the backend's published window)")


def backend_options_from_args(args):
    """The :class:`URSAMLib.sam.BackendOptions` of the SAM options, checked."""
    return BackendOptions(name=args.backend, checkpoint=args.checkpoint, device=args.device,
                          window=tuple(args.window) if args.window else None, encoder=args.encoder).check()


# ----------------------------------------------------------------------------------------------
# Dask: where the tasks of batch and evaluate run

def add_executor_options(p, what="scans", default_local=True):
    """--workers N (a Dask cluster of N processes on this machine) or --scheduler ADDRESS (an existing one)."""
    g = p.add_argument_group("Dask distributed (where the tasks run)")
    x = g.add_mutually_exclusive_group()
    default = "default 1" if default_local else "default: none, the cases run one after another in this process"
    x.add_argument("--workers", type=int, default=None, metavar="N",
                   help=f"{what} at once on a Dask cluster of N worker processes on this machine, each with its "
                        f"share of the cores and its own model ({default})")
    x.add_argument("--scheduler", metavar="ADDRESS",
                   help="run on the existing Dask cluster whose scheduler is at ADDRESS (tcp://host:8786), e.g. "
                        "one started on SLURM with dask-jobqueue or on Kubernetes with dask-kubernetes")


def executor_from_args(args, default_local=True):
    """The :class:`URSAMLib.batch.executor.Executor` of --workers / --scheduler; with neither, a local cluster
    of one worker, or None where not ``default_local``."""

    if not default_local and args.workers is None and not args.scheduler:
        return None
    return Executor(workers=args.workers, scheduler=args.scheduler)


# ----------------------------------------------------------------------------------------------
# The method (METHOD.md §3-§4)

def add_method_options(p):
    params, rect = Params(), RectifyOptions()
    m = p.add_argument_group("UR-SAM method (METHOD.md §3-§4)")
    m.add_argument("--n-aug", type=int, default=params.n_aug,
                   help=f"augmented boxes per organ (default {params.n_aug})")
    m.add_argument("--ratio", type=float, default=params.ratio,
                   help=f"box shift as a fraction of the slice side (default {params.ratio})")
    m.add_argument("--seed", type=int, default=params.seed, help=f"random seed (default {params.seed})")
    m.add_argument("--threshold-scope", choices=list(SCOPES), default=rect.scope,
                   help=f"region of the class-specific threshold T (default: {rect.scope})")
    m.add_argument("--lower-bound", choices=list(LOWER_BOUNDS), default=rect.lower,
                   help="rectification lower bound: (I_t-I_b)/2 as written in the paper, or the midpoint "
                        f"(I_t+I_b)/2 (default: {rect.lower})")
    m.add_argument("--alpha-h", type=float, default=rect.alpha_h,
                   help=f"upper bound factor on I_t (default: {rect.alpha_h})")
    m.add_argument("--fixed-threshold", type=float, default=rect.fixed_threshold,
                   help="use this fixed uncertainty threshold instead of eq. 4 (ablation)")
    m.add_argument("--paper", action="store_true",
                   help="the paper's pipeline as published: box3d prompts, Algorithm 1, no atlas prior, no fusion")
    m.add_argument("--atlas-prior", default=None, choices=["on", "off"],
                   help="rectification also follows the warped support labels: uncertain voxels most supports "
                        "label are added, voxels almost none label are dropped (needs --templates and the "
                        f"registration localizer; default {_on_off(rect.atlas_prior)} there)")


# ----------------------------------------------------------------------------------------------
# Localization (METHOD.md §1)

def add_localizer_options(p, templates=True, required=False):
    """Template library options shared by localize, segment and evaluate.

    ``templates=False`` leaves out --templates (segment puts it beside --boxes;
    evaluate names its supports otherwise).
    """
    g = p.add_argument_group("auto-localization (METHOD.md §1)")
    if templates:
        g.add_argument("--templates", metavar="LIB", required=required, help=TEMPLATES_HELP)
    g.add_argument("--organs", help="comma-separated organ names or label values (default: all of the library)")
    g.add_argument("--localizer", default=DEFAULT_LOCALIZER, choices=sorted(LOCALIZERS),
                   help=f"how supports are matched to the query (default: {DEFAULT_LOCALIZER})")
    g.add_argument("--margin", default=None, metavar="Z,XY",
                   help="margin added to the boxes: Z slices, XY px of SAM's 1024 grid (default "
                        f"{DEFAULT_MARGIN[0]},{DEFAULT_MARGIN[1]:g} for localized boxes as in METHOD.md §1; "
                        "0,0 for a box file)")
    g.add_argument("--support-workers", type=int, default=None, metavar="N",
                   help="support scans registered at once (default: one per core)")
    g.add_argument("--localizer-checkpoint", metavar="PATH",
                   help="MedLAM checkpoint for --localizer medlam (from `ursam train-localizer`)")
    g.add_argument("--localizer-device", default="auto",
                   help="device of the MedLAM network: auto, cpu or cuda (default: auto)")


def localizer_options(args):
    """Keyword options of :func:`URSAMLib.localizers.localize` beyond the settings (margin, localizer)."""
    opts = {}
    if args.localizer == "registration" and args.support_workers is not None:
        if args.support_workers < 1:
            raise URSAMError(f"--support-workers must be at least 1, got {args.support_workers}")
        opts["workers"] = args.support_workers
    if args.localizer == "medlam":
        if not args.localizer_checkpoint:
            raise URSAMError("--localizer medlam needs --localizer-checkpoint PATH "
                             "(train one with `ursam train-localizer`)")
        opts["checkpoint"] = args.localizer_checkpoint
        opts["device"] = args.localizer_device
    return opts


# ----------------------------------------------------------------------------------------------
# The fusion's calibration

def add_calibration_options(p, library="the template library"):
    """--calibration FILE and --no-calibration (``library``: the library whose calibration.json is the default)."""
    p.add_argument("--calibration", metavar="FILE",
                   help=f"the fusion's calibration (default: {library}'s calibration.json, made by `ursam "
                        "templates calibrate`; without one, UR-SAM with the atlas prior)")
    p.add_argument("--no-calibration", action="store_true",
                   help=f"ignore {library}'s calibration: the uncalibrated result (UR-SAM with the atlas prior)")
    p.add_argument("--review-threshold", metavar="DICE", type=_dice_threshold, default=None,
                   help="an organ whose predicted Dice is below this is marked 'check' (default: the threshold "
                        f"the calibration chose per organ; without one, {UNCALIBRATED_THRESHOLD})")


def _dice_threshold(text):
    value = _floats(text, 1, "--review-threshold")[0]
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"--review-threshold is a Dice between 0 and 1, not {text}")
    return value


def uses_calibration(args):
    """Whether the run may fuse with a calibration: not with --no-calibration, nor with the paper's pipeline."""
    return not (args.no_calibration or args.paper)


# ----------------------------------------------------------------------------------------------
# DICOM in and out

def add_dicom_options(p, series=True):
    """--dicom-out (an RT Structure Set and/or a DICOM SEG of the result) and, for one scan, --series."""
    g = p.add_argument_group("DICOM (for a DICOM CT series input)")
    g.add_argument("--dicom-out", metavar="KINDS", default=None,
                   help="also write the result as DICOM objects referencing the input series: rtstruct (an RT "
                        "Structure Set, rtstruct.dcm), seg (a DICOM Segmentation, seg.dcm), or rtstruct,seg")
    if series:
        g.add_argument("--series", metavar="UID",
                       help="the Series Instance UID to segment where the DICOM folder holds several series")


# ----------------------------------------------------------------------------------------------
# Prompt modes

def add_prompt_options(p, several=False):
    """--prompts, the deformable stage behind the slice-adaptive modes, and the zoom."""
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
    deformable = DeformableOptions().method
    g.add_argument("--deformable", default=deformable, choices=METHODS,
                   help="deformable stage after the affine registration, before the support labels are "
                        f"warped (default {deformable}; elastix needs ursam[elastix])")
    g.add_argument("--zoom", default=PromptOptions().zoom, choices=list(ZOOMS),
                   help="SAM sees a crop around the organs instead of the whole slice (auto: for slice and "
                        f"propagate, not for the paper's box3d; default {PromptOptions().zoom})")


def params_from_args(args):
    """The method's :class:`URSAMLib.pipeline.Params` (with the rectification options), checked."""
    atlas_prior = RectifyOptions.atlas_prior if args.atlas_prior is None else args.atlas_prior == "on"
    if getattr(args, "paper", False):
        if args.atlas_prior == "on":
            raise URSAMError("--paper runs the paper's Algorithm 1 alone: it takes no --atlas-prior on")
        atlas_prior = False
    rect = RectifyOptions(scope=args.threshold_scope, lower=args.lower_bound, alpha_h=args.alpha_h,
                          fixed_threshold=args.fixed_threshold, atlas_prior=atlas_prior)
    return Params(n_aug=args.n_aug, ratio=args.ratio, seed=args.seed, rectify=rect).check()


def settings_from_args(args, mode=None):
    """The run's :class:`URSAMLib.settings.Settings` from parsed arguments, checked.

    ``mode`` overrides ``--prompts`` (evaluate, whose --prompts is a list,
    passes its first mode). Without ``--prompts`` the mode is "auto" and
    without ``--margin`` the margin None: each run resolves them for its
    source (:meth:`URSAMLib.settings.Settings.resolved`: a box file's own
    prompts decide).
    """
    localizer = getattr(args, "localizer", DEFAULT_LOCALIZER)
    params = params_from_args(args)
    margin = getattr(args, "margin", None)
    margin = parse_margin(margin) if margin else None
    if getattr(args, "paper", False):
        if (mode or args.prompts or "box3d") != "box3d":
            raise URSAMError("--paper prompts with the paper's box3d; it takes no other --prompts")
        mode = "box3d"
    prompts = PromptOptions(mode=mode or args.prompts or AUTO, zoom=args.zoom)
    return Settings(params=params, prompts=prompts, deformable=DeformableOptions(method=args.deformable),
                    margin=margin, localizer=localizer).check()


def check_source_options(args):
    """The one home of the options that need ``--templates`` (segment, batch)."""
    if not args.templates:
        if args.organs:
            raise URSAMError("--organs goes with --templates; with box files, edit the box files")
        if args.calibration:
            raise URSAMError("--calibration goes with --templates (the fusion needs the warped support labels)")


# ----------------------------------------------------------------------------------------------
# The scan job of ``ursam segment``

def job_from_args(args):
    """The :class:`URSAMLib.runner.ScanJob` of ``ursam segment``'s (and ``ursam batch``'s) options; a batch
    fills in each scan's image, box file, reference and folder."""
    check_source_options(args)
    source = LibrarySource(args.templates, args.organs, localizer_options(args)) if args.templates else \
        BoxSource(getattr(args, "boxes", None))
    return ScanJob(getattr(args, "image", ""), source, settings_from_args(args), args.calibration,
                   uses_calibration(args), backend_options_from_args(args), modality=args.modality,
                   reference=getattr(args, "reference", None), out=args.out, overwrite=args.overwrite,
                   atlas_prior_asked=args.atlas_prior == "on", quiet=args.quiet,
                   series=getattr(args, "series", None), dicom_out=parse_kinds(args.dicom_out),
                   review_threshold=args.review_threshold)
