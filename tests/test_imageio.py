"""Images in every supported format read to the same voxels and geometry; outputs keep the geometry."""
import numpy as np
import pytest
import SimpleITK as sitk
from shared_data import ABD, case

from URSAMLib.imageio import read_ct, write_image


@pytest.fixture(scope="module")
def ct(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fmt")
    img = sitk.ReadImage(str(case(ABD, "tsA_slab")[0]))[:, :, 10:14]
    # A non-trivial direction and origin, so a writer that drops them is caught.
    img.SetDirection((0, 1, 0, -1, 0, 0, 0, 0, 1))
    img.SetOrigin((12.5, -40.0, 7.25))
    return folder, img


def write_dicom(img, folder):
    folder.mkdir()
    img16 = sitk.Cast(img, sitk.sitkInt16)
    direction = img16.GetDirection()
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    series = "1.2.826.0.1.3680043.2.1125.1.424242"
    for k in range(img16.GetDepth()):
        sl = img16[:, :, k]
        sl.SetMetaData("0008|0060", "CT")
        sl.SetMetaData("0020|000e", series)
        sl.SetMetaData("0020|000d", series + ".1")
        sl.SetMetaData("0020|0037", "\\".join(map(str, (direction[0], direction[3], direction[6],
                                                         direction[1], direction[4], direction[7]))))
        sl.SetMetaData("0020|0032", "\\".join(map(str, img16.TransformIndexToPhysicalPoint((0, 0, k)))))
        sl.SetMetaData("0020|0013", str(k))
        sl.SetMetaData("0028|1052", "0")
        sl.SetMetaData("0028|1053", "1")
        writer.SetFileName(str(folder / f"slice{k:03d}.dcm"))
        writer.Execute(sl)
    return folder


@pytest.mark.parametrize("fmt", ["nii.gz", "nrrd", "mha", "dicom"])
def test_formats_read_to_same_voxels_and_geometry(ct, fmt):
    folder, img = ct
    path = write_dicom(img, folder / "dicom") if fmt == "dicom" else folder / f"image.{fmt}"
    if fmt != "dicom":
        sitk.WriteImage(img, str(path))
    ref, volume = read_ct(path)
    assert np.array_equal(volume, sitk.GetArrayFromImage(img).astype(np.float32))
    assert ref.GetSize() == img.GetSize()
    assert np.allclose(ref.GetSpacing(), img.GetSpacing(), atol=1e-4)
    assert np.allclose(ref.GetOrigin(), img.GetOrigin(), atol=1e-3)
    assert np.allclose(ref.GetDirection(), img.GetDirection(), atol=1e-5)


def test_written_outputs_keep_the_input_geometry(ct, tmp_path):
    _, img = ct
    sitk.WriteImage(img, str(tmp_path / "in.nrrd"))
    ref, volume = read_ct(tmp_path / "in.nrrd")
    out = write_image((volume > 0).astype(np.uint16), ref, tmp_path / "mask.nii.gz")
    back = sitk.ReadImage(str(out))
    assert back.GetSize() == img.GetSize()
    assert np.allclose(back.GetOrigin(), img.GetOrigin(), atol=1e-4)
    assert np.allclose(back.GetDirection(), img.GetDirection(), atol=1e-6)
    assert np.array_equal(sitk.GetArrayFromImage(back), (volume > 0).astype(np.uint16))
    assert not list(tmp_path.glob(".*tmp*"))  # the temporary file was renamed into place
