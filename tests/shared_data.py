"""The real data in ../shared/data, for every test module (import it as ``shared_data``).

Kept apart from conftest.py: with conftest files in sub-folders, ``import conftest``
would find whichever was imported first.
"""
import json
import os
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from URSAMLib.imageio import Scan
from URSAMLib.localizers import BoxSource
from URSAMLib.pipeline import Params
from URSAMLib.prompt_modes import PromptOptions
from URSAMLib.runner import ScanJob, run_scan
from URSAMLib.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("URSAM_DATA", ROOT.parent / "shared" / "data"))
ABD = DATA / "abdomen-ts"
HN = DATA / "hn-openkbp"


def case(dataset, case_id):
    folder = dataset / "cases" / case_id
    return folder / "image.nii.gz", folder / "labels.nii.gz"


def names(dataset):
    return {int(k): v for k, v in json.loads((dataset / "dataset.json").read_text(encoding="utf-8"))["labels"].items()}


def paper_settings(**params):
    """The run's settings with the paper's box3d prompt (boxes without per-slice boxes) and these Params; the
    margin is the source's (none for given boxes)."""

    return Settings(params=Params(**params), prompts=PromptOptions(mode="box3d"), margin=None)


def segment_boxes(volume, reference, boxes, backend, settings, baselines=None):
    """The result of a run on a scan in memory with these boxes (:func:`URSAMLib.runner.run_scan`)."""

    job = ScanJob(Scan(reference, volume, "memory", "memory"), BoxSource(list(boxes)), settings,
                  baselines=baselines or {})
    return run_scan(job, lambda percentile: backend).result


#: the small fusion library: three H&N supports cropped to the brainstem and the left parotid
SMALL_LIBRARY_CASES = ("pt_4", "pt_13", "pt_17")
SMALL_LIBRARY_ORGANS = {1: "Brainstem", 4: "Parotid_L"}


def organ_slab(folder, values=tuple(SMALL_LIBRARY_ORGANS)):
    """``(image, labels)`` of a case's slices that hold ``values`` (and one more at each end), its labels
    kept for those values only (SimpleITK images)."""

    image = sitk.ReadImage(str(folder / "image.nii.gz"))
    labels = sitk.ReadImage(str(folder / "labels.nii.gz"))
    arr = sitk.GetArrayFromImage(labels)
    z = np.flatnonzero(np.isin(arr, list(values)).any((1, 2)))
    lo, hi = max(0, int(z.min()) - 1), min(image.GetSize()[2], int(z.max()) + 2)
    kept = sitk.GetImageFromArray(np.where(np.isin(arr, list(values)), arr, 0).astype(np.uint8))
    kept.CopyInformation(labels)
    return image[:, :, lo:hi], kept[:, :, lo:hi]


def make_small_library(folder):
    """The small fusion library in ``folder`` (a small, fast library of real scans)."""

    for c in SMALL_LIBRARY_CASES:
        (folder / "cases" / c).mkdir(parents=True)
        image, labels = organ_slab(HN / "cases" / c)
        sitk.WriteImage(image, str(folder / "cases" / c / "image.nii.gz"))
        sitk.WriteImage(labels, str(folder / "cases" / c / "labels.nii.gz"))
    (folder / "dataset.json").write_text(json.dumps({"labels": {str(k): v for k, v in SMALL_LIBRARY_ORGANS.items()},
                                                     "support": list(SMALL_LIBRARY_CASES)}))
    return folder
