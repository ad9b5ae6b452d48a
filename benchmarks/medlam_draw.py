"""Seconds per MedLAM training batch: the numpy reference sampler against the torch sampler.

Both draw the same kind of batch (``--batch`` scans x ``--patches`` augmented
patch pairs of ``--size``^3 voxels) from real scans prepared as training
prepares them (3 mm, HU mapping), on this machine's CPU or a CUDA device::

    python benchmarks/medlam_draw.py ../shared/data/hn-openkbp --scans 6 --cache /tmp/medlam_cache

It prints the CPU model, the load average (another job on the machine slows
both samplers), the seconds per batch of each sampler (the median of
``--repeats`` batches, after one unmeasured batch of the torch sampler) and
their ratio, all measured in this one run.
"""
import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "URSAM"))

from URSAMLib.commands.train_localizer import find_images  # noqa: E402
from URSAMLib.medlam.bank import VolumeBank  # noqa: E402
from URSAMLib.medlam.checkpoint import pick_device  # noqa: E402
from URSAMLib.medlam.draw import draw_batch as draw_tensor_batch  # noqa: E402
from URSAMLib.medlam.network import NetConfig  # noqa: E402
from URSAMLib.medlam.sampling import AugmentConfig, draw_batch  # noqa: E402
from URSAMLib.medlam.training import load_volumes  # noqa: E402
from URSAMLib.progress import Progress  # noqa: E402


def cpu_model():
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def timed(draw, repeats, sync=None):
    """Seconds of each of ``repeats`` calls of ``draw``."""
    seconds = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        draw()
        if sync:
            sync()
        seconds.append(time.perf_counter() - t0)
    return seconds


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("data", help="dataset folder with dataset.json")
    ap.add_argument("--role", default="extra", help="dataset.json cases to read (default: extra)")
    ap.add_argument("--scans", type=int, default=6, help="scans to draw from (default 6)")
    ap.add_argument("--batch", type=int, default=16, help="scans per batch (default 16)")
    ap.add_argument("--patches", type=int, default=2, help="patches per scan (default 2)")
    ap.add_argument("--size", type=int, default=64, help="patch side in voxels (default 64)")
    ap.add_argument("--repeats", type=int, default=3, help="measured batches of each sampler (default 3)")
    ap.add_argument("--device", default="cpu", help="torch sampler's device: cpu, cuda or auto (default cpu)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cache", help="folder for the prepared scans (reused by later runs)")
    args = ap.parse_args()

    device = pick_device(args.device)
    paths = find_images(args.data, args.role)[:args.scans]
    volumes = load_volumes(paths, NetConfig(patch_size=args.size), Progress(quiet=True), args.cache)
    aug = AugmentConfig()
    print(f"CPU: {cpu_model()} ({os.cpu_count()} cores), load average {os.getloadavg()[0]:.1f} at the start")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, sampler device {device}")
    print(f"batch: {args.batch} scans x {args.patches} patches of {args.size}^3, from {len(volumes)} scans "
          f"({', '.join(Path(p).parent.name for p in paths)})")

    rng = np.random.default_rng(args.seed)
    ref = timed(lambda: draw_batch(volumes, args.batch, args.size, aug, rng, args.patches), args.repeats)

    bank = VolumeBank(volumes, device)
    gen = torch.Generator(device=device).manual_seed(args.seed)
    sync = torch.cuda.synchronize if device.startswith("cuda") else None

    def draw():
        return draw_tensor_batch(bank, args.batch, args.size, aug, gen, args.patches,
                                 workers=torch.get_num_threads())

    timed(draw, 1, sync)  # first call: allocations and kernel setup, not the steady state
    fast = timed(draw, args.repeats, sync)

    a, b = statistics.median(ref), statistics.median(fast)
    print(f"numpy sampler: {a:.3f} s per batch (median of {len(ref)}: {', '.join(f'{s:.3f}' for s in ref)})")
    print(f"torch sampler: {b:.3f} s per batch (median of {len(fast)}: {', '.join(f'{s:.3f}' for s in fast)})")
    print(f"ratio: torch is {a / b:.1f}x faster; load average {os.getloadavg()[0]:.1f} at the end")


if __name__ == "__main__":
    main()
