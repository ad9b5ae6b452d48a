"""The fast LiteMedSAM encoder path: same masks as eager on a shared case, a clean fallback, a safe cache.

The ONNX Runtime tests are skipped, with the reason, where onnx or onnxruntime is missing.
"""
import os
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from shared_data import ABD, ROOT, case, names
from URSAMLib import pipeline
from URSAMLib.sam import fast_encoder
from URSAMLib.boxes import boxes_from_labels
from URSAMLib.errors import URSAMError
from URSAMLib.evaluation.metrics import dice
from URSAMLib.sam.backends import make_backend

#: largest per-organ Dice difference accepted between the fast and the eager encoder
DICE_TOLERANCE = 0.005


def _need_runtime():
    pytest.importorskip("onnx", reason="the fast encoder path needs onnx (pip install 'ursam[fast]')")
    pytest.importorskip("onnxruntime", reason="the fast encoder path needs onnxruntime (pip install 'ursam[fast]')")


@pytest.fixture(scope="module")
def eager():
    return make_backend("litemedsam", device="cpu", encoder="eager")


@pytest.mark.slow
def test_fast_path_masks_match_eager_on_a_shared_case(litemedsam, eager):
    _need_runtime()
    assert litemedsam.encoder_name == "onnx"  # the default where the runtime is installed
    image, labels = case(ABD, "tsA_slab")
    volume = sitk.GetArrayFromImage(sitk.ReadImage(str(image))).astype(np.float32)[14:17]
    truth = sitk.GetArrayFromImage(sitk.ReadImage(str(labels)))[14:17]
    organs = [1, 2, 3, 5, 13]  # liver, kidneys, spleen, aorta
    boxes = boxes_from_labels(truth, names(ABD), labels=organs)
    feats = [(litemedsam.embed(volume[z])["features"] - eager.embed(volume[z])["features"]).abs().max().item()
             for z in (0, 2)]
    assert max(feats) < fast_encoder.EXACT_TOLERANCE
    params = pipeline.Params(n_aug=3)
    fast_maps, _ = pipeline.run(volume, litemedsam, boxes, params)
    eager_maps, _ = pipeline.run(volume, eager, boxes, params)
    for method in ("auto", "ensemble", "ursam"):
        lf = pipeline.label_map(fast_maps, method, volume.shape)
        le = pipeline.label_map(eager_maps, method, volume.shape)
        for label in organs:
            d_fast, d_eager = dice(lf == label, truth == label), dice(le == label, truth == label)
            assert abs(d_fast - d_eager) <= DICE_TOLERANCE, (method, label, d_fast, d_eager)
        # and the segmentation is a real one, not two empty maps agreeing
        assert dice(lf == 3, truth == 3) > 0.8, method  # spleen


def test_export_is_cached_atomically_in_the_user_cache(tmp_path, monkeypatch, eager):
    _need_runtime()
    cache = tmp_path / "cache"
    monkeypatch.setenv("URSAM_CACHE", str(cache))
    encoder = eager.model.image_encoder
    run, name = fast_encoder.make_encoder(encoder, "onnx", "cpu")
    assert name == "onnx"
    files = sorted(cache.iterdir())
    assert [f.suffix for f in files] == [".onnx"]  # no temporary file left
    path = files[0]
    digest = fast_encoder.weights_digest(encoder)[:20]
    import onnxruntime

    assert digest in path.name and onnxruntime.__version__ in path.name and "fp32" in path.name
    assert ROOT not in path.parents
    x = torch.rand(1, 3, 256, 256)
    with torch.inference_mode():
        assert (run(x) - encoder(x)).abs().max().item() < fast_encoder.EXACT_TOLERANCE
    # a second backend reuses the file, and new weights make a new file
    stamp = path.stat().st_mtime_ns
    fast_encoder.make_encoder(encoder, "onnx", "cpu")
    assert path.stat().st_mtime_ns == stamp and len(list(cache.iterdir())) == 1
    changed = make_backend("litemedsam", device="cpu", encoder="eager").model.image_encoder
    with torch.no_grad():
        changed.neck[0].weight.mul_(1.01)
    assert fast_encoder.artifact_path(changed, "fp32") != path


def test_auto_falls_back_to_eager_and_a_named_path_says_why(monkeypatch, eager):
    encoder = eager.model.image_encoder

    def missing():
        raise fast_encoder.Unavailable("needs onnx and onnxruntime (pip install 'ursam[fast]')")

    monkeypatch.setattr(fast_encoder, "_runtime", missing)
    run, name = fast_encoder.make_encoder(encoder, "auto", "cpu")
    assert run is encoder and name == "eager"
    with pytest.raises(URSAMError, match="encoder path 'onnx' is not available: needs onnx"):
        fast_encoder.make_encoder(encoder, "onnx", "cpu")
    with pytest.raises(URSAMError, match="unknown encoder path 'fastest'"):
        fast_encoder.make_encoder(encoder, "fastest", "cpu")
    backend = make_backend("litemedsam", device="cpu")  # the runtime is "missing" here
    assert backend.encoder_name == "eager" and backend.describe()["encoder"] == "eager"


def test_a_failed_export_is_remembered_until_weights_or_runtimes_change(tmp_path, monkeypatch, eager):
    _need_runtime()
    monkeypatch.setenv("URSAM_CACHE", str(tmp_path))
    calls = []

    def broken(encoder, path):
        calls.append(path)
        raise fast_encoder.Unavailable("the ONNX export differs from eager by 1.0e+00")

    monkeypatch.setattr(fast_encoder, "_export_onnx", broken)
    encoder = eager.model.image_encoder
    for _ in range(2):
        run, name = fast_encoder.make_encoder(encoder, "auto", "cpu")
        assert run is encoder and name == "eager"
    assert len(calls) == 1  # the second run read the note instead of exporting again
    with pytest.raises(URSAMError, match="differs from eager"):
        fast_encoder.make_encoder(encoder, "onnx", "cpu")
    assert [p.name.endswith(".onnx.failed") for p in tmp_path.iterdir()] == [True]

    def full_disk(encoder, path):
        raise fast_encoder.Unavailable("cannot write the exported model: No space left", lasting=False)

    monkeypatch.setattr(fast_encoder, "_export_onnx", full_disk)
    for p in tmp_path.iterdir():
        p.unlink()
    assert fast_encoder.make_encoder(encoder, "auto", "cpu")[1] == "eager"
    assert list(tmp_path.iterdir()) == []  # a passing failure leaves no note: the next run tries again


def test_gpu_device_keeps_the_eager_encoder(eager):
    # ONNX paths are CPU-only; on a GPU "auto" must not try them (no GPU needed to check the rule)
    encoder = eager.model.image_encoder
    run, name = fast_encoder.make_encoder(encoder, "auto", "cuda")
    assert run is encoder and name == "eager"


def test_cache_folder_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.delenv("URSAM_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert fast_encoder.cache_dir() == tmp_path / "xdg" / "ursam"
    monkeypatch.setenv("URSAM_CACHE", str(tmp_path / "mine"))
    assert fast_encoder.cache_dir() == tmp_path / "mine"
    monkeypatch.delenv("URSAM_CACHE")
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert fast_encoder.cache_dir() == Path(os.path.expanduser("~")) / ".cache" / "ursam"
