"""DICOM in, DICOM out: RT Structure Sets and SEGs of real label maps, read back by other libraries.

Real scans (hn-openkbp pt_34, abdomen-ts tsA_slab) are written as DICOM CT
series as scanners store them for each patient position (dicom_series.py):
HFS, FFS, HFP, FFP, and HFS stored in reverse order. The structure set is read
back by dcmrtstruct2nii (its own series reader and polygon filling, scikit-image),
the SEG by highdicom, and both are compared with the label map on the series'
grid; every reference is checked against the files of the series.
"""
import json

import highdicom as hd
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from dcmrtstruct2nii.adapters.convert.rtstructcontour2mask import DcmPatientCoords2Mask
from dcmrtstruct2nii.adapters.input.contours.rtstructinputadapter import RtStructInputAdapter
from dcmrtstruct2nii.adapters.input.image.dcminputadapter import DcmInputAdapter
from dicom_series import on_grid, write_series
from shared_data import ABD, HN, case, names

from URSAMLib import terminology
from URSAMLib.boxes import boxes_from_labels, save_boxes
from URSAMLib.cli import main
from URSAMLib.dicom.rtstruct import write_rtstruct
from URSAMLib.dicom.seg import write_seg
from URSAMLib.dicom.series import find_series
from URSAMLib.imageio import read_ct
from URSAMLib.outputs import segment_entries

if not hasattr(pydicom, "read_file"):
    pydicom.read_file = pydicom.dcmread  # dcmrtstruct2nii 5 still calls the name pydicom 3 dropped

#: (patient position, slices stored in reverse order)
LAYOUTS = {"HFS": ("HFS", False), "FFS": ("FFS", False), "HFP": ("HFP", False), "FFP": ("FFP", False),
           "HFS-reversed": ("HFS", True)}
#: case -> (dataset, case id, in-plane voxel size to give it or None): the last has rectangular pixels, so a
#: writer or reader that swaps PixelSpacing's two values (between rows, between columns) shows
CASES = {"pt_34": (HN, "pt_34", None), "tsA_slab": (ABD, "tsA_slab", None),
         "tsA_slab-rectangular-pixels": (ABD, "tsA_slab", (3.0, 2.2))}
HN_NAMES = ["Brainstem", "SpinalCord", "Parotid_R", "Parotid_L", "Esophagus", "Larynx", "Bone_Mandible"]
ABD_NAMES = ["Liver", "Kidney_R", "Spleen", "Pancreas", "A_Aorta", "V_Venacava_I", "Glnd_Adrenal_R", "Glnd_Adrenal_L",
             "Gallbladder", "Esophagus", "Stomach", "Duodenum", "Kidney_L"]
TG263 = {"pt_34": HN_NAMES, "tsA_slab": ABD_NAMES, "tsA_slab-rectangular-pixels": ABD_NAMES}


def dice(a, b):
    return 1.0 if not a.any() and not b.any() else 2.0 * (a & b).sum() / (a.sum() + b.sum())


def read_back(rtstruct, folder):
    """``(image, {ROI name: mask [z, y, x]})`` as dcmrtstruct2nii reads a structure set onto its own reading of the
    series."""
    image = DcmInputAdapter().ingest(str(folder))
    masks = {}
    for roi in RtStructInputAdapter().ingest(str(rtstruct)):
        masks[roi["name"]] = sitk.GetArrayFromImage(DcmPatientCoords2Mask().convert(roi.get("sequence", []), image,
                                                                                     0, 1)) > 0
    return image, masks


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """Every case in every layout: the series, its label map on the series' grid, the structure set and the SEG."""
    root = tmp_path_factory.mktemp("dicom")
    out = {}
    for case_id, (dataset, cid, in_plane) in CASES.items():
        image_path, labels_path = case(dataset, cid)
        image, labels = sitk.ReadImage(str(image_path)), sitk.ReadImage(str(labels_path))
        if in_plane:
            for img in (image, labels):
                img.SetSpacing((*in_plane, img.GetSpacing()[2]))
        organs = sorted(names(dataset).items())
        for layout, (position, reverse) in LAYOUTS.items():
            folder = root / case_id / layout
            meta = write_series(image, folder / "ct", position, reverse)
            reference, _ = read_ct(folder / "ct")
            grid = on_grid(labels, reference)
            series = find_series(folder / "ct")
            write_rtstruct(grid, organs, series, folder / "rtstruct.dcm")
            write_seg(grid, organs, series, folder / "seg.dcm")
            out[case_id, layout] = dict(folder=folder, meta=meta, labels=labels, grid=grid, organs=organs,
                                        series=series)
    return out


@pytest.mark.parametrize("case_id", CASES)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_structure_set_round_trip_through_an_independent_reader(written, case_id, layout):
    w = written[case_id, layout]
    image, masks = read_back(w["folder"] / "rtstruct.dcm", w["folder"] / "ct")
    assert list(masks) == TG263[case_id]
    truth = on_grid(w["labels"], image)  # the labels on dcmrtstruct2nii's own reading of the series
    scores = {name: dice(masks[name], truth == label) for (label, _), name in zip(w["organs"], masks)}
    assert min(scores.values()) >= 0.97, scores
    print(f"{case_id} {layout}: min Dice over organs {min(scores.values()):.4f}")


def test_the_same_anatomy_gives_the_same_contours_in_every_position(written):
    """The structure set describes the patient, not the pixel grid: each layout's contours, filled by the
    independent reader and put back on the scan's own grid, are the same voxels."""
    for case_id in CASES:
        masks = []
        for layout in LAYOUTS:
            w = written[case_id, layout]
            image, read = read_back(w["folder"] / "rtstruct.dcm", w["folder"] / "ct")
            labels = np.zeros(sitk.GetArrayFromImage(image).shape, np.uint8)
            for (label, _), name in zip(w["organs"], read):
                labels[read[name]] = label
            back = sitk.GetImageFromArray(labels)
            back.CopyInformation(image)
            masks.append(on_grid(back, w["labels"]))
        original = sitk.GetArrayFromImage(written[case_id, "HFS"]["labels"])
        for layout, mask in zip(LAYOUTS, masks):
            assert np.array_equal(mask, original), (case_id, layout)


def _slice_headers(folder):
    headers = {}
    for path in folder.iterdir():
        ds = pydicom.dcmread(str(path), stop_before_pixels=True)
        headers[ds.SOPInstanceUID] = ds
    return headers


@pytest.mark.parametrize("layout", ["FFS", "HFP", "HFS-reversed"])
def test_every_reference_is_a_slice_of_the_series_and_each_contour_lies_on_its_slice(written, layout):
    w = written["tsA_slab", layout]
    meta = w["meta"]
    headers = _slice_headers(w["folder"] / "ct")
    ds = pydicom.dcmread(str(w["folder"] / "rtstruct.dcm"))
    assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.481.3" and ds.Modality == "RTSTRUCT"
    assert ds.file_meta.TransferSyntaxUID == pydicom.uid.ImplicitVRLittleEndian
    assert ds.StudyInstanceUID == meta.study_uid and ds.PatientID == "URSAM-TEST"
    assert ds.FrameOfReferenceUID == meta.frame_of_reference_uid
    (frame,) = ds.ReferencedFrameOfReferenceSequence
    assert frame.FrameOfReferenceUID == meta.frame_of_reference_uid
    (study,) = frame.RTReferencedStudySequence
    assert study.ReferencedSOPInstanceUID == meta.study_uid
    (series,) = study.RTReferencedSeriesSequence
    assert series.SeriesInstanceUID == meta.series_uid
    assert sorted(i.ReferencedSOPInstanceUID for i in series.ContourImageSequence) == sorted(headers)
    colours = [tuple(int(round(255 * c)) for c in e["color"]) for e in segment_entries(w["organs"])]
    assert [tuple(int(v) for v in r.ROIDisplayColor) for r in ds.ROIContourSequence] == colours  # the .seg.nrrd's
    for roi in ds.StructureSetROISequence:
        assert roi.ReferencedFrameOfReferenceUID == meta.frame_of_reference_uid
        assert roi.ROIGenerationAlgorithm == "AUTOMATIC"
    assert [o.RTROIInterpretedType for o in ds.RTROIObservationsSequence] == ["ORGAN"] * len(w["organs"])
    assert [o.ReferencedROINumber for o in ds.RTROIObservationsSequence] == \
        [r.ROINumber for r in ds.StructureSetROISequence]
    contours = 0
    for item in ds.ROIContourSequence:
        for contour in item.get("ContourSequence", []):
            (ref,) = contour.ContourImageSequence
            header = headers[ref.ReferencedSOPInstanceUID]
            assert ref.ReferencedSOPClassUID == header.SOPClassUID
            points = np.asarray(contour.ContourData, float).reshape(-1, 3)
            assert contour.ContourGeometricType == "CLOSED_PLANAR"
            assert contour.NumberOfContourPoints == len(points) >= 3
            iop = np.asarray(header.ImageOrientationPatient, float)
            normal = np.cross(iop[:3], iop[3:])
            assert np.abs((points - np.asarray(header.ImagePositionPatient, float)) @ normal).max() < 1e-3
            contours += 1
    assert contours > 50


@pytest.mark.parametrize("layout", ["FFS", "HFP"])
def test_a_ring_an_island_in_it_and_single_voxels_come_back(written, layout, tmp_path):
    """Holes: a ring with an island in its hole, a one-voxel piece and two voxels touching at a corner, on the
    slices of a real series, read back by the independent reader voxel for voxel."""
    w = written["tsA_slab", layout]
    labels = np.zeros_like(w["grid"])
    labels[5:9, 30:45, 40:60] = 1
    labels[5:9, 33:42, 44:56] = 0  # the hole
    labels[6:8, 36:39, 48:51] = 1  # an island in it
    labels[10, 70, 20] = 1
    labels[11, 60, 60] = labels[11, 61, 61] = 1
    series = w["series"]
    write_rtstruct(labels, [(1, "ring")], series, tmp_path / "rtstruct.dcm")
    image, masks = read_back(tmp_path / "rtstruct.dcm", w["folder"] / "ct")
    back = sitk.GetImageFromArray(masks["ring"].astype(np.uint8))
    back.CopyInformation(image)
    reference, _ = read_ct(w["folder"] / "ct")
    assert np.array_equal(on_grid(back, reference), labels)
    ds = pydicom.dcmread(str(tmp_path / "rtstruct.dcm"))
    per_slice = {}
    for contour in ds.ROIContourSequence[0].ContourSequence:
        uid = contour.ContourImageSequence[0].ReferencedSOPInstanceUID
        per_slice[uid] = per_slice.get(uid, 0) + 1
    uids = [s.sop_instance_uid for s in series.slices]
    assert [per_slice.get(uids[k], 0) for k in (5, 6, 10, 11, 12)] == [1, 2, 1, 2, 0]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_seg_reads_back_voxel_for_voxel_with_the_terminology_codes(written, layout):
    for case_id in CASES:
        w = written[case_id, layout]
        seg = hd.seg.segread(str(w["folder"] / "seg.dcm"))
        uids = [s.sop_instance_uid for s in w["series"].slices]
        numbers = seg.get_pixels_by_source_instance(uids, combine_segments=True,
                                                    assert_missing_frames_are_empty=True)
        labels = np.zeros(numbers.shape, np.int32)
        for number, (label, _) in enumerate(w["organs"], start=1):
            labels[numbers == number] = label
        assert np.array_equal(labels, w["grid"]), case_id
        assert seg.FrameOfReferenceUID == w["meta"].frame_of_reference_uid
        assert seg.StudyInstanceUID == w["meta"].study_uid
        assert {r[2] for r in seg.get_source_image_uids()} <= set(uids)
        for number, (label, name) in enumerate(w["organs"], start=1):
            description = seg.get_segment_description(number)
            assert description.SegmentLabel == TG263[case_id][number - 1]
            assert description.SegmentAlgorithmType == "AUTOMATIC"
            term = terminology.lookup(name, label)[2]
            kind = description.SegmentedPropertyTypeCodeSequence[0]
            assert (kind.CodingSchemeDesignator, kind.CodeValue) == tuple(term["type"][:2]), name
            modifier = description.get("SegmentedPropertyTypeModifierCodeSequence")
            assert (modifier[0].CodeValue if modifier else None) == (term.get("typeModifier") or [None, None])[1]


# ----------------------------------------------------------------------------------------------
# Through the command line: bad input, ursam segment, ursam batch

@pytest.fixture(scope="module")
def crop(tmp_path_factory):
    """Four slices of tsA_slab (image, labels) with a box file of four organs for the series' grid."""
    folder = tmp_path_factory.mktemp("crop")
    image_path, labels_path = case(ABD, "tsA_slab")
    image = sitk.ReadImage(str(image_path))[:, :, 12:16]
    labels = sitk.ReadImage(str(labels_path))[:, :, 12:16]
    return folder, image, labels


def boxes_for(series_folder, labels, path):
    reference, _ = read_ct(series_folder)
    save_boxes(boxes_from_labels(on_grid(labels, reference), names(ABD), labels=[1, 2, 3, 13]), path)
    return path


def run_cli(capsys, *args):
    code = main([str(a) for a in args])
    err = capsys.readouterr().err.strip().splitlines()
    return code, [line for line in err if line.startswith("ursam: error")], err


def assert_refused(capsys, out, *args, says):
    code, errors, err = run_cli(capsys, "segment", *args, "--out", out, "--quiet", "--device", "cpu")
    assert code == 2, err
    assert len(err) == 1 and len(errors) == 1, err
    assert says in errors[0], errors[0]
    assert not out.exists() or not any(out.iterdir())
    return errors[0]


def test_bad_dicom_inputs_are_one_line_and_exit_2(crop, tmp_path, capsys):
    folder, image, labels = crop
    good = write_series(image, tmp_path / "good", "FFS").folder
    boxes = boxes_for(good, labels, tmp_path / "boxes.json")
    nifti = tmp_path / "ct.nii.gz"
    sitk.WriteImage(image, str(nifti))
    out = tmp_path / "out"

    msg = assert_refused(capsys, out, nifti, "--boxes", boxes, "--dicom-out", "rtstruct", says="--dicom-out needs")
    assert str(nifti) in msg
    assert_refused(capsys, out, good, "--boxes", boxes, "--dicom-out", "rtss", says="--dicom-out takes")
    assert_refused(capsys, out, nifti, "--boxes", boxes, "--series", "1.2.3", says="--series chooses")

    two = tmp_path / "two"
    first = write_series(image, two, "HFS", prefix="A", description="first")
    second = write_series(image[:, :, :3], two, "HFS", prefix="B", study_uid=first.study_uid, description="second")
    msg = assert_refused(capsys, out, two, "--boxes", boxes, says="choose one with --series UID")
    assert first.series_uid in msg and second.series_uid in msg and str(two) in msg
    assert_refused(capsys, out, two, "--boxes", boxes, "--series", "9.9.9", says="no DICOM series 9.9.9")
    _, volume = read_ct(two, second.series_uid)
    assert volume.shape[0] == 3

    mr = write_series(image, tmp_path / "mr", "HFS", modality="MR").folder
    msg = assert_refused(capsys, out, mr, "--boxes", boxes, says="is MR, not CT")
    assert str(mr) in msg

    gap = write_series(image, tmp_path / "gap", "HFS").folder
    (gap / "IM0002.dcm").unlink()
    msg = assert_refused(capsys, out, gap, "--boxes", boxes, says="missing slices")
    assert "IM0001.dcm and IM0003.dcm" in msg and str(gap) in msg

    no_frame = write_series(image, tmp_path / "noframe", "HFS", with_frame_of_reference=False).folder
    assert_refused(capsys, out, no_frame, "--boxes", boxes, "--dicom-out", "seg", says="no Frame of Reference UID")

    out.mkdir()
    (out / "keep.txt").write_text("older results")
    code, errors, err = run_cli(capsys, "segment", good, "--boxes", boxes, "--dicom-out", "rtstruct,seg", "--out", out,
                                "--quiet")
    assert code == 2 and len(err) == 1 and "output folder is not empty" in errors[0]
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def _check_objects(scan_out, series_folder):
    """The structure set and the SEG of a run equal its rectified.nii.gz, read back by the independent readers."""
    rectified = sitk.ReadImage(str(scan_out / "rectified.nii.gz"))
    report = json.loads((scan_out / "report.json").read_text(encoding="utf-8"))
    organs = [(o["label"], o["name"]) for o in report["organs"]]
    image, masks = read_back(scan_out / "rtstruct.dcm", series_folder)
    truth = on_grid(rectified, image)
    for (label, _), name in zip(organs, masks):
        assert np.array_equal(masks[name], truth == label), name
    assert any(m.any() for m in masks.values())
    series = find_series(series_folder)
    seg = hd.seg.segread(str(scan_out / "seg.dcm"))
    numbers = seg.get_pixels_by_source_instance([s.sop_instance_uid for s in series.slices], combine_segments=True,
                                                assert_missing_frames_are_empty=True)
    labels = np.zeros(numbers.shape, np.int32)
    for number, (label, _) in enumerate(organs, start=1):
        labels[numbers == number] = label
    assert np.array_equal(labels, sitk.GetArrayFromImage(rectified))
    assert report["dicom_out"]["series_instance_uid"] == series.series_instance_uid
    assert report["dicom_out"]["files"] == ["rtstruct.dcm", "seg.dcm"]


def test_segment_writes_the_structure_set_and_seg_of_its_result(crop, tmp_path, capsys):
    _, image, labels = crop
    series = write_series(image, tmp_path / "ct", "FFS").folder
    boxes = boxes_for(series, labels, tmp_path / "boxes.json")
    out = tmp_path / "out"
    code, errors, err = run_cli(capsys, "segment", series, "--boxes", boxes, "--dicom-out", "seg,rtstruct", "--out",
                                out, "--quiet", "--device", "cpu")
    assert code == 0, err
    assert {"rtstruct.dcm", "seg.dcm", "rectified.nii.gz"} <= {p.name for p in out.iterdir()}
    _check_objects(out, series)


def test_batch_writes_both_objects_for_each_dicom_series(crop, tmp_path, capsys):
    _, image, labels = crop
    lines = ["id,image,boxes"]
    for position in ("HFP", "FFS"):
        series = write_series(image, tmp_path / position, position).folder
        boxes_for(series, labels, tmp_path / f"{position}.json")
        lines.append(f"{position},{position},{position}.json")
    manifest = tmp_path / "manifest.csv"
    manifest.write_text("\n".join(lines) + "\n", encoding="utf-8")
    out = tmp_path / "out"
    code, errors, err = run_cli(capsys, "batch", manifest, "--dicom-out", "rtstruct,seg", "--out", out, "--device",
                                "cpu", "--quiet")
    assert code == 0, err
    for position in ("HFP", "FFS"):
        _check_objects(out / position, tmp_path / position)

    mixed = tmp_path / "mixed"
    mixed.mkdir()
    sitk.WriteImage(image, str(mixed / "plain.nii.gz"))
    write_series(image, mixed / "dicom", "HFS")
    code, errors, err = run_cli(capsys, "batch", mixed, "--dicom-out", "rtstruct", "--out", tmp_path / "o2",
                                "--quiet")
    assert code == 2 and len(errors) == 1 and "plain.nii.gz" in errors[0], err
    assert not (tmp_path / "o2").exists()
