"""Volume nodes and ROIs <-> the engine's grid: RAS/LPS, oblique volumes, parent transforms, bad volumes."""
import numpy as np
import pytest
import SimpleITK as sitk
import slicer

from URSAMLib.boxes import OrganBox
from URSAMLib.errors import URSAMError
from URSAMMRML import geometry


def rotation(axis, degrees):
    a = np.radians(degrees)
    c, s = np.cos(a), np.sin(a)
    i, j = [k for k in range(3) if k != axis]
    m = np.eye(4)
    m[i, i], m[i, j], m[j, i], m[j, j] = c, -s, s, c
    return m


def test_lps_geometry_matches_simpleitk_reading_the_same_file(app, slab_paths):
    volume = app.loadVolume(slab_paths[0], "ct")
    image = sitk.ReadImage(str(slab_paths[0]))
    spacing, origin, direction = geometry.lpsGeometry(geometry.ijkToRas(volume))
    assert np.allclose(spacing, image.GetSpacing())
    assert np.allclose(origin, image.GetOrigin(), atol=1e-4)
    assert np.allclose(direction, image.GetDirection())
    assert np.allclose(geometry.ijkToRasFromImage(image), geometry.ijkToRas(volume), atol=1e-4)
    snapshot = geometry.snapshotVolume(volume)
    assert np.array_equal(snapshot.array, sitk.GetArrayFromImage(image).astype(np.float32))
    ref = snapshot.reference()
    assert ref.GetSize() == image.GetSize() and np.allclose(ref.GetOrigin(), image.GetOrigin(), atol=1e-4)


def oblique_volume(scene):
    volume = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "oblique")
    data = np.arange(20 * 30 * 40, dtype=np.int16).reshape(20, 30, 40)
    slicer.util.updateVolumeFromArray(volume, data)
    m = rotation(2, 30) @ rotation(0, 10) @ np.diag([0.8, 0.9, 2.5, 1.0])
    m[:3, 3] = [12.0, -40.0, 7.0]
    volume.SetIJKToRASMatrix(geometry.arrayToMatrix(m))
    return volume


def place(roi, box, ijk_to_ras):
    objectToNode, radius = geometry.roiPlacement(box, ijk_to_ras)
    roi.SetAndObserveObjectToNodeMatrix(geometry.arrayToMatrix(objectToNode))
    roi.SetRadiusXYZ(*radius)


def test_roi_and_box_round_trip_on_an_oblique_volume(app):
    volume = oblique_volume(app.scene)
    snapshot = geometry.snapshotVolume(volume)
    for lo, hi in (([0, 0, 0], [39, 29, 19]), ([3, 7, 2], [3, 7, 2]), ([10, 5, 4], [25, 21, 11])):
        roi = app.scene.AddNewNodeByClass("vtkMRMLMarkupsROINode", "organ")
        place(roi, OrganBox(1, "organ", lo, hi), snapshot.ijkToRas)
        back = geometry.boxFromRoi(roi, snapshot, 1)
        assert (back.min_ijk, back.max_ijk) == (lo, hi)


def test_rois_are_read_in_world_coordinates_for_a_transformed_volume(app):
    volume = oblique_volume(app.scene)
    transform = app.scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "moved")
    t = rotation(1, 20)
    t[:3, 3] = [100.0, 5.0, -30.0]
    transform.SetMatrixTransformToParent(geometry.arrayToMatrix(t))
    volume.SetAndObserveTransformNodeID(transform.GetID())
    snapshot = geometry.snapshotVolume(volume)
    box = OrganBox(1, "organ", [10, 5, 4], [25, 21, 11])
    # an ROI under the same transform (as Localize makes it) ...
    under = app.scene.AddNewNodeByClass("vtkMRMLMarkupsROINode", "under")
    place(under, box, snapshot.ijkToRas)
    under.SetAndObserveTransformNodeID(transform.GetID())
    # ... and an ROI the user drew in world coordinates at the same place
    world = app.scene.AddNewNodeByClass("vtkMRMLMarkupsROINode", "world")
    place(world, box, t @ snapshot.ijkToRas)
    for roi in (under, world):
        back = geometry.boxFromRoi(roi, snapshot, 1)
        assert (back.min_ijk, back.max_ijk) == (box.min_ijk, box.max_ijk), roi.GetName()
    # an ROI at the box's untransformed place is 100 mm away, outside the moved volume
    untransformed = app.scene.AddNewNodeByClass("vtkMRMLMarkupsROINode", "naive")
    place(untransformed, box, snapshot.ijkToRas)
    with pytest.raises(URSAMError, match="ROI 'naive' lies outside the input volume 'oblique'"):
        geometry.boxFromRoi(untransformed, snapshot, 1)


def test_roi_partly_outside_is_clipped_with_a_warning(app):
    volume = oblique_volume(app.scene)
    snapshot = geometry.snapshotVolume(volume)
    roi = app.scene.AddNewNodeByClass("vtkMRMLMarkupsROINode", "big")
    place(roi, OrganBox(1, "big", [-5, 10, 10], [50, 12, 12]), snapshot.ijkToRas)
    warnings = []
    box = geometry.boxFromRoi(roi, snapshot, 1, warn=warnings.append)
    assert (box.min_ijk, box.max_ijk) == ([0, 10, 10], [39, 12, 12])
    assert warnings and "clipped" in warnings[0]


def test_unusable_volumes_are_refused_with_their_name(app):
    scene = app.scene
    flat = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "flat")
    slicer.util.updateVolumeFromArray(flat, np.zeros((4, 5, 6), np.int16))
    with pytest.raises(URSAMError, match="'flat' is constant"):
        geometry.snapshotVolume(flat)
    thin = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "thin")
    slicer.util.updateVolumeFromArray(thin, np.arange(30, dtype=np.int16).reshape(1, 5, 6))
    with pytest.raises(URSAMError, match="'thin' has size"):
        geometry.snapshotVolume(thin)
    empty = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "empty")
    with pytest.raises(URSAMError, match="'empty' has no voxels"):
        geometry.snapshotVolume(empty)
    nan = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "nan")
    data = np.ones((4, 5, 6), np.float32)
    data[1, 2, 3] = np.nan
    slicer.util.updateVolumeFromArray(nan, data)
    with pytest.raises(URSAMError, match="'nan' has NaN"):
        geometry.snapshotVolume(nan)
    with pytest.raises(URSAMError, match="no input volume"):
        geometry.snapshotVolume(None)
