"""The registration localizer on real H&N CT (METHOD.md §1): boxes from 2 support scans."""
import json

import numpy as np
import pytest
import SimpleITK as sitk
from shared_data import ABD, HN, case, names

from URSAMLib.boxes import OrganBox, box_iou, boxes_from_labels, load_boxes
from URSAMLib.cli import main as ursam
from URSAMLib.localizers import extreme_points, fuse_boxes, localize
from URSAMLib.orientation import canonical
from URSAMLib.registration.affine import SupportRegistration, as_float_image, invert_points
from URSAMLib.registration.deformable import DeformableOptions, refine_registrations
from URSAMLib.templates import Library


@pytest.fixture(scope="module")
def hn_two_supports(tmp_path_factory):
    """A library of 2 H&N supports (links to the shared data, nothing copied)."""
    lib = tmp_path_factory.mktemp("hn2")
    (lib / "cases").mkdir()
    for c in ("pt_4", "pt_13"):
        (lib / "cases" / c).symlink_to(HN / "cases" / c, target_is_directory=True)
    meta = json.loads((HN / "dataset.json").read_text(encoding="utf-8"))
    (lib / "dataset.json").write_text(json.dumps({"labels": meta["labels"], "support": ["pt_4", "pt_13"]}))
    return lib


def test_localize_cli_boxes_overlap_the_truth(hn_two_supports, tmp_path, capsys):
    image, labels = case(HN, "pt_34")
    out = tmp_path / "boxes.json"
    assert ursam(["localize", str(image), "--templates", str(hn_two_supports), "--out", str(out),
                  "--organs", "Mandible,Brainstem,Parotid_L", "--prompts", "box3d", "--quiet"]) == 0
    size = sitk.ReadImage(str(image)).GetSize()
    boxes = {b.name: b for b in load_boxes(out, size)}
    assert sorted(boxes) == ["Brainstem", "Mandible", "Parotid_L"]
    data = json.loads(out.read_text(encoding="utf-8"))
    info = data["localization"]
    assert set(info["registration_seconds"]) == {"pt_4", "pt_13"}
    assert all(s > 0 for s in info["registration_seconds"].values())
    assert info["margin_z_xy"] == [2, 10.0]
    truth = {b.name: b for b in boxes_from_labels(sitk.GetArrayFromImage(sitk.ReadImage(str(labels))),
                                                  names(HN))}
    raw = {b["name"]: OrganBox(b["label"], b["name"], b["min_ijk"], b["max_ijk"]) for b in info["raw_boxes"]}
    for organ in ("Mandible", "Brainstem", "Parotid_L"):
        assert box_iou(raw[organ], truth[organ]) >= 0.3, (organ, raw[organ], truth[organ])
        # The saved box is the raw box plus the METHOD.md §1 margin: 2 slices in z.
        assert boxes[organ].min_ijk[2] == max(0, raw[organ].min_ijk[2] - 2)
        assert boxes[organ].max_ijk[2] == min(size[2] - 1, raw[organ].max_ijk[2] + 2)


def test_extreme_points_lie_on_the_organ():
    labels = np.zeros((20, 30, 40), np.uint8)
    labels[5:12, 10:20, 8:30] = 3
    pts = extreme_points(labels, 3)
    assert pts.shape == (6, 3)
    xs, ys, zs = pts[:, 0], pts[:, 1], pts[:, 2]
    assert (xs.min(), xs.max(), ys.min(), ys.max(), zs.min(), zs.max()) == (8, 29, 10, 19, 5, 11)
    for x, y, z in pts.astype(int):
        assert labels[z, y, x] == 3
    assert extreme_points(labels, 1) is None


def _reference(size=(50, 40, 30)):
    ref = sitk.Image(size, sitk.sitkUInt8)
    ref.SetSpacing((2.0, 2.0, 3.0))
    return ref


def test_fusion_takes_the_median_and_skips_organs_outside(capsys):
    ref = _reference()
    phys = lambda idx: np.array([ref.TransformContinuousIndexToPhysicalPoint(p) for p in idx])  # noqa: E731
    inside = phys([[10, 10, 5], [20, 10, 5], [15, 5, 5], [15, 15, 5], [15, 10, 2], [15, 10, 8]])
    outlier = inside + 200.0  # one support registered badly: the median of three ignores it
    far = inside + 1000.0
    regs = [SupportRegistration(c, sitk.Transform(), 1.0, 0.0, {1: p, 2: far})
            for c, p in (("a", inside), ("b", inside), ("c", outlier))]
    warnings = []
    boxes, raw, skipped, spread = fuse_boxes(ref, regs, {1: "liver", 2: "spleen", 3: "pancreas"},
                                             margin=(2, 0), warn=warnings.append)
    assert [b.name for b in boxes] == ["liver"]
    assert raw[0].min_ijk == [10, 5, 2] and raw[0].max_ijk == [20, 15, 8]
    assert boxes[0].min_ijk[2] == 0 and boxes[0].max_ijk[2] == 10
    assert skipped == {"spleen": "its box lies outside the image", "pancreas": "no support scan labels it"}
    assert any("spleen was not localized" in w for w in warnings)


def test_points_go_through_the_inverse_of_a_deformable_transform():
    ref = _reference()
    affine = sitk.AffineTransform(3)
    affine.SetMatrix((1.05, 0.02, 0, -0.03, 0.97, 0, 0, 0.01, 1.02))
    affine.SetTranslation((4.0, -3.0, 6.0))
    bspline = sitk.BSplineTransformInitializer(ref, [3, 3, 3], 3)
    rng = np.random.default_rng(0)
    bspline.SetParameters(tuple(rng.normal(0, 1.5, len(bspline.GetParameters()))))
    composite = sitk.CompositeTransform([affine, bspline])
    targets = np.array([[20.0, 30.0, 40.0], [50.0, 10.0, 20.0], [70.0, 60.0, 45.0]])
    found = invert_points(composite, targets)
    back = np.array([composite.TransformPoint(q.tolist()) for q in found])
    np.testing.assert_allclose(back, targets, atol=0.1)
    np.testing.assert_allclose(invert_points(affine, [affine.TransformPoint((1.0, 2.0, 3.0))]), [[1, 2, 3]],
                               atol=1e-6)


def test_registrations_and_the_deformable_stage_repeat_exactly(hn_two_supports):
    """Seeded runs repeat: the same transforms to the last bit, run after run (ITK reads seed 0 as the
    wall clock, and its multi-threaded sums change order between runs; neither may leak into a result)."""

    image, _ = case(HN, "pt_34")
    lib = Library(hn_two_supports)
    opts = DeformableOptions(demons_iterations=(10, 5), demons_shrink=(4, 2))
    runs = []
    for _ in range(2):
        loc = localize(image, lib, organs=["Brainstem", "Larynx"], iterations=10)
        refined = refine_registrations(canonical(as_float_image(image)), loc.registrations, lib, opts)
        fields = [sitk.CompositeTransform(r.transform).GetNthTransform(1) for r in refined]
        runs.append((loc, [sitk.GetArrayFromImage(sitk.DisplacementFieldTransform(f).GetDisplacementField())
                           for f in fields]))
    (a, fa), (b, fb) = runs
    for ra, rb in zip(a.registrations, b.registrations):
        assert ra.transform.GetParameters() == rb.transform.GetParameters() and ra.metric == rb.metric
    assert [x.to_json() for x in a.boxes] == [x.to_json() for x in b.boxes]
    for x, y in zip(fa, fb):
        assert np.array_equal(x, y)


def test_a_library_of_slabs_localizes_organs_in_a_whole_scan(tmp_path):
    """Supports that cover a small part of the query (slabs of the brainstem and parotid level against a whole
    head and neck scan) leave some offsets of the first search without overlap; the search goes on without
    them and the organs land on the truth."""

    ids = ["pt_4", "pt_13", "pt_17"]
    for c in ids:
        image, labels = (sitk.ReadImage(str(p)) for p in case(HN, c))
        arr = sitk.GetArrayFromImage(labels)
        z = np.flatnonzero(np.isin(arr, [1, 4]).any((1, 2)))
        lo, hi = int(z.min()) - 1, int(z.max()) + 2
        kept = sitk.GetImageFromArray(np.where(np.isin(arr, [1, 4]), arr, 0).astype(np.uint8))
        kept.CopyInformation(labels)
        (tmp_path / "cases" / c).mkdir(parents=True)
        sitk.WriteImage(image[:, :, lo:hi], str(tmp_path / "cases" / c / "image.nii.gz"))
        sitk.WriteImage(kept[:, :, lo:hi], str(tmp_path / "cases" / c / "labels.nii.gz"))
    (tmp_path / "dataset.json").write_text(json.dumps({"labels": {"1": "Brainstem", "4": "Parotid_L"},
                                                       "support": ids}))
    image, labels = (sitk.ReadImage(str(p)) for p in case(HN, "pt_31"))
    loc = localize(image, Library(tmp_path))
    truth = {b.name: b for b in boxes_from_labels(sitk.GetArrayFromImage(labels), {1: "Brainstem", 4: "Parotid_L"})}
    assert {b.name for b in loc.boxes} == {"Brainstem", "Parotid_L"}
    for b in loc.boxes:
        t = truth[b.name]
        lo, hi = np.maximum(b.min_ijk, t.min_ijk), np.minimum(b.max_ijk, t.max_ijk)
        covered = np.prod(np.clip(hi - lo + 1, 0, None)) / np.prod(np.array(t.max_ijk) - t.min_ijk + 1)
        assert covered > 0.6, (b, t)


def test_a_scan_of_three_slices_is_registered_without_an_itk_error():
    """ITK's pyramid needs four voxels along every axis; a scan of three slices is registered on a grid padded
    with air, and each organ is placed or skipped with its reason."""

    image = sitk.ReadImage(str(case(ABD, "tsA_slab")[0]))[:, :, 12:15]
    loc = localize(image, Library(ABD))
    placed = {b.name for b in loc.boxes}
    skipped = loc.info.get("skipped", {})
    assert placed | set(skipped) == set(names(ABD).values()) and not placed & set(skipped)
    assert all(reason for reason in skipped.values())
