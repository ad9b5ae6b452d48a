"""``ursam evaluate``: every method on every query case of a dataset, the paper's table."""
from __future__ import annotations

from ..calibration.file import find_calibration
from ..evaluation.evaluate import ALL_METHODS, evaluate, markdown_table, parse_methods
from ..progress import Progress
from ..prompt_modes import default_mode, parse_modes
from ..templates import Library
from .options import (
    add_calibration_options,
    add_executor_options,
    add_localizer_options,
    add_method_options,
    add_prompt_options,
    add_sam_options,
    backend_options_from_args,
    executor_from_args,
    localizer_options,
    settings_from_args,
    uses_calibration,
)


def add_parser(sub):
    p = sub.add_parser("evaluate", help="score every method on a dataset's query cases",
                       description="Localize from the support scans, run SAM once per slice for all methods, "
                                   "score Dice/HD95 over the whole volume and write results.csv, table.md "
                                   "(the paper's layout) and a box plot. A rerun skips finished cases.")
    p.add_argument("dataset", metavar="DATASET", help="dataset folder: dataset.json with query cases, cases/<id>/")
    p.add_argument("--support-from", metavar="LIB",
                   help="template library of the supports (default: DATASET's own support list)")
    p.add_argument("--methods", default=",".join(ALL_METHODS),
                   help=f"comma-separated methods (default: all: {','.join(ALL_METHODS)})")
    p.add_argument("--cases", help="comma-separated case ids (default: DATASET's query list)")
    p.add_argument("--sweep", action="store_true",
                   help="also score UR-SAM under the rectification settings of METHOD.md §4 "
                        "(sweep.csv, sweep.md; no extra SAM run)")
    p.add_argument("--out", required=True, help="output folder (reused by a rerun)")
    p.add_argument("--overwrite", action="store_true",
                   help="start anew where the folder holds an evaluation with other settings")
    p.add_argument("--quiet", action="store_true", help="no progress messages")
    add_calibration_options(p, library="the support library")
    add_executor_options(p, what="cases", default_local=False)
    add_localizer_options(p, templates=False)
    add_sam_options(p)
    add_method_options(p)
    add_prompt_options(p, several=True)
    p.set_defaults(func=main)
    return p


def main(args):
    progress = Progress(quiet=args.quiet)
    methods = parse_methods(args.methods)
    cases = [c.strip() for c in args.cases.split(",") if c.strip()] if args.cases else None
    modes = parse_modes(args.prompts) if args.prompts else [default_mode(args.localizer)]
    settings = settings_from_args(args, mode=modes[0]).resolved()
    support = Library(args.support_from) if args.support_from else Library(args.dataset, role="support")
    calibration = find_calibration(support, args.calibration, progress, use=uses_calibration(args))
    executor = executor_from_args(args, default_local=False)
    kwargs = dict(methods=methods, support_from=args.support_from, cases=cases, settings=settings,
                  localizer_options=localizer_options(args), sweep=args.sweep, progress=progress,
                  overwrite=args.overwrite, organs=args.organs, prompt_modes=modes,
                  backend_options=backend_options_from_args(args), calibration=calibration,
                  review_threshold=args.review_threshold)
    if executor is None:
        summary = evaluate(args.dataset, args.out, **kwargs)
    else:
        with executor:
            summary = evaluate(args.dataset, args.out, executor=executor, **kwargs)
    table = summary["dice_table"]
    organs = [o for o in next(iter(table.values())) if o != "Avg"] if table else []
    print(markdown_table(table, organs))
    if summary.get("modes_table"):
        print(summary["modes_table"])
    if summary.get("quality_table"):
        print(summary["quality_table"])
    print(f"wrote results.csv, table.md and dice_boxplot.png to {args.out} ({len(summary['cases'])} cases)")
    return 0
