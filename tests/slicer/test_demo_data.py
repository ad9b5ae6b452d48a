"""The module's demo data: the synthetic library and query CT of ``ursam demo``, made offline and loaded."""
import json
import os

import numpy as np
import pytest
import SimpleITK as sitk
import slicer
from slicer_scene import SlicerApp

from URSAMLib.evaluation.demo import make_demo_data
from URSAMLib.templates import Library
from URSAMMRML import demo, geometry


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    folder = tmp_path_factory.mktemp("demo") / "URSAM-demo"
    app = SlicerApp()
    volume, library = demo.loadDemo(app.scene, folder)
    return app, folder, volume, library


def test_the_demo_is_the_data_ursam_demo_makes(loaded, tmp_path):
    app, folder, volume, library = loaded
    lib, query = make_demo_data(tmp_path)  # what `ursam demo` makes, with its defaults
    assert Library(library).case_ids() == lib.case_ids() and len(lib.case_ids()) == 3
    assert Library(library).names == lib.names
    expected = sitk.GetArrayFromImage(sitk.ReadImage(str(query.image_path)))
    assert np.array_equal(slicer.util.arrayFromVolume(volume), expected)
    assert np.allclose(geometry.ijkToRas(volume), geometry.ijkToRasFromImage(sitk.ReadImage(str(query.image_path))))
    assert volume.GetName() == demo.DEMO_VOLUME_NAME and volume.GetDisplayNode() is not None


def test_the_demo_is_made_once_and_reused(loaded):
    app, folder, volume, library = loaded
    stamp = folder / demo.STAMP
    made = stamp.stat().st_mtime_ns
    ids = app.nodeIDs()
    again, library_again = demo.loadDemo(app.scene, folder)
    assert again is volume and library_again == library and app.nodeIDs() == ids
    assert stamp.stat().st_mtime_ns == made
    # a stamp of another version is made again, whole
    stamp.write_text(json.dumps({"seed": 0, "templates": 3, "ursam_version": "0.0.0"}), encoding="utf-8")
    fresh = SlicerApp()
    other, _ = demo.loadDemo(fresh.scene, folder)
    assert json.loads(stamp.read_text(encoding="utf-8"))["ursam_version"] != "0.0.0"
    assert np.array_equal(slicer.util.arrayFromVolume(other), slicer.util.arrayFromVolume(volume))
    assert sorted(os.listdir(folder.parent)) == [folder.name]  # no staging folder left beside it
