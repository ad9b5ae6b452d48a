"""Fixtures for the Slicer-side tests: real MRML scenes from the PyPI package slicer-core (see slicer_scene.py)."""
import os
import sys
from pathlib import Path

import pytest
import SimpleITK as sitk

ROOT = Path(__file__).resolve().parents[2]
MODULE_DIR = ROOT / "URSAM"
if str(MODULE_DIR) not in sys.path:
    sys.path.insert(0, str(MODULE_DIR))  # as Slicer puts a scripted module's folder on sys.path

slicer = pytest.importorskip("slicer", reason="the Slicer-side tests need the PyPI package slicer-core")

DATA = Path(os.environ.get("URSAM_DATA", ROOT.parent / "shared" / "data"))
ABD = DATA / "abdomen-ts"


@pytest.fixture
def app():
    from slicer_scene import SlicerApp  # noqa: PLC0415 (needs slicer-core, which the module skips without)

    return SlicerApp()


@pytest.fixture(scope="session")
def slab_paths():
    folder = ABD / "cases" / "tsA_slab"
    image, labels = folder / "image.nii.gz", folder / "labels.nii.gz"
    if not image.is_file():
        pytest.fail(f"missing shared CT: {image} (tests read ../shared/data, or URSAM_DATA)")
    return image, labels


#: slices of tsA_slab in the small query crop; spleen and right kidney are on all of them
CROP = (10, 17)


@pytest.fixture(scope="session")
def crop_paths(slab_paths, tmp_path_factory):
    """A 7-slice crop of tsA_slab (image, labels), so that a slice-mode run costs about 7 encoder calls."""

    folder = tmp_path_factory.mktemp("crop")
    out = []
    for path, name in zip(slab_paths, ("image.nii.gz", "labels.nii.gz")):
        image = sitk.ReadImage(str(path))
        sitk.WriteImage(image[:, :, CROP[0]:CROP[1]], str(folder / name))
        out.append(folder / name)
    return out
