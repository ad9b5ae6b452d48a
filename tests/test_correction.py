"""SAM-assisted correction (URSAMLib.correction, ursam correct) on a real result of a real CT.

The result is a real LiteMedSAM run on 7 slices of tsA_slab (liver, right kidney, spleen) from boxes
widened by 60 px of SAM's grid (n = 1 keeps it to 7 encoder calls); SAM does well there, so the spleen is
then moved by 10 voxels on one slice (a wrong slice to correct, as a reviewer finds one). The corrections
are real SAM runs on it, from the organ's tight true box.
"""
import hashlib
import json
import shutil

import numpy as np
import pytest
import SimpleITK as sitk
from shared_data import ABD, case, paper_settings, segment_boxes

from URSAMLib import correction_files
from URSAMLib.boxes import boxes_from_labels
from URSAMLib.cli import main as cli
from URSAMLib.correction import STOP_AGREES, CorrectionOptions, SliceBox, SliceSam, correct_organ
from URSAMLib.correction_files import ResultFolder, correct_result, undo_last
from URSAMLib.errors import URSAMError
from URSAMLib.imageio import write_image
from URSAMLib.metrics import dice
from URSAMLib.outputs import write_results, write_seg_nrrd

ORGANS = {1: "liver", 2: "kidney_right", 3: "spleen"}
CROP = (10, 17)
#: the slice of the crop whose spleen is moved
WRONG = 3


def tree_hashes(folder):
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def made(tmp_path_factory, litemedsam):
    """A result folder of a real run, the crop's CT and truth (files and arrays)."""
    folder = tmp_path_factory.mktemp("correction")
    image_path, labels_path = case(ABD, "tsA_slab")
    image = sitk.ReadImage(str(image_path))[:, :, CROP[0]:CROP[1]]
    truth = sitk.ReadImage(str(labels_path))[:, :, CROP[0]:CROP[1]]
    sitk.WriteImage(image, str(folder / "image.nii.gz"))
    sitk.WriteImage(truth, str(folder / "labels.nii.gz"))
    truth_zyx = sitk.GetArrayFromImage(truth)
    boxes = boxes_from_labels(truth_zyx, ORGANS, perturb_px=60, seed=1)
    reference = sitk.Image(image.GetSize(), sitk.sitkUInt8)
    reference.CopyInformation(image)
    result = segment_boxes(sitk.GetArrayFromImage(image).astype(np.float32), reference, boxes, litemedsam,
                           paper_settings(n_aug=1))
    result.inputs["image"] = str(folder / "image.nii.gz")
    write_results(result, folder / "result")
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(folder / "result" / "rectified.nii.gz")))
    plane = labels[WRONG]
    moved = np.roll(plane == 3, 10, axis=1) & (plane == 0)
    plane[plane == 3] = 0
    plane[moved] = 3
    write_image(labels, reference, folder / "result" / "rectified.nii.gz")
    write_seg_nrrd(labels, reference, sorted(ORGANS.items()), folder / "result" / "rectified.seg.nrrd")
    return folder, truth_zyx


@pytest.fixture
def result_dir(made, tmp_path):
    out = tmp_path / "result"
    shutil.copytree(made[0] / "result", out)
    return out


def worst(labels, truth, label):
    errors = np.count_nonzero((labels == label) != (truth == label), axis=(1, 2))
    z = int(np.argmax(errors))
    ys, xs = np.nonzero(truth[z] == label)
    return z, [int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max())]


def read(path):
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


def test_a_box_raises_the_organs_dice_on_its_slice_and_leaves_other_organs_alone(result_dir, made, litemedsam):
    truth = made[1]
    before = read(result_dir / "rectified.nii.gz")
    z, box = worst(before, truth, 3)
    assert z == WRONG
    record = correct_result(result_dir, "spleen", z, box, options=CorrectionOptions(propagate=False),
                            backend=litemedsam)
    after = read(result_dir / "rectified.nii.gz")
    assert dice(after[z] == 3, truth[z] == 3) > dice(before[z] == 3, truth[z] == 3) + 0.1
    assert record.slices_changed == [z] and record.stops["up"]["why"] == "no propagation"
    others = (before != 3) & (before != 0)
    assert np.array_equal(after[others], before[others])  # no other organ lost a voxel
    assert np.array_equal(after[(after != 3) & (after != 0)], before[(after != 3) & (after != 0)])
    changed = np.flatnonzero((after != before).any(axis=(1, 2)))
    assert changed.tolist() == [z]
    report = json.loads((result_dir / "report.json").read_text())
    entry = report["corrections"][-1]
    assert entry["organ"] == "spleen" and entry["slice"] == z and entry["box"] == box and entry["seconds"] > 0
    spleen = next(o for o in report["organs"] if o["name"] == "spleen")
    assert spleen["rectified_voxels"] == int((after == 3).sum())
    # the .seg.nrrd says what the label map says
    seg = sitk.GetArrayFromImage(sitk.ReadImage(str(result_dir / "rectified.seg.nrrd")))
    assert np.array_equal(seg == 3, after == 3)


def test_propagation_stops_where_the_mask_agrees(made, litemedsam):
    """The second of two identical corrections meets its own masks: each direction stops at the first
    neighbour, which agrees, and nothing changes."""
    folder = ResultFolder.read(made[0] / "result")
    truth = folder.orientation.to_canonical(made[1])
    labels = folder.orientation.to_canonical(folder.labels)
    volume = folder.orientation.to_canonical(sitk.GetArrayFromImage(sitk.ReadImage(str(made[0] / "image.nii.gz")))
                                             ).astype(np.float32)
    z, box = worst(labels, truth, 3)
    sam = SliceSam(litemedsam, volume, zoom=False)
    first = correct_organ(sam, labels, 3, SliceBox(z, *box), CorrectionOptions(max_slices=6))
    assert first.changed and first.voxels_added + first.voxels_removed > 0
    assert {s.why for s in first.stops.values()} <= {"edge of the scan", "slice limit", "organ ends",
                                                     "agrees with the result", "unsure and disagrees"}
    calls = sam.encoder_calls
    again = correct_organ(sam, first.labels, 3, SliceBox(z, *box), CorrectionOptions(max_slices=6))
    assert sam.encoder_calls == calls  # every slice's embedding was kept
    assert again.changed == [] and np.array_equal(again.labels, first.labels)
    for direction, stop in again.stops.items():
        if stop.why != "edge of the scan":
            assert stop.why == STOP_AGREES, (direction, stop)
            assert abs(stop.last - z) == 1
    # the correction improved the organ where it wrote
    assert dice(first.labels == 3, truth == 3) > dice(labels == 3, truth == 3)


def test_remove_clears_one_slice_of_one_organ(result_dir):
    before = read(result_dir / "rectified.nii.gz")
    z = int(np.argmax((before == 2).sum(axis=(1, 2))))
    record = correct_result(result_dir, "kidney_right", z, remove=True)
    after = read(result_dir / "rectified.nii.gz")
    assert record.slices_changed == [z] and record.voxels_removed == int((before[z] == 2).sum()) > 0
    assert not (after[z] == 2).any()
    expected = before.copy()
    expected[z][expected[z] == 2] = 0
    assert np.array_equal(after, expected)


def test_undo_restores_the_files_byte_for_byte(result_dir, made, litemedsam):
    original = tree_hashes(result_dir)
    truth = made[1]
    labels = read(result_dir / "rectified.nii.gz")
    z, box = worst(labels, truth, 1)
    correct_result(result_dir, "liver", z, box, options=CorrectionOptions(max_slices=2), backend=litemedsam)
    once = tree_hashes(result_dir)
    correct_result(result_dir, "spleen", z, remove=True)
    assert len(json.loads((result_dir / "report.json").read_text())["corrections"]) == 2
    assert undo_last(result_dir)["organ"] == "spleen"
    assert tree_hashes(result_dir) == once
    assert undo_last(result_dir)["organ"] == "liver"
    assert tree_hashes(result_dir) == original
    with pytest.raises(URSAMError, match="no correction to undo"):
        undo_last(result_dir)


def test_an_interrupted_correction_leaves_the_previous_result_whole(result_dir, monkeypatch):
    original = tree_hashes(result_dir)
    listing = sorted(p.name for p in result_dir.parent.iterdir())
    labels = read(result_dir / "rectified.nii.gz")
    z = int(np.argmax((labels == 3).sum(axis=(1, 2))))

    def fail(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(correction_files, "write_seg_nrrd", fail)  # after rectified.nii.gz was staged
    with pytest.raises(OSError):
        correct_result(result_dir, "spleen", z, remove=True)
    assert tree_hashes(result_dir) == original
    assert sorted(p.name for p in result_dir.parent.iterdir()) == listing  # no stage left behind


def test_boxes_map_from_a_permuted_flipped_file_and_a_sagittal_file_is_refused(made, tmp_path):
    """The file's own indices map onto the canonical axial slices; a file whose third axis is not axial
    is refused with one line."""
    folder = ResultFolder.read(made[0] / "result")
    target = folder.to_canonical_box(3, [10, 20, 40, 50])
    for name in ("rectified.nii.gz", "uncertain.nii.gz"):
        image = sitk.ReadImage(str(made[0] / "result" / name))
        sitk.WriteImage(sitk.Flip(sitk.PermuteAxes(image, [1, 0, 2]), [True, False, True]), str(tmp_path / name))
    (tmp_path / "report.json").write_text((made[0] / "result" / "report.json").read_text())
    swapped = ResultFolder.read(tmp_path)
    nz = swapped.labels.shape[0]
    nx = swapped.labels.shape[2]
    # the same voxels: x and y swapped, the new x and z reversed
    assert swapped.to_canonical_box(nz - 1 - 3, [nx - 1 - 50, 10, nx - 1 - 20, 40]) == target
    assert swapped.to_input_slice(target.z) == nz - 1 - 3
    for name in ("rectified.nii.gz", "uncertain.nii.gz"):
        sitk.WriteImage(sitk.PermuteAxes(sitk.ReadImage(str(made[0] / "result" / name)), [0, 2, 1]),
                        str(tmp_path / name))
    with pytest.raises(URSAMError, match="not axial"):
        ResultFolder.read(tmp_path).to_canonical_box(3, [1, 1, 2, 2])


@pytest.mark.parametrize("args,message", [
    (["--organ", "pancreas", "--slice", "2", "--box", "1,1,5,5"], "organ 'pancreas' is not in this result"),
    (["--organ", "liver", "--slice", "7", "--box", "1,1,5,5"], "slice 7 is outside the scan"),
    (["--organ", "liver", "--slice", "2", "--box", "9,1,5,5"], "must have x0 <= x1"),
    (["--organ", "liver", "--slice", "2", "--box", "1,1,5"], "--box must be four whole numbers"),
    (["--organ", "liver", "--slice", "2", "--box", "500,500,600,600"], "lies outside the slice"),
    (["--organ", "liver", "--slice", "2"], "needs --organ NAME --slice K and --box"),
    (["--undo"], "no correction to undo"),
])
def test_the_cli_says_what_is_wrong_in_one_line_and_exits_2(result_dir, capsys, args, message):
    original = tree_hashes(result_dir)
    assert cli(["correct", str(result_dir)] + args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("ursam: error: ") and "\n" not in err and message in err, err
    assert str(result_dir) in err
    assert tree_hashes(result_dir) == original


def test_the_cli_corrects_and_undoes(result_dir, capsys):
    original = tree_hashes(result_dir)
    labels = read(result_dir / "rectified.nii.gz")
    z = int(np.argmax((labels == 3).sum(axis=(1, 2))))
    assert cli(["correct", str(result_dir), "--organ", "Spleen", "--slice", str(z), "--remove"]) == 0
    assert "corrected spleen" in capsys.readouterr().out
    assert not (read(result_dir / "rectified.nii.gz")[z] == 3).any()
    assert cli(["correct", str(result_dir), "--undo", "--quiet"]) == 0
    assert tree_hashes(result_dir) == original
