"""SAM ViT-B/L/H and MedSAM encoders through OpenVINO on the CPU: conversion, time per slice, same masks.

    python benchmarks/sam_encoder_paths.py [--backend sam-vit-b] [--paths openvino,openvino-bf16]
                                           [--slices 2] [--cache DIR]

No checkpoint exists here, so the backend's model is built with randomly
initialised, seeded weights (``torch.manual_seed(0)``) and saved to a
temporary checkpoint, which the backend then loads as a user's would. The
one-off conversion (into ``--cache``, default a temporary folder, as
``$URSAM_CACHE``) is timed with the process's peak resident memory before
and after it. Then, on real slices of abdomen-ts tsA_slab: milliseconds per
slice of eager PyTorch and of each path (after a warm-up call), the largest
feature difference from eager, and the masks of the organs' boxes decoded
from each embedding against eager's (pixels that differ, worst Dice). The
last line is one JSON object.
"""
import argparse
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "URSAM"))

from URSAMLib.boxes import boxes_from_labels  # noqa: E402
from URSAMLib.metrics import dice  # noqa: E402

CASE = ROOT.parent / "shared" / "data" / "abdomen-ts" / "cases" / "tsA_slab"
KINDS = {"sam-vit-b": "vit_b", "sam-vit-l": "vit_l", "sam-vit-h": "vit_h", "medsam": "vit_b"}


def peak_rss_mb():
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--backend", default="sam-vit-b", choices=sorted(KINDS))
    p.add_argument("--paths", default="openvino,openvino-bf16")
    p.add_argument("--slices", type=int, default=2)
    p.add_argument("--cache", help="cache folder for the converted model (default: a temporary one)")
    args = p.parse_args()
    from segment_anything import sam_model_registry  # noqa: PLC0415 (optional backend package)

    from URSAMLib.sam.backends import make_backend  # noqa: PLC0415 (imports torch: loads only where a model runs)

    record = {"backend": args.backend, "threads": torch.get_num_threads(), "torch": torch.__version__}
    work = tempfile.TemporaryDirectory(prefix="ursam-sam-")
    os.environ["URSAM_CACHE"] = args.cache or str(Path(work.name) / "cache")
    torch.manual_seed(0)
    ckpt = Path(work.name) / "random.pth"
    torch.save(sam_model_registry[KINDS[args.backend]](checkpoint=None).state_dict(), ckpt)
    eager = make_backend(args.backend, str(ckpt), device="cpu", encoder="eager")
    record["peak_rss_mb_eager_backend"] = peak_rss_mb()
    backends = {}
    for path in [s.strip() for s in args.paths.split(",") if s.strip()]:
        t0 = time.perf_counter()
        backends[path] = make_backend(args.backend, str(ckpt), device="cpu", encoder=path)
        record[f"{path}_build_seconds"] = round(time.perf_counter() - t0, 1)  # conversion on the first
        record[f"peak_rss_mb_after_{path}"] = peak_rss_mb()
        print(f"{path}: built in {record[f'{path}_build_seconds']} s, peak RSS {peak_rss_mb()} MiB", flush=True)

    image = sitk.GetArrayFromImage(sitk.ReadImage(str(CASE / "image.nii.gz"))).astype(np.float32)
    truth = sitk.GetArrayFromImage(sitk.ReadImage(str(CASE / "labels.nii.gz")))
    names = {int(k): v for k, v in json.loads((CASE.parents[1] / "dataset.json").read_text())["labels"].items()}
    boxes = boxes_from_labels(truth, names, labels=[1, 2, 3, 13])
    prompts = np.array([b.xyxy() for b in boxes], np.float32)
    zs = np.linspace(8, 22, args.slices).round().astype(int)
    for b in [eager] + list(backends.values()):
        b.embed(image[zs[0]])  # warm-up
    ms = {name: [] for name in ["eager"] + list(backends)}
    checks = {name: {"max_feature_diff": 0.0, "pixels_differing": 0, "worst_mask_dice": 1.0} for name in backends}
    for z in zs:
        t0 = time.perf_counter()
        ref = eager.embed(image[z])
        ms["eager"].append((time.perf_counter() - t0) * 1e3)
        probs_ref = eager.decode(ref, prompts) > 0.5
        for name, b in backends.items():
            t0 = time.perf_counter()
            emb = b.embed(image[z])
            ms[name].append((time.perf_counter() - t0) * 1e3)
            c = checks[name]
            c["max_feature_diff"] = max(c["max_feature_diff"], float((emb["features"] - ref["features"]).abs().max()))
            masks = b.decode(emb, prompts) > 0.5
            c["pixels_differing"] += int(np.count_nonzero(masks != probs_ref))
            for m, r in zip(masks, probs_ref):
                if m.any() or r.any():
                    c["worst_mask_dice"] = min(c["worst_mask_dice"], round(float(dice(m, r)), 5))
    record["ms_per_slice"] = {k: round(float(np.median(v)), 1) for k, v in ms.items()}
    record["speedup_vs_eager"] = {k: round(record["ms_per_slice"]["eager"] / v, 2)
                                  for k, v in record["ms_per_slice"].items()}
    record["checks_vs_eager"] = checks
    record["mask_pixels"] = int(prompts.shape[0] * image.shape[1] * image.shape[2] * len(zs))
    record["peak_rss_mb"] = peak_rss_mb()
    record["load_average"] = round(os.getloadavg()[0], 1)
    work.cleanup()
    print(json.dumps(record))


if __name__ == "__main__":
    main()
