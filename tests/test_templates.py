"""Template library: `ursam templates add` / `check` on real H&N scans, and its bad-input errors."""
import json

import numpy as np
import pytest
import SimpleITK as sitk
from shared_data import HN, case, names

from URSAMLib.cli import main as ursam
from URSAMLib.errors import URSAMError
from URSAMLib.localizers import localize
from URSAMLib.outputs import write_seg_nrrd
from URSAMLib.templates import Library


def test_add_then_check_round_trips(tmp_path, capsys):
    lib = tmp_path / "lib"
    image, labels = case(HN, "pt_4")
    assert ursam(["templates", "add", str(lib), "--image", str(image), "--labels", str(labels),
                  "--names", str(HN / "dataset.json"), "--id", "pt_4"]) == 0
    # A second scan whose labels come as a Slicer .seg.nrrd with other label values: matched by name.

    img13, lab13 = case(HN, "pt_13")
    ref = sitk.ReadImage(str(img13))
    truth13 = sitk.GetArrayFromImage(sitk.ReadImage(str(lab13)))
    shuffled = np.where(truth13 > 0, 20 - truth13, 0).astype(np.uint8)  # 1 -> 19, 7 -> 13
    seg = tmp_path / "pt_13.seg.nrrd"
    write_seg_nrrd(shuffled, ref, [(20 - v, n) for v, n in names(HN).items()], seg)
    assert ursam(["templates", "add", str(lib), "--image", str(img13), "--labels", str(seg)]) == 0
    capsys.readouterr()

    assert ursam(["templates", "check", str(lib)]) == 0
    out = capsys.readouterr().out
    assert "2 support scans, 7 organs" in out
    for organ in names(HN).values():
        assert f"{organ}" in out and "in 2 of 2 scans" in out
    library = Library(lib)
    assert library.case_ids() == ["pt_4", "pt_13"]
    assert library.names == names(HN)
    # Voxels survive the copy: same label values, same counts, same grid.
    stored = library.case("pt_13")
    stored_image, stored_labels = stored.read_labels()
    for value in names(HN):
        assert np.count_nonzero(stored_labels == value) == np.count_nonzero(truth13 == value)
    assert stored_image.GetSize() == ref.GetSize()
    np.testing.assert_allclose(stored_image.GetSpacing(), ref.GetSpacing(), atol=1e-4)
    original = sitk.GetArrayFromImage(sitk.ReadImage(str(image)))
    copied = sitk.GetArrayFromImage(library.case("pt_4").read_image())
    np.testing.assert_array_equal(copied, original.astype(np.float32))


def _small_library(tmp_path, drop=None):
    """A one-scan library built from pt_4, optionally with one organ erased from its labels."""
    image, labels = case(HN, "pt_4")
    lab = sitk.ReadImage(str(labels))
    arr = sitk.GetArrayFromImage(lab)
    if drop is not None:
        arr = np.where(arr == drop, 0, arr).astype(arr.dtype)
    path = tmp_path / "labels_edit.nii.gz"
    out = sitk.GetImageFromArray(arr)
    out.CopyInformation(lab)
    sitk.WriteImage(out, str(path))
    lib = tmp_path / "lib"
    Library.create(lib, names(HN)).add(image, path, case_id="pt_4", names=names(HN))
    return lib


def test_labels_missing_a_requested_organ_is_a_clear_error(tmp_path, capsys):
    lib = _small_library(tmp_path, drop=6)  # Larynx erased
    assert ursam(["templates", "check", str(lib), "--organs", "Larynx"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("ursam: error: no support scan labels Larynx")
    assert str(lib / "dataset.json") in err and "\n" not in err
    assert ursam(["templates", "check", str(lib), "--organs", "liver"]) == 2
    assert "organ 'liver' is not in the library's labels" in capsys.readouterr().err
    # The localizer refuses the same request before any registration.

    with pytest.raises(URSAMError, match="no support scan of the library labels Larynx"):
        localize(case(HN, "pt_34")[0], lib, organs=["Larynx"])


def test_bad_libraries_name_the_file(tmp_path):
    with pytest.raises(URSAMError, match="template library folder not found"):
        Library(tmp_path / "nowhere")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(URSAMError, match=r"no dataset.json.*empty"):
        Library(empty)
    (empty / "dataset.json").write_text("{not json")
    with pytest.raises(URSAMError, match=r"dataset.json is not valid JSON.*dataset.json"):
        Library(empty)
    (empty / "dataset.json").write_text(json.dumps({"labels": {"one": "liver"}}))
    with pytest.raises(URSAMError, match="keys must be integer label values"):
        Library(empty)
    (empty / "dataset.json").write_text(json.dumps({"labels": {"1": "liver"}, "support": ["a"]}))
    with pytest.raises(URSAMError, match=r"case 'a' listed in dataset.json has no folder"):
        Library(empty).check()


def test_label_geometry_must_match_the_image(tmp_path, capsys):
    image, labels = case(HN, "pt_4")
    lab = sitk.ReadImage(str(labels))
    moved = tmp_path / "moved_labels.nii.gz"
    lab.SetOrigin((5.0, 0.0, 0.0))
    sitk.WriteImage(lab, str(moved))
    assert ursam(["templates", "add", str(tmp_path / "lib"), "--image", str(image), "--labels", str(moved),
                  "--names", str(HN / "dataset.json")]) == 2
    err = capsys.readouterr().err
    assert "origin" in err and "does not match" in err and str(moved) in err
    assert not (tmp_path / "lib" / "cases" / "moved_labels").exists()


def test_a_case_may_keep_its_labels_as_seg_nrrd(tmp_path):
    """labels.seg.nrrd in a case folder: organs are matched to dataset.json by segment name."""

    image, labels = case(HN, "pt_22")
    lab = sitk.ReadImage(str(labels))
    arr = sitk.GetArrayFromImage(lab)
    folder = tmp_path / "lib" / "cases" / "pt_22"
    folder.mkdir(parents=True)
    (folder / "image.nii.gz").symlink_to(image)
    # Segment label values 101..107, names as in dataset.json but in other case.
    write_seg_nrrd(np.where(arr > 0, arr + 100, 0).astype(np.uint8), lab,
                   [(v + 100, n.upper()) for v, n in names(HN).items()], folder / "labels.seg.nrrd")
    (tmp_path / "lib" / "dataset.json").write_text(json.dumps({"labels": {str(k): v for k, v in names(HN).items()}}))
    library = Library(tmp_path / "lib")
    report = library.check(organs=["Mandible", "Larynx"])
    assert report["organs"] == {n: 1 for n in names(HN).values()}
    _, relabelled = library.case("pt_22").read_labels()
    np.testing.assert_array_equal(relabelled, arr)
