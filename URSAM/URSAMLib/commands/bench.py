"""``ursam bench``: measure a segment run on this machine (encoder paths, decoder, n=1 vs n=3)."""
from __future__ import annotations

from ..errors import URSAMError
from ..progress import Progress
from .options import add_method_options, add_sam_options, params_from_args


def add_parser(sub):
    p = sub.add_parser(
        "bench", help="measure what a segment run costs on this machine",
        description="Measure, side by side in one process: the image encoder per slice on each encoder "
                    "path (eager and the fast ones), the decoder per box, and whole segment runs with 1 "
                    "and 3 augmented boxes. Prints a summary, then one JSON object as the last line. "
                    "(--n-aug is not used: the two whole runs use --n-values.)")
    p.add_argument("image", help="CT: NIfTI, NRRD, MHA, or a DICOM series folder")
    p.add_argument("--boxes", required=True, help="box file (JSON, voxel indices)")
    p.add_argument("--labels", help="label map of the image: per-organ Dice of each encoder path")
    p.add_argument("--encoders", default="eager,auto",
                   help="encoder paths to time, comma-separated: eager, auto, onnx, onnx-int8 "
                        "(default eager,auto; auto is what segment uses)")
    p.add_argument("--n-values", default="1,3", help="augmented boxes of the two whole runs (default 1,3)")
    p.add_argument("--timing-slices", type=int, default=4, help="slices sampled for the encoder timing (default 4)")
    p.add_argument("--rounds", type=int, default=2, help="interleaved rounds of encoder and decoder timing (default 2)")
    p.add_argument("--repeat", type=int, default=1, help="repeats of the whole n=1 / n=3 runs (median; default 1)")
    p.add_argument("--json", dest="json_out", help="also write the JSON record to this file")
    add_sam_options(p)
    add_method_options(p)
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


def main(args):
    from ..atomic import atomic_write_text
    from ..evaluation.bench import dumps, run_bench
    from ..sam.backends import make_backend

    encoders = [e.strip() for e in args.encoders.split(",") if e.strip()]
    if not encoders:
        raise URSAMError("--encoders needs at least one encoder path")
    for name, value in (("--timing-slices", args.timing_slices), ("--rounds", args.rounds), ("--repeat", args.repeat)):
        if value < 1:
            raise URSAMError(f"{name} must be at least 1, got {value}")
    n_values = _n_values(args.n_values)
    params = params_from_args(args)
    progress = Progress(quiet=True)

    def make(encoder):
        return make_backend(args.backend, args.checkpoint, args.device,
                            window=args.window if args.window else "default", encoder=encoder)

    record = run_bench(args.image, args.boxes, make, params, labels=args.labels, encoders=encoders,
                       n_values=n_values, timing_slices=args.timing_slices, rounds=args.rounds,
                       repeat=args.repeat, log=lambda m: print(m, flush=True))
    if progress.warnings:
        record["warnings"] = list(progress.warnings)
    line = dumps(record)
    if args.json_out:
        atomic_write_text(args.json_out, line + "\n")
    print(line)
    return 0
