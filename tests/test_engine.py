"""The engine on real CT: encoder-call rule, every output of `ursam segment`, Dice against labels."""
import json

import numpy as np
import pytest
import SimpleITK as sitk
import slicerio
from scipy import ndimage
from shared_data import ABD, case, names, paper_settings, segment_boxes

from URSAMLib.boxes import boxes_from_labels, save_boxes
from URSAMLib.cli import main
from URSAMLib.imageio import read_ct, read_labels
from URSAMLib.metrics import dice
from URSAMLib.outputs import OUTPUT_FILES
from URSAMLib.pipeline import distinct_slices
from URSAMLib.uncertainty import LOG2


@pytest.fixture(scope="module")
def crop(tmp_path_factory):
    """Five slices of tsA_slab (kidneys, liver, spleen, ...) as image, labels and box file."""
    image, labels = case(ABD, "tsA_slab")
    folder = tmp_path_factory.mktemp("crop")
    img = sitk.ReadImage(str(image))[:, :, 12:17]
    lab = sitk.ReadImage(str(labels))[:, :, 12:17]
    sitk.WriteImage(img, str(folder / "image.nii.gz"))
    sitk.WriteImage(lab, str(folder / "labels.nii.gz"))
    boxes = boxes_from_labels(sitk.GetArrayFromImage(lab), names(ABD), labels=[1, 2, 3, 13])

    save_boxes(boxes, folder / "boxes.json")
    return folder


def test_encoder_runs_once_per_distinct_slice(crop, litemedsam):
    ref, volume = read_ct(crop / "image.nii.gz")
    _, labels = read_labels(crop / "labels.nii.gz", ref)
    boxes = boxes_from_labels(labels, names(ABD), labels=[1, 2, 3, 13])
    manual = boxes_from_labels(labels, names(ABD), perturb_px=20, seed=1, labels=[1, 2, 3, 13])
    # Shrink one organ's z-range so the union is not every slice of every box.
    boxes[0].max_ijk[2] = boxes[0].min_ijk[2]
    before = litemedsam.encoder_calls
    result = segment_boxes(volume, ref, boxes, litemedsam, paper_settings(n_aug=3), baselines={"manual": manual})
    calls = litemedsam.encoder_calls - before
    expected = len(distinct_slices(boxes + manual))
    assert calls == expected == result.timings["distinct_slices"]
    assert 4 * 4 + 4 > calls  # far fewer than one call per organ and box


def test_segment_writes_every_output_with_input_geometry(crop, tmp_path):
    out = tmp_path / "out"
    code = main(["segment", str(crop / "image.nii.gz"), "--boxes", str(crop / "boxes.json"), "--out", str(out),
                 "--reference", str(crop / "labels.nii.gz"), "--quiet", "--device", "cpu"])
    assert code == 0
    assert sorted(p.name for p in out.iterdir()) == sorted(OUTPUT_FILES)
    image = sitk.ReadImage(str(crop / "image.nii.gz"))
    truth = sitk.GetArrayFromImage(sitk.ReadImage(str(crop / "labels.nii.gz")))
    for name in ("ensemble", "uncertainty", "uncertain", "rectified"):
        img = sitk.ReadImage(str(out / f"{name}.nii.gz"))
        assert img.GetSize() == image.GetSize()
        assert np.allclose(img.GetOrigin(), image.GetOrigin())
        assert np.allclose(img.GetSpacing(), image.GetSpacing())
        assert np.allclose(img.GetDirection(), image.GetDirection())
    u = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "uncertainty.nii.gz")))
    assert u.dtype == np.float32 and u.min() >= 0 and u.max() <= LOG2 + 1e-6 and u.max() > 0
    rect = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "rectified.nii.gz")))
    assert set(np.unique(rect)) <= {0, 1, 2, 3, 13}
    # Large organs on these slices are found: liver and spleen well above chance.
    assert dice(rect == 1, truth == 1) > 0.8
    assert dice(rect == 3, truth == 3) > 0.7
    report = json.loads((out / "report.json").read_text(encoding="utf-8"))
    organs = {o["name"]: o for o in report["organs"]}
    assert set(organs) == {"liver", "kidney_right", "spleen", "kidney_left"}
    liver = organs["liver"]
    assert liver["rectified_voxels"] == int((rect == 1).sum())
    assert np.isclose(liver["rectified_ml"], liver["rectified_voxels"] * 27 / 1000, rtol=1e-3)
    assert liver["threshold_T"] is not None and 0 <= liver["mean_uncertainty_in_box"] <= LOG2
    assert report["parameters"]["params"]["n_aug"] == 3 and report["parameters"]["params"]["seed"] == 0
    # Plain boxes: the paper's prompt, nothing to warp, so the result is Algorithm 1.
    assert report["rectified_method"]["name"] == "ursam"
    assert report["inputs"]["prompts"]["mode"] == "box3d"
    assert report["timings_seconds"]["encoder_calls"] == 5
    assert set(report["dice_vs_reference"]) == {"auto", "ensemble", "unc-fpc", "unc-fnc", "unc-fpnc", "ursam"}
    # Flagged regions for review: one per connected component of each organ's M_unc.

    unc = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "uncertain.nii.gz")))
    for name, organ in organs.items():
        n = ndimage.label(unc == organ["label"], np.ones((3, 3, 3)))[1]
        assert organ["flagged_regions"] == n
        listed = [c for c in report["flagged_components"] if c["label"] == organ["label"]]
        assert len(listed) == n
        assert sum(c["voxels"] for c in listed) == int((unc == organ["label"]).sum()) == organ["flagged_voxels"]
    # The segmentation file: one named, coloured segment per organ, voxels equal to the label map.

    seg = slicerio.read_segmentation(str(out / "rectified.seg.nrrd"))
    assert [s["name"] for s in seg["segments"]] == ["liver", "kidney_right", "spleen", "kidney_left"]
    assert all(len(s["color"]) == 3 for s in seg["segments"])
    assert np.array_equal(np.transpose(seg["voxels"], (2, 1, 0)), rect)


@pytest.mark.slow
def test_ts_a_auto_dice_with_boxes_from_labels(litemedsam):
    """The acceptance figure of the engine: auto prompting, whole tsA, 12 organs, mean Dice >= 0.62."""
    image, labels = case(ABD, "tsA")
    ref, volume = read_ct(image)
    _, truth = read_labels(labels, ref)
    boxes = boxes_from_labels(truth, names(ABD))
    assert len(boxes) == 12
    result = segment_boxes(volume, ref, boxes, litemedsam, paper_settings(n_aug=1))
    auto = result.label_map("auto")
    scores = [dice(auto == b.label, truth == b.label) for b in boxes]
    assert np.mean(scores) >= 0.62, scores


def test_same_seed_gives_bit_identical_results(crop, litemedsam):
    ref, volume = read_ct(crop / "image.nii.gz")
    _, labels = read_labels(crop / "labels.nii.gz", ref)
    boxes = boxes_from_labels(labels[1:4], names(ABD), labels=[2, 3])
    runs = [segment_boxes(volume[1:4], ref[:, :, 1:4], boxes, litemedsam, paper_settings(seed=s)) for s in (5, 5, 6)]
    a, b, c = runs
    for oa, ob in zip(a.organs, b.organs):
        assert np.array_equal(oa.p_mean, ob.p_mean) and np.array_equal(oa.u, ob.u)
    assert np.array_equal(a.label_map("ursam"), b.label_map("ursam"))
    assert np.array_equal(a.uncertainty_maps()[0], b.uncertainty_maps()[0])
    # Another seed shifts the boxes differently, so the ensemble differs.
    assert any(not np.array_equal(oa.p_mean, oc.p_mean) for oa, oc in zip(a.organs, c.organs))
