"""The ``ursam`` command line.

Every command reports bad input as one line, ``ursam: error: ...``, naming the
problem and the file, and exits with code 2; nothing partial is left behind.
"""
import argparse
import importlib
import sys

from . import __version__
from .errors import URSAMError, Cancelled

#: modules that each add one subcommand: ``add_parser(subparsers)`` and ``main(args)``
COMMAND_MODULES = [
    "URSAMLib.commands.segment",
    "URSAMLib.commands.boxes_from_labels",
    "URSAMLib.commands.templates",
    "URSAMLib.commands.localize",
    "URSAMLib.commands.evaluate",
    "URSAMLib.commands.demo",
    "URSAMLib.commands.train_localizer",
    "URSAMLib.commands.bench",
]


def _floats(text, n=None, what="value"):
    try:
        values = [float(v) for v in str(text).split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{what} must be comma-separated numbers, got {text!r}")
    if n is not None and len(values) != n:
        raise argparse.ArgumentTypeError(f"{what} needs {n} numbers, got {text!r}")
    return values


def add_sam_options(p):
    """Backend and method options shared by segment, evaluate and bench."""
    from .rectification import RectifyOptions

    g = p.add_argument_group("SAM backend")
    g.add_argument("--backend", default="litemedsam",
                   choices=["litemedsam", "sam-vit-b", "sam-vit-l", "sam-vit-h", "medsam"],
                   help="SAM model (default: litemedsam, bundled; the others need --checkpoint)")
    g.add_argument("--checkpoint", help="checkpoint file for sam-vit-* and medsam (never downloaded)")
    g.add_argument("--device", default="auto", help="auto, cpu or cuda (default: auto)")
    g.add_argument("--encoder", default="auto",
                   help="LiteMedSAM image encoder path: auto (the fastest available), eager, or a fast path name")
    g.add_argument("--modality", choices=["auto", "ct", "other"], default="auto",
                   help="ct: CT window in HU; other (MR, ...): 0.5-99.5 percentile normalization; "
                        "auto: decide from the intensities (default)")
    g.add_argument("--window", type=lambda s: _floats(s, 2, "--window"), default=None,
                   help="CT window LO,HI in HU before min-max (default: the backend's published window)")
    m = p.add_argument_group("UR-SAM method (METHOD.md §3-§4)")
    m.add_argument("--n-aug", type=int, default=3, help="augmented boxes per organ (default 3)")
    m.add_argument("--ratio", type=float, default=0.01,
                   help="box shift as a fraction of the slice side (default 0.01)")
    m.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    defaults = RectifyOptions()
    m.add_argument("--threshold-scope", choices=["box", "slice"], default=defaults.scope,
                   help=f"region of the class-specific threshold T (default: {defaults.scope})")
    m.add_argument("--lower-bound", choices=["written", "midpoint"], default=defaults.lower,
                   help="rectification lower bound: (I_t-I_b)/2 as written in the paper, or the midpoint "
                        f"(I_t+I_b)/2 (default: {defaults.lower})")
    m.add_argument("--alpha-h", type=float, default=defaults.alpha_h,
                   help=f"upper bound factor on I_t (default: {defaults.alpha_h})")
    m.add_argument("--fixed-threshold", type=float, default=None,
                   help="use this fixed uncertainty threshold instead of eq. 4 (ablation)")


def params_from_args(args):
    from .pipeline import Params
    from .rectification import RectifyOptions

    if args.n_aug < 1:
        raise URSAMError(f"--n-aug must be at least 1, got {args.n_aug}")
    if not 0 <= args.ratio < 0.5:
        raise URSAMError(f"--ratio must be in [0, 0.5), got {args.ratio}")
    if args.alpha_h <= 0:
        raise URSAMError(f"--alpha-h must be positive, got {args.alpha_h}")
    rect = RectifyOptions(scope=args.threshold_scope, lower=args.lower_bound, alpha_h=args.alpha_h,
                          fixed_threshold=args.fixed_threshold)
    return Params(n_aug=args.n_aug, ratio=args.ratio, seed=args.seed, rectify=rect)


def percentile_for(args, volume, image_path, progress):
    """Whether CT windowing applies; warns when it does not."""
    from .imageio import looks_like_ct

    if args.modality == "ct":
        return False
    if args.modality == "other":
        return True
    if looks_like_ct(volume):
        return False
    progress.warn(f"{image_path} does not look like a CT in HU (no air near -1000): CT windowing does not "
                  "apply, using 0.5-99.5 percentile normalization (set --modality ct to override)")
    return True


def backend_from_args(args, progress=None, percentile=False):
    from .sam_backend import make_backend

    if progress:
        progress.stage(f"loading model {args.backend}")
    return make_backend(args.backend, args.checkpoint, args.device,
                        window=args.window if args.window else "default", percentile=percentile,
                        encoder=args.encoder)


def build_parser():
    parser = argparse.ArgumentParser(
        prog="ursam",
        description="UR-SAM: automatic organ segmentation of CT with the Segment Anything Model, "
                    "prompt augmentation, uncertainty and rectification.")
    parser.add_argument("--version", action="version", version=f"ursam {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in COMMAND_MODULES:
        importlib.import_module(name).add_parser(sub)
    return parser


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    # A kill (SIGTERM) unwinds like Ctrl-C, so staged outputs are removed, not left half-written.
    import signal
    import threading

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        return args.func(args) or 0
    except URSAMError as err:
        print(f"ursam: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:
        # A full disk or a folder without write permission: one line, not a traceback.
        where = f": {err.filename}" if err.filename else ""
        print(f"ursam: error: {err.strerror or err}{where}", file=sys.stderr)
        return 2
    except (Cancelled, KeyboardInterrupt):
        print("ursam: interrupted; no outputs were written", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
