"""Peak memory of a whole run on a large CT (issue: memory stays bounded as the scan grows).

Resamples the shared abdomen CT tsA (3 mm) to a 512x512x400 grid with its labels, takes the boxes of
every labelled organ, runs the whole pipeline (LiteMedSAM, n augmented boxes, rectification) and writes
every output, then prints the peak resident memory of the process (ru_maxrss) and the run's seconds.
The last line is one JSON object.

    python3 benchmarks/memory_large_ct.py [--size 512,512,400] [--n-aug 3] [--out /tmp/ursam_mem]
"""
import argparse
import json
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "URSAM"))

from URSAMLib.boxes import boxes_from_labels, read_names  # noqa: E402
from URSAMLib.pipeline import Params  # noqa: E402
from URSAMLib.progress import Progress  # noqa: E402
from URSAMLib.sam_backend import make_backend  # noqa: E402
from URSAMLib.segment import segment_volume, write_results  # noqa: E402


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
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    size = [int(v) for v in args.size.split(",")]
    data = Path(args.data)
    ct = resample(sitk.ReadImage(str(data / "cases/tsA/image.nii.gz")), size, sitk.sitkLinear)
    lab = resample(sitk.ReadImage(str(data / "cases/tsA/labels.nii.gz")), size, sitk.sitkNearestNeighbor)
    volume = sitk.GetArrayFromImage(ct).astype(np.float32)
    labels = sitk.GetArrayFromImage(lab)
    reference = sitk.Image(ct.GetSize(), sitk.sitkUInt8)
    reference.CopyInformation(ct)
    boxes = boxes_from_labels(labels, read_names(data / "dataset.json"))
    del ct, lab
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    backend = make_backend("litemedsam", device="cpu")
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp()) / "out"
    t0 = time.perf_counter()
    result = segment_volume(volume, reference, boxes, backend, Params(n_aug=args.n_aug),
                            progress=Progress(quiet=False))
    write_results(result, out, overwrite=True)
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    figures = {"size_xyz": size, "organs": len(boxes), "distinct_slices": result.timings["distinct_slices"],
               "n_aug": args.n_aug, "seconds": round(seconds, 1), "peak_rss_mb": round(peak, 1),
               "rss_after_loading_ct_mb": round(rss_before, 1),
               "volume_mb": round(volume.nbytes / 2**20, 1)}
    print(f"{len(boxes)} organs on a {size} CT: peak RSS {peak:.0f} MB, {seconds:.0f} s")
    print(json.dumps(figures))
    if not args.out:
        shutil.rmtree(out.parent, ignore_errors=True)


if __name__ == "__main__":
    main()
