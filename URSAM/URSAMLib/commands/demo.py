"""``ursam demo``: the automatic pipeline end to end on a synthetic CT cohort (no data needed)."""
from __future__ import annotations

from ..errors import URSAMError
from ..evaluation.phantom import PhantomGrid
from ..pipeline import Params
from ..progress import STAGE_MODEL, Progress
from ..settings import Settings


def add_parser(sub):
    p = sub.add_parser("demo", help="run the whole pipeline on a synthetic CT cohort (no data needed)",
                       description="Make a small synthetic abdominal CT cohort, build a template library from "
                                   "some patients, localize and segment another with LiteMedSAM, write the "
                                   "outputs of `ursam segment` and print the Dice table.")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--templates", type=int, default=3, metavar="N",
                   help="number of template patients (default 3)")
    p.add_argument("--size", default="128,128,36", metavar="X,Y,Z",
                   help="voxels of each synthetic CT (default 128,128,36: 3 mm pixels, 5 mm slices)")
    p.add_argument("--seed", type=int, default=0, help="seed of the cohort and of the prompts (default 0)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda (default: auto)")
    p.add_argument("--calibrate", action="store_true",
                   help="calibrate the atlas-SAM fusion on the demo's template library first (leave one out; "
                        "needs --templates 3 or more), then segment with it")
    p.add_argument("--overwrite", action="store_true", help="replace the files of a non-empty output folder")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=main)
    return p


def parse_size(text):
    try:
        size = tuple(int(v) for v in str(text).split(","))
    except ValueError:
        size = ()
    if len(size) != 3 or min(size) < 16 or max(size) > 512:
        raise URSAMError(f"--size must be X,Y,Z with 16..512 voxels each, got {text!r}")
    return size


def main(args):
    from ..evaluation.demo import run_demo  # noqa: PLC0415 (imports torch: loads only where a model runs)
    from ..sam.backends import make_backend  # noqa: PLC0415 (imports torch: loads only where a model runs)

    size = parse_size(args.size)
    # The phantom keeps its field of view in mm: fewer voxels mean larger ones.
    base = PhantomGrid()
    spacing = tuple(b * s0 / s for b, s0, s in zip(base.spacing, base.size, size))
    progress = Progress(quiet=args.quiet)
    progress.stage(f"{STAGE_MODEL} litemedsam")
    backend = make_backend("litemedsam", device=args.device)
    summary = run_demo(args.out, n_templates=args.templates, grid=PhantomGrid(size, spacing), seed=args.seed,
                       backend=backend, settings=Settings(params=Params(seed=args.seed)), progress=progress,
                       overwrite=args.overwrite, calibrate=args.calibrate)
    print(summary["note"])
    print(summary["table"])
    print(f"outputs of `ursam segment` in {args.out}/segment; template library in {args.out}/templates")
    return 0
