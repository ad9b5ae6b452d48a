"""``ursam train-localizer``: train the MedLAM localizer on unlabelled CT (METHOD.md §1)."""
from __future__ import annotations

import json
from pathlib import Path

from ..errors import URSAMError
from ..imageio import IMAGE_SUFFIXES
from ..medlam.budget import RULE as BATCH_RULE
from ..progress import Progress


def _numbers(text, n, what, cast=float):
    try:
        values = [cast(v) for v in str(text).split(",")]
    except ValueError:
        raise URSAMError(f"{what} must be {n} comma-separated numbers, got {text!r}") from None
    if len(values) != n:
        raise URSAMError(f"{what} needs {n} numbers, got {text!r}")
    return tuple(values)


def _is_image(path):
    name = path.name.lower()
    return path.is_file() and name.endswith(IMAGE_SUFFIXES) and not name.startswith(".")


def find_images(source, role="extra"):
    """CT paths from a folder, a dataset folder (dataset.json: the ``role`` cases) or a list file."""
    src = Path(source)
    if not src.exists():
        raise URSAMError("--images not found", src)
    if src.is_file():
        if _is_image(src):
            raise URSAMError("--images needs a folder or a text file listing scans, not one image", src)
        base = src.parent
        try:
            lines = src.read_text(encoding="utf-8").splitlines()
        except UnicodeDecodeError:
            raise URSAMError("--images list is not a text file (one scan path per line)", src) from None
        paths = []
        for line in lines:
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            p = Path(line) if Path(line).is_absolute() else base / line
            if not p.exists():
                raise URSAMError(f"scan listed in {src} not found", p)
            paths.append(p)
        if not paths:
            raise URSAMError("--images list names no scans", src)
        return paths
    meta = src / "dataset.json"
    if meta.exists():
        try:
            data = json.loads(meta.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise URSAMError(f"dataset.json is not valid JSON ({err.msg})", meta) from None
        ids = data.get(role) if isinstance(data, dict) else None
        if not isinstance(ids, list) or not ids:
            roles = [k for k, v in data.items() if isinstance(v, list)] if isinstance(data, dict) else []
            raise URSAMError(f"dataset.json has no '{role}' cases (roles: {', '.join(roles) or 'none'})", meta)
        paths = []
        for case in ids:
            folder = src / "cases" / str(case)
            found = [p for p in sorted(folder.glob("image*")) if _is_image(p)]
            if not found:
                raise URSAMError(f"no image file for case {case}", folder)
            paths.append(found[0])
        return paths
    paths = sorted(p for p in src.iterdir() if _is_image(p) and "label" not in p.name.lower())
    if not paths:
        raise URSAMError(f"no CT images ({', '.join(IMAGE_SUFFIXES)}) in the folder", src)
    return paths


def add_parser(sub):
    p = sub.add_parser(
        "train-localizer", help="train the MedLAM landmark localizer on unlabelled CT",
        description="Self-supervised training of MedLAM (METHOD.md §1): the offset between two random "
                    "patches of a scan, plus multi-scale feature matching between a patch and its "
                    "augmented copy. No labels are used. The checkpoint stores the network settings, "
                    "the step, the seed and the optimizer state; --resume continues it.")
    p.add_argument("--images", required=True,
                   help="folder of CT files, a dataset folder with dataset.json (uses --role cases), "
                        "or a text file with one scan path per line")
    p.add_argument("--role", default="extra",
                   help="dataset.json role to train on when --images is a dataset folder (default: extra; "
                        "never train on the scans you report on)")
    p.add_argument("--out", required=True, help="checkpoint file to write (atomically, every --save-every steps)")
    p.add_argument("--resume", action="store_true",
                   help="continue the checkpoint at --out with its stored network and training settings "
                        "(only the length, --max-minutes, --save-every and --log-every apply)")
    length = p.add_mutually_exclusive_group()
    length.add_argument("--iterations", type=int, help="optimizer steps in total")
    length.add_argument("--epochs", type=float,
                        help="passes over the training scans (one pass: one example per scan); default 1")
    p.add_argument("--max-minutes", type=float, help="stop (and save) after this many minutes")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda (default: auto)")
    p.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--batch-size", type=int,
                   help=f"scans per step (default: {BATCH_RULE.replace('%', '%%')}; a resumed run keeps its checkpoint's)")
    p.add_argument("--sampler", choices=("torch", "numpy"), default="torch",
                   help="how batches are drawn: torch (default): the scans held on the training device and "
                        "every patch of a batch augmented at once with tensor operations; numpy: the reference "
                        "sampler, one patch at a time with scipy (slow; stored in the checkpoint, so a resumed "
                        "run keeps its own)")
    p.add_argument("--draw-threads", type=int,
                   help="CPU training: threads that draw a batch with the torch sampler, each on whole "
                        "examples (default: torch's thread count; the batches do not depend on it)")
    p.add_argument("--patches-per-scan", type=int, default=2,
                   help="patches drawn from each scan; every pair feeds the offset loss (default 2)")
    p.add_argument("--lr", type=float, default=2e-4, help="Adam learning rate (default 2e-4)")
    p.add_argument("--save-every", type=int, default=50, help="steps between checkpoints (default 50)")
    p.add_argument("--log-every", type=int, default=10, help="steps between progress lines (default 10)")
    p.add_argument("--cache", help="folder to keep the prepared 3 mm scans in (reused by later runs)")
    n = p.add_argument_group("network (stored in the checkpoint; defaults: the paper's)")
    n.add_argument("--widths", default="48,48,96,192,384", help="encoder widths, 5 numbers")
    n.add_argument("--feature-channels", type=int, default=None,
                   help="channels of the decoder features (default: the third width, 96 for the paper)")
    n.add_argument("--patch-size", type=int, default=64, help="patch side in voxels (default 64)")
    n.add_argument("--range-mm", default="1500,600,600", help="r in mm, Z,Y,X (default 1500,600,600)")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.set_defaults(func=main)
    return p


def main(args):
    import torch  # noqa: PLC0415 (torch loads only where a model runs)

    from ..medlam.checkpoint import pick_device  # noqa: PLC0415 (imports torch: loads only where a model runs)
    from ..medlam.network import NetConfig  # noqa: PLC0415 (imports torch: loads only where a model runs)
    from ..medlam.training import TrainSettings, fit_batch_size, train  # noqa: PLC0415 (imports torch: loads only where a model runs)

    progress = Progress(quiet=args.quiet)
    for name in ("batch_size", "patches_per_scan", "save_every", "log_every", "draw_threads"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise URSAMError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.patches_per_scan < 2:
        raise URSAMError("--patches-per-scan must be at least 2 (the offset needs a pair)")
    if args.iterations is not None and args.iterations < 1:
        raise URSAMError(f"--iterations must be at least 1, got {args.iterations}")
    if args.epochs is not None and args.epochs <= 0:
        raise URSAMError(f"--epochs must be positive, got {args.epochs}")
    if args.threads:
        torch.set_num_threads(args.threads)
    images = find_images(args.images, args.role)
    widths = _numbers(args.widths, 5, "--widths", int)
    user_net = any(getattr(args, k) != v for k, v in
                   (("widths", "48,48,96,192,384"), ("feature_channels", None), ("patch_size", 64),
                    ("range_mm", "1500,600,600")))
    try:
        config = NetConfig(widths=widths,
                           feature_channels=args.feature_channels or widths[2],
                           patch_size=args.patch_size,
                           range_mm=_numbers(args.range_mm, 3, "--range-mm"))
    except ValueError as err:
        raise URSAMError(f"network settings: {err}") from None
    batch_size = args.batch_size
    if batch_size is None:
        batch_size, why = fit_batch_size(config, args.patches_per_scan, pick_device(args.device))
        if not args.resume:
            progress.info(f"batch size {why}")
    n_train = max(len(images) - min(4, max(len(images) - 2, 0)), 1)
    steps_per_epoch = max(1, -(-n_train // batch_size))
    steps = args.iterations if args.iterations is not None else \
        max(1, int(round((args.epochs or 1.0) * steps_per_epoch)))
    settings = TrainSettings(steps=steps, batch_size=batch_size, patches_per_scan=args.patches_per_scan,
                             lr=args.lr, seed=args.seed, save_every=args.save_every, log_every=args.log_every,
                             max_minutes=args.max_minutes, sampler=args.sampler)
    stats = {}
    out = train(images, args.out, settings, config if (user_net or not args.resume) else None,
                device=args.device, resume=args.resume, progress=progress, cache_dir=args.cache,
                draw_workers=args.draw_threads, stats=stats)
    print(f"checkpoint: {out}")
    if stats.get("steps"):
        total = stats["draw_seconds"] + stats["step_seconds"]
        print(f"speed: {stats['steps_per_second']:.3f} steps/s on {stats['device']} ({stats['sampler']} sampler, "
              f"{stats['batch_size']} x {stats['patches_per_scan']} patches); per step: drawing "
              f"{stats['draw_seconds']:.3f} s ({100 * stats['draw_seconds'] / max(total, 1e-9):.0f}%), network "
              f"{stats['step_seconds']:.3f} s")
    return 0
