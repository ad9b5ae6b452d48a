"""Localize (registration localizer of URSAMLib) and the template library, through the Slicer logic."""
import json

import numpy as np
import pytest
import slicer
from slicer_scene import SlicerApp

from URSAMLib.boxes import box_iou, boxes_from_labels
from URSAMLib.errors import Cancelled, URSAMError
from URSAMLib.templates import Library
from URSAMMRML import geometry, outputs, segmentations
from URSAMMRML.logic import URSAMProcessLogic

ORGANS = {2: "kidney_right", 3: "spleen"}


@pytest.fixture(scope="module")
def localized(slab_paths):
    app = SlicerApp()
    volume = app.loadVolume(slab_paths[0], "tsA_slab")
    labels = app.loadVolume(slab_paths[1], "tsA_slab labels")
    logic = URSAMProcessLogic(app.appLogic)
    stages = []
    library = slab_paths[0].parents[2]  # abdomen-ts: its support scan is tsA, another scan of this patient
    rois = logic.localize(volume, library, organs=list(ORGANS.values()),
                          progress=lambda s, i, n: stages.append(s))
    return app, volume, labels, logic, library, rois, stages


def test_localize_makes_one_named_roi_per_organ_near_the_organ(localized):
    app, volume, labels, logic, library, rois, stages = localized
    assert "localizing" in stages
    assert sorted(r.GetName() for r in rois) == sorted(ORGANS.values())
    snapshot = geometry.snapshotVolume(volume)
    truth = {b.name: b for b in boxes_from_labels(slicer.util.arrayFromVolume(labels), ORGANS)}
    sh = app.scene.GetSubjectHierarchyNode()
    folder = outputs.outputFolder(app.scene, volume, create=False)
    for roi in rois:
        name = roi.GetName()
        assert int(roi.GetAttribute(outputs.ORGAN_LABEL)) == {v: k for k, v in ORGANS.items()}[name]
        assert sh.GetItemParent(sh.GetItemByDataNode(roi)) == folder
        box = geometry.boxFromRoi(roi, snapshot, int(roi.GetAttribute(outputs.ORGAN_LABEL)))
        # registration of the other scan of this patient: the box lies around the organ
        assert box_iou(box, truth[name]) > 0.4, (name, box, truth[name])
        assert all(lo <= t for lo, t in zip(box.min_ijk[:2], truth[name].min_ijk[:2]))


def test_localize_again_moves_the_same_rois_and_segment_uses_them_as_they_stand(localized):
    app, volume, labels, logic, library, rois, _ = localized
    spleen = next(r for r in rois if r.GetName() == "spleen")
    # the user moves and shrinks the box to voxels x 20..26, y 30..36, z 10..12
    wanted = boxes_from_labels(np.pad(np.ones((3, 7, 7), np.uint8), ((10, 17), (30, 64), (20, 95))), {1: "spleen"})[0]
    geometry.placeRoi(spleen, wanted, geometry.ijkToRas(volume))
    job = logic.prepareSegmentation(volume, rois=[spleen])
    box = job.boxes[0]
    assert (box.label, box.name) == (3, "spleen")  # the library's label, kept on the ROI
    assert (box.min_ijk, box.max_ijk) == ([20, 30, 10], [26, 36, 12])
    ids = app.nodeIDs()
    again = logic.localize(volume, library, organs=["spleen"])
    assert again == [spleen] and app.nodeIDs() == ids
    radius = [0.0, 0.0, 0.0]
    spleen.GetRadiusXYZ(radius)
    assert radius[0] > 30.0  # back to the localized box


def test_cancel_after_localization_writes_nothing(localized, litemedsam):
    app, volume, labels, logic, library, rois, _ = localized
    ids = app.nodeIDs()
    seen = []
    with pytest.raises(Cancelled):
        logic.process(volume, library=library, organs=["spleen"], backend=litemedsam,
                      progress=lambda s, i, n: seen.append((s, i)),
                      cancel=lambda: any(s == "embedding slices" for s, i in seen))
    assert ("localizing", 0) in seen
    assert app.nodeIDs() == ids


def test_localize_reports_a_bad_library(localized, tmp_path):
    app, volume, labels, logic, library, rois, _ = localized
    with pytest.raises(URSAMError, match="template library"):
        logic.localize(volume, tmp_path / "nowhere")
    with pytest.raises(URSAMError, match="pancreas_tail"):
        logic.localize(volume, library, organs=["pancreas_tail"])


def test_add_volume_and_segmentation_to_a_new_library(localized, tmp_path):
    app, volume, labels, logic, library, rois, _ = localized
    seg = app.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "reviewed")
    label_array = slicer.util.arrayFromVolume(labels)
    organs = [(k, v) for k, v in ORGANS.items()]
    segmentations.setSegmentsFromLabelmap(seg, np.where(np.isin(label_array, list(ORGANS)), label_array, 0),
                                          organs, geometry.ijkToRas(volume), volume)
    lib_path = tmp_path / "mylib"
    case = logic.addToLibrary(lib_path, volume, seg)
    assert case == "tsA_slab"
    lib = Library(lib_path)
    assert sorted(lib.names.values()) == sorted(ORGANS.values())
    assert json.loads((lib_path / "dataset.json").read_text(encoding="utf-8"))["support"] == ["tsA_slab"]
    template = lib.templates()[0]
    image = template.read_image()
    assert image.GetSize() == tuple(volume.GetImageData().GetDimensions())
    assert np.allclose(geometry.ijkToRasFromImage(image), geometry.ijkToRas(volume))
    _, back = template.read_labels()
    by_name = {v: k for k, v in lib.names.items()}
    for value, name in ORGANS.items():
        assert np.array_equal(back == by_name[name], label_array == value)
    # a second add of the same volume gets a new case id; the library keeps both
    assert logic.addToLibrary(lib_path, volume, seg) == "tsA_slab_2"
    assert Library(lib_path).case_ids() == ["tsA_slab", "tsA_slab_2"]
