"""`ursam bench` on a small crop of real CT: the encoder-call rule and the JSON record (no timing checks)."""
import json

import pytest
import SimpleITK as sitk
from shared_data import ABD, case, names

from URSAMLib.boxes import boxes_from_labels, save_boxes
from URSAMLib.cli import main
from URSAMLib.pipeline import distinct_slices

KEYS = ("distinct_slices", "encoder_calls", "seconds_n1", "seconds_n3", "ratio_n3_n1", "encoder_ms_per_slice",
        "speedup_fast_vs_eager", "dice_delta_fast_vs_eager", "peak_rss_mb")


@pytest.fixture(scope="module")
def crop(tmp_path_factory):
    """Three slices of tsA_slab cut to 80 x 60 voxels, three organs of which one spans a single slice."""
    image, labels = case(ABD, "tsA_slab")
    folder = tmp_path_factory.mktemp("benchcrop")
    img = sitk.ReadImage(str(image))[20:100, 25:85, 12:15]
    lab = sitk.ReadImage(str(labels))[20:100, 25:85, 12:15]
    sitk.WriteImage(img, str(folder / "image.nii.gz"))
    sitk.WriteImage(lab, str(folder / "labels.nii.gz"))
    boxes = boxes_from_labels(sitk.GetArrayFromImage(lab), names(ABD), labels=[2, 3, 5])
    boxes[2].min_ijk[2] = boxes[2].max_ijk[2] = 1
    save_boxes(boxes, folder / "boxes.json")
    return folder, boxes


@pytest.mark.slow
def test_bench_prints_a_summary_then_the_json_record(crop, capsys):
    folder, boxes = crop
    code = main(["bench", str(folder / "image.nii.gz"), "--boxes", str(folder / "boxes.json"),
                 "--labels", str(folder / "labels.nii.gz"), "--timing-slices", "1", "--rounds", "1",
                 "--device", "cpu", "--json", str(folder / "bench.json")])
    assert code == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) > 3 and "encoder ms/slice" in "\n".join(lines[:-1])
    record = json.loads(lines[-1])
    assert json.loads((folder / "bench.json").read_text()) == record
    for key in KEYS:
        assert key in record, key
    # the encoder-call rule: one call per slice of the union of the boxes, for n = 1 and n = 3 alike
    union = distinct_slices(boxes)
    assert record["distinct_slices"] == len(union) == 3
    assert record["encoder_calls"] == record["encoder_calls_n1"] == 3
    assert record["seconds_n1"] > 0 and record["seconds_n3"] > 0
    # the seconds are printed to 0.01 s, the ratio from the unrounded ones: on runs of a few seconds they
    # agree to about 0.5 %
    assert record["ratio_n3_n1"] == pytest.approx(record["seconds_n3"] / record["seconds_n1"], rel=0.01)
    assert "eager" in record["encoder_ms_per_slice"] and all(v > 0 for v in record["encoder_ms_per_slice"].values())
    assert record["peak_rss_mb"] > 100
    if len(record["encoder_ms_per_slice"]) > 1:  # a fast path was there: it was compared on this case
        assert record["speedup_fast_vs_eager"] > 0
        assert 0 <= record["dice_delta_fast_vs_eager"] <= 0.005
        assert set(record["dice_ursam_fast"]) == {b.name for b in boxes}
    else:
        assert record["speedup_fast_vs_eager"] is None and record["dice_delta_fast_vs_eager"] is None
    assert set(record["decoder_ms_per_box"]) == {"eager", "fast"}


def test_bench_reports_bad_input_in_one_line(crop, tmp_path, capsys):
    folder, _ = crop
    missing = tmp_path / "nope.json"
    code = main(["bench", str(folder / "image.nii.gz"), "--boxes", str(missing), "--device", "cpu"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith("ursam: error: box file not found") and str(missing) in err[-1]
    code = main(["bench", str(folder / "image.nii.gz"), "--boxes", str(folder / "boxes.json"),
                 "--n-values", "3,1"])
    assert code == 2 and "--n-values must satisfy 1 <= N1 < N3" in capsys.readouterr().err


@pytest.fixture(scope="module")
def slab10(tmp_path_factory):
    """Ten slices of tsA_slab, whole in-plane: enough of the abdomen for the registration to place it (a crop
    of three slices matches no part of the support)."""
    image, _ = case(ABD, "tsA_slab")
    path = tmp_path_factory.mktemp("benchslab") / "image.nii.gz"
    sitk.WriteImage(sitk.ReadImage(str(image))[:, :, 10:20], str(path))
    return path


@pytest.mark.slow
def test_bench_times_the_whole_case_and_each_support_from_a_template_library(slab10, capsys):
    code = main(["bench", str(slab10), "--templates", str(ABD), "--encoders", "auto",
                 "--timing-slices", "1", "--rounds", "1", "--n-values", "1,2", "--device", "cpu"])
    assert code == 0
    record = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    reg = record["registration"]
    assert reg["supports"] == 1 and set(reg["affine_seconds_per_support"]) == {"tsA"}
    assert reg["deformable"] == "demons" and reg["deformable_seconds_per_support"]["tsA"] > 0
    assert set(reg["affine_stage_seconds"]["tsA"]) == {"initialize", "rigid", "affine"}
    # the whole case holds the registrations and one SAM run with every output
    assert record["whole_case_seconds"] > reg["localize_seconds"] + reg["deformable_seconds"]
    assert record["encoder_calls"] == record["distinct_slices"] > 0
    assert record["paths"][record["encoder_path"]]["exact"]
    # the whole case in a fresh process: each stage's wall and CPU seconds, and the start-up before the run
    fresh = record["fresh_case"]
    stages = fresh["stages"]
    assert list(stages)[:3] == ["start-up", "read", "localize"] and {"segment", "write"} <= set(stages)
    assert all(wall >= 0 and cpu >= 0 for wall, cpu in stages.values())
    assert stages["start-up"][0] > 0.5  # an interpreter and its imports
    assert sum(wall for wall, _ in stages.values()) <= fresh["wall_seconds"] + 0.5
    assert stages["localize"][0] >= reg["affine_seconds_per_support"]["tsA"] * 0.5
