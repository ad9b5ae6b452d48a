"""Scans in any axis order: one canonical orientation (LPS) for the method, outputs on the input's grid.

The cases are tsA_slab (stored as NIfTI usually is: x and y reversed against LPS) with its axes
permuted (x and z swapped: a sagittal-like axis order, the same physical geometry) and with x and y
flipped (which makes it LPS itself). The fast tests check the permutation and flips against
SimpleITK's own DICOMOrient; the slow one runs ``ursam segment --templates`` on all three.
"""
import csv
import json

import numpy as np
import pytest
import SimpleITK as sitk
from shared_data import ABD, case, names

from URSAMLib.boxes import OrganBox, add_margin, boxes_from_labels
from URSAMLib.cli import main as ursam
from URSAMLib.evaluation.evaluate import score_mask
from URSAMLib.metrics import dice
from URSAMLib.orientation import Orientation, canonical

#: how each variant is made from the original image, and how an image on its grid goes back
VARIANTS = {
    "original": (lambda im: im, lambda im: im),
    "permuted": (lambda im: sitk.PermuteAxes(im, [2, 1, 0]), lambda im: sitk.PermuteAxes(im, [2, 1, 0])),
    "flipped": (lambda im: sitk.Flip(im, [True, True, False]), lambda im: sitk.Flip(im, [True, True, False])),
    # an axis order and flips of every kind at once
    "mixed": (lambda im: sitk.Flip(sitk.PermuteAxes(im, [1, 2, 0]), [False, True, True]),
              lambda im: sitk.PermuteAxes(sitk.Flip(im, [False, True, True]), [2, 0, 1])),
}


@pytest.fixture(scope="module")
def slab():
    image_path, labels_path = case(ABD, "tsA_slab")
    return sitk.ReadImage(str(image_path)), sitk.ReadImage(str(labels_path))


def test_the_variants_are_the_same_scan(slab):
    image, _ = slab
    for name, (make, back) in VARIANTS.items():
        variant = make(image)
        assert np.array_equal(sitk.GetArrayFromImage(back(variant)), sitk.GetArrayFromImage(image)), name
        # the same physical place for the voxel that is index 0 of the original
        at = variant.TransformPhysicalPointToIndex(image.TransformIndexToPhysicalPoint([0, 0, 0]))
        assert sitk.GetArrayViewFromImage(variant)[at[::-1]] == sitk.GetArrayViewFromImage(image)[0, 0, 0]


@pytest.mark.parametrize("name", list(VARIANTS))
def test_canonical_grid_and_voxels_are_dicomorient_lps(slab, name):
    image = VARIANTS[name][0](slab[0])
    orientation = Orientation.of(image)
    expected = sitk.DICOMOrient(image, "LPS")
    got = canonical(image)
    assert got.GetSize() == expected.GetSize() == tuple(orientation.canonical_size)
    assert np.allclose(got.GetOrigin(), expected.GetOrigin())
    assert np.allclose(got.GetSpacing(), expected.GetSpacing())
    assert np.allclose(got.GetDirection(), expected.GetDirection())
    array = sitk.GetArrayFromImage(image)
    assert np.array_equal(orientation.to_canonical(array), sitk.GetArrayFromImage(expected))
    assert np.array_equal(orientation.to_input(orientation.to_canonical(array)), array)
    # every variant has the same canonical scan: the one the method runs on
    assert np.array_equal(sitk.GetArrayFromImage(got), sitk.GetArrayFromImage(canonical(slab[0])))
    assert orientation.identity == (name == "flipped")


@pytest.mark.parametrize("name", list(VARIANTS))
def test_boxes_map_to_the_canonical_voxels_and_back(slab, name):
    labels = VARIANTS[name][0](slab[1])
    orientation = Orientation.of(labels)
    array = sitk.GetArrayFromImage(labels)
    organs = names(ABD)
    boxes = boxes_from_labels(array, organs)
    in_canonical = {b.label: b for b in boxes_from_labels(orientation.to_canonical(array), organs)}
    assert len(boxes) == len(in_canonical) == 12
    for box in boxes:
        mapped = orientation.box_to_canonical(box)
        assert (mapped.min_ijk, mapped.max_ijk) == (in_canonical[box.label].min_ijk, in_canonical[box.label].max_ijk)
        back = orientation.box_to_input(mapped)
        assert (back.label, back.name, back.min_ijk, back.max_ijk) == (box.label, box.name, box.min_ijk, box.max_ijk)


def _slice_box_mask(box, shape_zyx):
    """The voxels a box's per-slice boxes cover."""
    mask = np.zeros(shape_zyx, bool)
    for z, (x0, y0, x1, y1) in box.slice_boxes.items():
        mask[z, int(y0):int(y1) + 1, int(x0):int(x1) + 1] = True
    return mask


@pytest.mark.parametrize("name", list(VARIANTS))
def test_per_slice_boxes_map_to_the_bounding_box_of_each_canonical_slice(slab, name):
    """Per-slice boxes cover the same voxels in both frames where both slice along the same axis;
    where they do not, each canonical slice gets the bounding box of what they cover on it."""
    labels = VARIANTS[name][0](slab[1])
    orientation = Orientation.of(labels)
    liver = sitk.GetArrayFromImage(labels) == 1
    box = boxes_from_labels(liver.astype(np.int32), {1: "liver"})[0]
    box.slice_boxes = {}
    for z in box.z_range:
        ys, xs = np.nonzero(liver[z])
        if len(xs):
            box.slice_boxes[z] = [int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max())]
    covered = orientation.to_canonical(_slice_box_mask(box, liver.shape))
    mapped = orientation.box_to_canonical(box)
    assert sorted(mapped.slice_boxes) == [z for z in range(covered.shape[0]) if covered[z].any()]
    for z, b in mapped.slice_boxes.items():
        ys, xs = np.nonzero(covered[z])
        assert list(b) == [xs.min(), ys.min(), xs.max(), ys.max()], z
    if orientation.axes[2] == 2:
        assert np.array_equal(_slice_box_mask(mapped, covered.shape), covered)
        assert orientation.box_to_input(mapped).slice_boxes == box.slice_boxes


@pytest.mark.parametrize("name", list(VARIANTS))
def test_the_margin_is_on_the_canonical_slices(slab, name):
    """2 slices and 10 px of SAM's grid on the axial slices, whatever the axis order of the file."""
    make, _ = VARIANTS[name]
    original = Orientation.of(slab[1])
    variant = Orientation.of(make(slab[1]))
    box = OrganBox(3, "spleen", [20, 30, 5], [50, 60, 12])
    in_canonical = original.box_to_canonical(box)
    expected = add_margin(in_canonical, 2, 10.0, original.canonical_size)
    # the same box in the variant's voxel indices, through the canonical frame they share
    variant_box = variant.box_to_input(in_canonical)
    grown = variant.box_to_canonical(variant.add_margin(variant_box, 2, 10.0))
    assert (grown.min_ijk, grown.max_ijk) == (expected.min_ijk, expected.max_ijk)
    assert expected.max_ijk[2] - expected.min_ijk[2] == in_canonical.max_ijk[2] - in_canonical.min_ijk[2] + 4


# ---- the whole method: ursam segment --templates --------------------------------------------------

#: slices of tsA_slab in the query crop (about 7 encoder calls a run), and the organs scored
CROP = (10, 17)
ORGANS = ("liver", "kidney_right", "spleen")


@pytest.fixture(scope="module")
def segmented(slab, tmp_path_factory):
    """``ursam segment --templates abdomen-ts`` (support tsA) on the original crop and its variants."""

    root = tmp_path_factory.mktemp("orientation")
    image, labels = (im[:, :, CROP[0]:CROP[1]] for im in slab)
    runs = {}
    for name in ("original", "permuted", "flipped"):
        make, back = VARIANTS[name]
        path = root / f"{name}.nii.gz"
        sitk.WriteImage(make(image), str(path))
        out = root / name
        assert ursam(["segment", str(path), "--templates", str(ABD), "--organs", ",".join(ORGANS),
                      "--deformable", "none", "--out", str(out), "--quiet", "--device", "cpu"]) == 0
        runs[name] = (path, out, back)
    return image, labels, runs


@pytest.mark.slow
def test_segment_gives_the_same_masks_in_every_axis_order(segmented):
    image, labels, runs = segmented
    truth = sitk.GetArrayFromImage(labels)
    by_name = {v: k for k, v in names(ABD).items()}
    masks, canonical_boxes = {}, {}
    for name, (path, out, back) in runs.items():
        given = sitk.ReadImage(str(path))
        report = json.loads((out / "report.json").read_text(encoding="utf-8"))
        assert report["image"]["size_xyz"] == list(given.GetSize())
        assert ("orientation" in report["inputs"]) == (name != "flipped")
        for output in ("rectified.nii.gz", "ensemble.nii.gz", "uncertainty.nii.gz", "uncertain.nii.gz"):
            written = sitk.ReadImage(str(out / output))
            assert written.GetSize() == given.GetSize(), output
            assert np.allclose(written.GetOrigin(), given.GetOrigin()), output
            assert np.allclose(written.GetSpacing(), given.GetSpacing()), output
            assert np.allclose(written.GetDirection(), given.GetDirection()), output
        rectified = sitk.ReadImage(str(out / "rectified.nii.gz"))
        # the report's and boxes.json's boxes are in the input's voxel indices: they hold the organ
        boxes = json.loads((out / "boxes.json").read_text(encoding="utf-8"))["boxes"]
        assert [b["name"] for b in boxes] == [o["name"] for o in report["organs"]]
        array = sitk.GetArrayFromImage(rectified)
        orientation = Orientation.of(given)
        for b, organ in zip(boxes, report["organs"]):
            assert (b["min_ijk"], b["max_ijk"]) == (organ["box"]["min_ijk"], organ["box"]["max_ijk"])
            (x0, y0, z0), (x1, y1, z1) = b["min_ijk"], b["max_ijk"]
            inside = np.count_nonzero(array[z0:z1 + 1, y0:y1 + 1, x0:x1 + 1] == b["label"])
            # SAM's spill past the box is kept (the maps are padded in-plane), so nearly all, not all
            assert inside >= 0.9 * np.count_nonzero(array == b["label"]) > 0, (name, b["name"])
            box = orientation.box_to_canonical(OrganBox(b["label"], b["name"], b["min_ijk"], b["max_ijk"]))
            canonical_boxes.setdefault(b["name"], set()).add((tuple(box.min_ijk), tuple(box.max_ijk)))
        masks[name] = sitk.GetArrayFromImage(back(rectified))
    # the localizer found the same boxes in every axis order (margin included)
    assert all(len(found) == 1 for found in canonical_boxes.values()), canonical_boxes
    for organ in ORGANS:
        value = by_name[organ]
        reference = masks["original"] == value
        assert dice(reference, truth == value) > 0.7, organ
        for name in ("permuted", "flipped"):
            assert dice(masks[name] == value, reference) >= 0.99, (name, organ)


def test_gt_slice_dice_is_on_the_axial_slices(slab):
    """Evaluation's Dice over the slices that hold the organ counts axial slices in every axis order."""

    labels = sitk.GetArrayFromImage(slab[1])
    truth = labels == 2  # kidney_right, on slices 0..18 of 30
    xs = np.flatnonzero(truth.any((0, 1)))
    pred = truth.copy()
    # false positives on an axial slice without the kidney but over its x range, and on an axial slice
    # with it but beside its x range: sagittal slices would count the first and not the second
    pred[25, 10:15, xs[0]:xs[0] + 5] = True
    pred[5, 10:13, xs[-1] + 5:xs[-1] + 8] = True
    expected = score_mask(pred, truth, (3.0, 3.0, 3.0))
    for name in ("permuted", "mixed"):
        make = VARIANTS[name][0]
        grid = make(slab[1])

        def variant(mask):
            image = sitk.GetImageFromArray(mask.astype(np.uint8))
            image.CopyInformation(slab[1])
            return sitk.GetArrayFromImage(make(image)) > 0

        axis = 2 - Orientation.of(grid).axes[2]
        got = score_mask(variant(pred), variant(truth), (3.0, 3.0, 3.0), axis)
        assert got["dice_gt_slices"] == pytest.approx(expected["dice_gt_slices"]), name
        assert got["dice"] == pytest.approx(expected["dice"]), name
    assert expected["dice_gt_slices"] != pytest.approx(expected["dice"])
    sagittal = score_mask(pred.transpose(2, 1, 0), truth.transpose(2, 1, 0), (3.0, 3.0, 3.0))
    assert sagittal["dice_gt_slices"] != pytest.approx(expected["dice_gt_slices"])


@pytest.mark.slow
def test_evaluate_scores_a_permuted_case_as_the_original(slab, tmp_path):
    """``ursam evaluate`` on a crop and on the same crop with x and z swapped: the same scores (the
    manual baseline is seeded by the case id, so it is left out)."""

    ds = tmp_path / "ds"
    (ds / "cases").mkdir(parents=True)
    (ds / "cases" / "tsA").symlink_to(ABD / "cases" / "tsA", target_is_directory=True)
    for name, make in (("crop", lambda im: im), ("crop_permuted", VARIANTS["permuted"][0])):
        (ds / "cases" / name).mkdir()
        for kind, im in zip(("image", "labels"), slab):
            sitk.WriteImage(make(im[:, :, CROP[0]:CROP[1]]), str(ds / "cases" / name / f"{kind}.nii.gz"))
    meta = json.loads((ABD / "dataset.json").read_text(encoding="utf-8"))
    (ds / "dataset.json").write_text(json.dumps({"name": "orientation", "labels": meta["labels"], "support": ["tsA"],
                                                 "query": ["crop", "crop_permuted"]}))
    out = tmp_path / "eval"
    assert ursam(["evaluate", str(ds), "--methods", "ensemble,ursam,atlas", "--sweep", "--organs", "spleen",
                  "--deformable", "none", "--out", str(out), "--quiet", "--device", "cpu"]) == 0
    for table in ("results.csv", "sweep.csv"):
        rows = {}
        for r in csv.DictReader((out / table).open()):
            rows.setdefault(r.pop("case"), []).append(r)
        assert len(rows["crop"]) >= 3
        assert rows["crop"] == rows["crop_permuted"], table
