"""``ursam bench``: measure a segment run on this machine (whole case, registrations, encoder paths, decoder,
n=1 vs n=3)."""
from __future__ import annotations

from ..atomic import atomic_write_text
from ..errors import URSAMError
from ..progress import Progress
from ..sam import ENCODER_PATHS
from .options import add_method_options, add_prompt_options, add_sam_options, settings_from_args


def add_parser(sub):
    p = sub.add_parser(
        "bench", help="measure what a segment run costs on this machine",
        description="Measure, side by side in one process: with --templates the whole case (localization, "
                    "deformable stage, SAM, outputs) and the registration seconds per support; the image "
                    "encoder per slice on each encoder path, its speed-up over eager and (with --labels) its "
                    "Dice difference from eager; the decoder per box; whole segment runs with 1 and 3 "
                    "augmented boxes. Prints a summary, then one JSON object as the last line. "
                    "(--n-aug is not used: the two whole runs use --n-values.)")
    p.add_argument("image", help="CT: NIfTI, NRRD, MHA, or a DICOM series folder")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--boxes", help="box file (JSON, voxel indices)")
    src.add_argument("--templates", metavar="LIB",
                     help="template library: localize the organs from it, and time the whole case")
    p.add_argument("--labels", help="label map of the image: per-organ Dice of each encoder path")
    p.add_argument("--encoders", default="all",
                   help="encoder paths to time, comma-separated: all (eager, auto and every fast path this "
                        "installation has; the default), auto, eager, " + ", ".join(ENCODER_PATHS))
    p.add_argument("--n-values", default="1,3", help="augmented boxes of the two whole runs (default 1,3)")
    p.add_argument("--timing-slices", type=int, default=4, help="slices sampled for the encoder timing (default 4)")
    p.add_argument("--rounds", type=int, default=2, help="interleaved rounds of encoder and decoder timing (default 2)")
    p.add_argument("--repeat", type=int, default=1, help="repeats of the whole n=1 / n=3 runs (median; default 1)")
    p.add_argument("--json", dest="json_out", help="also write the JSON record to this file")
    p.add_argument("--margin", default=None, metavar="Z,XY",
                   help="margin added to localized boxes (with --templates; default as ursam segment)")
    add_sam_options(p)
    add_method_options(p)
    add_prompt_options(p)
    p.set_defaults(func=main)
    return p


def _n_values(text):
    try:
        lo, hi = (int(v) for v in text.split(","))
    except ValueError:
        raise URSAMError(f"--n-values must be two integers N1,N3, got {text!r}") from None
    if not 1 <= lo < hi:
        raise URSAMError(f"--n-values must satisfy 1 <= N1 < N3, got {text!r}")
    return lo, hi


def segment_args(args):
    """The options of ``ursam segment`` that give the run this bench's settings and model (for its
    fresh-process run of the whole case)."""
    out = ["--backend", args.backend, "--device", args.device]
    for flag, value in (("--checkpoint", args.checkpoint), ("--window", args.window), ("--prompts", args.prompts),
                        ("--margin", args.margin), ("--deformable", args.deformable), ("--seed", args.seed),
                        ("--n-aug", args.n_aug), ("--encoder", getattr(args, "encoder", None))):
        if value is not None:
            out += [flag, str(value)]
    return out


def main(args):
    from ..evaluation.bench import dumps, run_bench  # noqa: PLC0415 (imports torch: loads only where a model runs)
    from ..sam.backends import make_backend  # noqa: PLC0415 (imports torch: loads only where a model runs)

    encoders = [e.strip() for e in args.encoders.split(",") if e.strip()]
    if not encoders:
        raise URSAMError("--encoders needs at least one encoder path")
    for name, value in (("--timing-slices", args.timing_slices), ("--rounds", args.rounds), ("--repeat", args.repeat)):
        if value < 1:
            raise URSAMError(f"{name} must be at least 1, got {value}")
    n_values = _n_values(args.n_values)
    for name in encoders:
        if name not in ("all", "auto", "eager") + ENCODER_PATHS:
            raise URSAMError(f"unknown encoder path {name!r} in --encoders; use all, auto, eager, "
                             + ", ".join(ENCODER_PATHS))
    settings = settings_from_args(args)
    progress = Progress(quiet=True)

    def make(encoder):
        return make_backend(args.backend, args.checkpoint, args.device,
                            window=args.window if args.window else "default", encoder=encoder)

    record = run_bench(args.image, make, settings, boxes_path=args.boxes, templates=args.templates,
                       labels=args.labels, encoders=encoders, n_values=n_values, timing_slices=args.timing_slices,
                       rounds=args.rounds, repeat=args.repeat, log=lambda m: print(m, flush=True),
                       cli_args=segment_args(args))
    if progress.warnings:
        record["warnings"] = list(progress.warnings)
    line = dumps(record)
    if args.json_out:
        atomic_write_text(args.json_out, line + "\n")
    print(line)
    return 0
