"""Peak memory of a whole run on a large CT (memory must stay bounded as the scan grows).

Resamples the shared abdomen CT tsA (3 mm) to a 512x512x400 grid with its labels, writes it as NIfTI
with the boxes of every labelled organ, runs `ursam segment` on it in its own process (LiteMedSAM, n
augmented boxes, rectification, every output written), then prints that process's peak resident memory
(ru_maxrss) and its seconds. The last line is one JSON object.

    python3 benchmarks/memory_large_ct.py [--size 512,512,400] [--n-aug 3] [--work /tmp/ursam_mem]
"""
import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "URSAM"))

from URSAMLib.boxes import boxes_from_labels, read_names, save_boxes  # noqa: E402


def resample(image, size, interpolator):
    old_size = np.array(image.GetSize(), float)
    spacing = np.array(image.GetSpacing()) * old_size / np.array(size, float)
    return sitk.Resample(image, [int(s) for s in size], sitk.Transform(), interpolator, image.GetOrigin(),
                         spacing.tolist(), image.GetDirection(), -1024 if interpolator != sitk.sitkNearestNeighbor else 0,
                         image.GetPixelID())


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "abdomen-ts"))
    ap.add_argument("--size", default="512,512,400")
    ap.add_argument("--n-aug", type=int, default=3)
    ap.add_argument("--work", default=None, help="folder for the large CT and the outputs (default: a temp folder)")
    args = ap.parse_args()
    size = [int(v) for v in args.size.split(",")]
    data = Path(args.data)
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="ursam_mem_"))
    work.mkdir(parents=True, exist_ok=True)
    ct = resample(sitk.ReadImage(str(data / "cases/tsA/image.nii.gz")), size, sitk.sitkLinear)
    lab = resample(sitk.ReadImage(str(data / "cases/tsA/labels.nii.gz")), size, sitk.sitkNearestNeighbor)
    sitk.WriteImage(ct, str(work / "ct.nii.gz"))
    boxes = boxes_from_labels(sitk.GetArrayFromImage(lab), read_names(data / "dataset.json"))
    save_boxes(boxes, work / "boxes.json")
    del ct, lab
    # The run is its own process, as a user would start it: its peak is the tool's, not this script's.
    cmd = [sys.executable, "-m", "URSAMLib.cli", "segment", str(work / "ct.nii.gz"), "--boxes",
           str(work / "boxes.json"), "--out", str(work / "out"), "--overwrite", "--n-aug", str(args.n_aug),
           "--device", "cpu"]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True)
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    report = json.loads((work / "out" / "report.json").read_text(encoding="utf-8"))
    figures = {"size_xyz": size, "organs": len(boxes), "distinct_slices": report["timings_seconds"]["distinct_slices"],
               "n_aug": args.n_aug, "seconds": round(seconds, 1), "peak_rss_mb": round(peak, 1),
               "encoder": report["backend"].get("encoder")}
    print(f"ursam segment, {len(boxes)} organs on a {size} CT: peak RSS {peak:.0f} MB, {seconds:.0f} s")
    print(json.dumps(figures))
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
