"""The Slicer logic on a scan in another axis order: the same organs, outputs on the input's own grid.

A 7-slice crop of tsA_slab as it is, with x and z swapped (sitk.PermuteAxes, the same physical
geometry; Slicer reads the file with its K axis reversed too, to keep IJK right-handed, so the volume's
slices are sagittal) and with x and y flipped; each is localized from the abdomen-ts library (support
tsA) and segmented in slice mode. Masks are compared on the original's grid, resampled there by
physical position (nearest voxel: exact, the grids share their voxel centres).
"""
import numpy as np
import pytest
import SimpleITK as sitk
import slicer
from slicer_scene import SlicerApp, full_mask

from URSAMLib.metrics import dice
from URSAMMRML import geometry
from URSAMMRML.logic import URSAMProcessLogic

ORGANS = {2: "kidney_right", 3: "spleen"}
CROP = (10, 17)
#: each variant from the original image
VARIANTS = {
    "original": lambda im: im,
    "permuted": lambda im: sitk.PermuteAxes(im, [2, 1, 0]),
    "flipped": lambda im: sitk.Flip(im, [True, True, False]),
}


def on_grid(mask, volume, target):
    """A mask [k, j, i] on ``volume``'s grid, on ``target``'s (both volume nodes of the same space)."""
    image = geometry.sitkImage(mask.astype(np.uint8), geometry.ijkToRas(volume))
    shape = slicer.util.arrayFromVolume(target).shape
    grid = geometry.sitkImage(np.zeros(shape, np.uint8), geometry.ijkToRas(target))
    return sitk.GetArrayFromImage(sitk.Resample(image, grid, sitk.Transform(), sitk.sitkNearestNeighbor, 0)) > 0


class Run:
    pass


@pytest.fixture(scope="module")
def runs(slab_paths, tmp_path_factory, litemedsam):
    folder = tmp_path_factory.mktemp("orientation")
    image = sitk.ReadImage(str(slab_paths[0]))[:, :, CROP[0]:CROP[1]]
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(slab_paths[1]))[:, :, CROP[0]:CROP[1]])
    out = {}
    for name, make in VARIANTS.items():
        path = folder / f"{name}.nii.gz"
        sitk.WriteImage(make(image), str(path))
        r = Run()
        r.app = SlicerApp()
        r.volume = r.app.loadVolume(path, f"tsA crop {name}")
        r.logic = URSAMProcessLogic(r.app.appLogic)
        r.outputs = r.logic.process(r.volume, library=slab_paths[0].parents[2], organs=list(ORGANS.values()),
                                    backend=litemedsam, prompts="slice", deformable="none")
        r.computed = r.logic._cache[r.volume.GetID()]
        out[name] = r
    return labels, out


def test_the_permuted_volume_has_sagittal_slices(runs):
    _, by_name = runs
    original, permuted = by_name["original"], by_name["permuted"]
    assert permuted.volume.GetImageData().GetDimensions() == original.volume.GetImageData().GetDimensions()[::-1]
    # its K axis (the voxel array's first) runs along R-L, its I axis along S
    directions = geometry.ijkToRas(permuted.volume)[:3, :3]
    assert np.argmax(np.abs(directions[:, 2])) == 0 and np.argmax(np.abs(directions[:, 0])) == 2


def test_outputs_are_on_each_input_grid(runs):
    _, by_name = runs
    for name, r in by_name.items():
        m_in = geometry.ijkToRas(r.volume)
        unc = r.outputs.uncertainty
        assert np.allclose(geometry.ijkToRas(unc), m_in), name
        assert unc.GetImageData().GetDimensions() == r.volume.GetImageData().GetDimensions(), name
        expected, _ = r.computed.result.uncertainty_maps()
        assert np.array_equal(slicer.util.arrayFromVolume(unc), expected), name
        for role in ("ensemble", "rectified", "flagged"):
            labelmap = r.app.scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", f"export {role}")
            assert slicer.vtkSlicerSegmentationsModuleLogic.ExportAllSegmentsToLabelmapNode(
                r.outputs.nodes[role], labelmap, slicer.vtkSegmentation.EXTENT_REFERENCE_GEOMETRY)
            assert labelmap.GetImageData().GetDimensions() == r.volume.GetImageData().GetDimensions()
            assert np.allclose(geometry.ijkToRas(labelmap), m_in), (name, role)


def test_the_same_organs_and_rois_in_every_axis_order(runs):
    labels, by_name = runs
    original = by_name["original"]
    reference = {organ: full_mask(original.outputs.rectified, organ, original.volume) for organ in ORGANS.values()}
    for value, organ in ORGANS.items():
        assert dice(reference[organ], labels == value) > 0.7, organ
    centres = {}
    for name, r in by_name.items():
        assert r.computed.result.rectified_method == "ursam+atlas"
        for value, organ in ORGANS.items():
            mask = full_mask(r.outputs.rectified, organ, r.volume)
            assert np.array_equal(mask, r.computed.maps["rectified"] == value), (name, organ)
            assert dice(on_grid(mask, r.volume, original.volume), reference[organ]) >= 0.99, (name, organ)
        # the localized ROIs are the same boxes in space, placed from each input's voxel indices
        for roi in r.outputs.rois:
            centre = [0.0, 0.0, 0.0]
            roi.GetCenterWorld(centre)
            radius = [0.0, 0.0, 0.0]
            roi.GetRadiusXYZ(radius)
            centres.setdefault(roi.GetName(), []).append((np.array(centre), sorted(radius)))
    for organ, placed in centres.items():
        for centre, radius in placed[1:]:
            assert np.allclose(centre, placed[0][0], atol=1e-3), organ
            assert np.allclose(radius, placed[0][1], atol=1e-3), organ
