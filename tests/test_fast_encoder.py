"""The fast encoder paths: same masks as eager on a shared case, a clean fallback, a safe cache.

OpenVINO is a dependency of the default install; the ONNX Runtime tests are skipped, with the reason,
where onnx or onnxruntime is missing.
"""
import os
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from shared_data import ABD, ROOT, case, names

from URSAMLib import pipeline
from URSAMLib.boxes import boxes_from_labels
from URSAMLib.errors import URSAMError
from URSAMLib.metrics import dice
from URSAMLib.prompt_modes import PromptSet
from URSAMLib.sam import backends, fast_encoder
from URSAMLib.sam.backends import make_backend

#: largest per-organ Dice difference accepted between the fast and the eager encoder
DICE_TOLERANCE = 0.005


def _need_runtime():
    pytest.importorskip("onnx", reason="the fast encoder path needs onnx (pip install 'ursam[fast]')")
    pytest.importorskip("onnxruntime", reason="the fast encoder path needs onnxruntime (pip install 'ursam[fast]')")


def _without_openvino(monkeypatch):
    """As where openvino does not import (a platform without its wheel)."""
    def no_openvino():
        raise fast_encoder.Unavailable("needs openvino (pip install openvino): No module named 'openvino'")

    monkeypatch.setattr(fast_encoder, "_openvino", no_openvino)


@pytest.fixture(scope="module")
def eager():
    return make_backend("litemedsam", device="cpu", encoder="eager")


@pytest.mark.slow
@pytest.mark.parametrize("path", ["auto", "onnx"])
def test_fast_path_masks_match_eager_on_a_shared_case(litemedsam, eager, path):
    if path == "onnx":
        _need_runtime()
        litemedsam = make_backend("litemedsam", device="cpu", encoder="onnx")
    else:
        assert litemedsam.encoder_name == "openvino"  # the default: OpenVINO is in the default install
    image, labels = case(ABD, "tsA_slab")
    volume = sitk.GetArrayFromImage(sitk.ReadImage(str(image))).astype(np.float32)[14:17]
    truth = sitk.GetArrayFromImage(sitk.ReadImage(str(labels)))[14:17]
    organs = [1, 2, 3, 5, 13]  # liver, kidneys, spleen, aorta
    boxes = boxes_from_labels(truth, names(ABD), labels=organs)
    feats = [(litemedsam.embed(volume[z])["features"] - eager.embed(volume[z])["features"]).abs().max().item()
             for z in (0, 2)]
    assert max(feats) < fast_encoder.EXACT_TOLERANCE
    params = pipeline.Params(n_aug=3)
    fast_maps, _ = pipeline.run(volume, litemedsam, [PromptSet("box3d", boxes)], params)
    eager_maps, _ = pipeline.run(volume, eager, [PromptSet("box3d", boxes)], params)
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
    import onnxruntime  # noqa: PLC0415 (optional encoder path)

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
    _without_openvino(monkeypatch)
    assert fast_encoder.available_paths() == ()
    with pytest.raises(URSAMError, match="encoder path 'openvino' is not available: needs openvino"):
        fast_encoder.make_encoder(encoder, "openvino", "cpu")
    run, name = fast_encoder.make_encoder(encoder, "auto", "cpu")
    assert run is encoder and name == "eager"
    with pytest.raises(URSAMError, match="encoder path 'onnx' is not available: needs onnx"):
        fast_encoder.make_encoder(encoder, "onnx", "cpu")
    with pytest.raises(URSAMError, match="unknown encoder path 'fastest'"):
        fast_encoder.make_encoder(encoder, "fastest", "cpu")
    backend = make_backend("litemedsam", device="cpu")  # the runtimes are "missing" here
    assert backend.encoder_name == "eager" and backend.describe()["encoder"] == "eager"


def test_a_failed_export_is_remembered_until_weights_or_runtimes_change(tmp_path, monkeypatch, eager):
    _need_runtime()
    monkeypatch.setenv("URSAM_CACHE", str(tmp_path))
    calls = []

    def broken(encoder, path):
        calls.append(path)
        raise fast_encoder.Unavailable("the ONNX export differs from eager by 1.0e+00")

    monkeypatch.setattr(fast_encoder, "_export_onnx", broken)
    _without_openvino(monkeypatch)
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


@pytest.fixture(scope="module")
def ov_cache(tmp_path_factory, eager):
    """A cache folder of its own, with LiteMedSAM converted into it once (by ``auto``) for the module."""
    cache = tmp_path_factory.mktemp("ovcache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("URSAM_CACHE", str(cache))
        run, name = fast_encoder.make_encoder(eager.model.image_encoder, "auto", "cpu")
    return cache, run, name


def test_openvino_is_exact_and_converted_once_into_the_cache(ov_cache, monkeypatch, eager):
    cache, run, name = ov_cache
    monkeypatch.setenv("URSAM_CACHE", str(cache))
    encoder = eager.model.image_encoder
    assert name == "openvino"  # the first exact path of auto
    assert str(run.compiled.get_property("INFERENCE_PRECISION_HINT")) == "<Type: 'float32'>"
    folders = sorted(cache.iterdir())
    assert len(folders) == 1 and sorted(p.name for p in folders[0].iterdir()) == ["model.bin", "model.xml"]
    folder = folders[0]
    assert fast_encoder.weights_digest(encoder)[:20] in folder.name and fast_encoder.ov_version() in folder.name
    assert folder.name.startswith("litemedsam-encoder-") and folder.name.endswith("-256")
    x = torch.rand(1, 3, 256, 256, generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        assert (run(x) - encoder(x)).abs().max().item() < fast_encoder.EXACT_TOLERANCE
    stamp = (folder / "model.bin").stat().st_mtime_ns
    again, _ = fast_encoder.make_encoder(encoder, "openvino", "cpu")
    assert (folder / "model.bin").stat().st_mtime_ns == stamp and sorted(cache.iterdir()) == folders
    with torch.inference_mode():
        assert torch.equal(again(x), run(x))


def test_bf16_is_offered_where_the_cpu_has_it_and_never_chosen_by_auto(ov_cache, monkeypatch, eager):
    monkeypatch.setenv("URSAM_CACHE", str(ov_cache[0]))
    encoder = eager.model.image_encoder
    if not fast_encoder.cpu_has_bf16():
        assert "openvino-bf16" not in fast_encoder.available_paths()
        with pytest.raises(URSAMError, match="no bf16 instructions"):
            fast_encoder.make_encoder(encoder, "openvino-bf16", "cpu")
        return
    run, name = fast_encoder.make_encoder(encoder, "openvino-bf16", "cpu")
    assert name == "openvino-bf16"
    assert str(run.compiled.get_property("INFERENCE_PRECISION_HINT")) == "<Type: 'bfloat16'>"
    x = torch.rand(1, 3, 256, 256, generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        ref = encoder(x)
        err = ((run(x) - ref).norm() / ref.norm()).item()
    assert 1e-4 < err < 0.1  # approximate (so not auto's), yet the same features to a few per cent
    assert fast_encoder.make_encoder(encoder, "auto", "cpu")[1] == "openvino"


def test_a_failed_openvino_conversion_is_remembered_and_auto_falls_back(tmp_path, monkeypatch, eager):
    monkeypatch.setenv("URSAM_CACHE", str(tmp_path))
    calls = []

    def broken(encoder, folder, input_size, onnx_file=None):
        calls.append(folder)
        raise fast_encoder.Unavailable("OpenVINO conversion failed: RuntimeError: unsupported operation")

    def no_onnx():
        raise fast_encoder.Unavailable("needs onnx and onnxruntime (pip install 'ursam[fast]')")

    monkeypatch.setattr(fast_encoder, "_convert_openvino", broken)
    monkeypatch.setattr(fast_encoder, "_runtime", no_onnx)
    encoder = eager.model.image_encoder
    for _ in range(2):
        run, name = fast_encoder.make_encoder(encoder, "auto", "cpu")
        assert run is encoder and name == "eager"
    assert len(calls) == 1  # the second run read the note instead of converting again
    notes = list(tmp_path.iterdir())
    assert [p.name.endswith("-256.failed") for p in notes] == [True]
    assert "unsupported operation" in notes[0].read_text()
    with pytest.raises(URSAMError, match="encoder path 'openvino' is not available: OpenVINO conversion failed"):
        fast_encoder.make_encoder(encoder, "openvino", "cpu")
    assert len(calls) == 1


def _tiny_sam(seed=0):
    """SAM's architecture (1024 px ViT, prompt encoder, mask decoder) at a fraction of ViT-B's width and depth,
    randomly initialised and seeded: no checkpoint exists here."""
    from segment_anything.build_sam import _build_sam  # noqa: PLC0415 (optional backend package)

    torch.manual_seed(seed)
    model = _build_sam(encoder_embed_dim=48, encoder_depth=2, encoder_num_heads=2, encoder_global_attn_indexes=[1])
    with torch.no_grad():  # SAM initialises its relative positions to zero: give them values to carry
        for block in model.image_encoder.blocks:
            block.attn.rel_pos_h.normal_(0, 0.1)
            block.attn.rel_pos_w.normal_(0, 0.1)
    return model.eval()


@pytest.mark.parametrize("kind", ["sam-vit-b", pytest.param("medsam", marks=pytest.mark.slow)])
def test_openvino_sam_encoders_give_the_masks_of_eager(tmp_path, monkeypatch, kind):
    monkeypatch.setenv("URSAM_CACHE", str(tmp_path))
    monkeypatch.setattr(backends, "_load_sam", lambda k, checkpoint: (_tiny_sam(), "random-seeded-weights"))
    eager_b = make_backend(kind, "unused.pth", device="cpu", encoder="eager")
    ov_b = make_backend(kind, "unused.pth", device="cpu")
    assert eager_b.encoder_name == "eager" and ov_b.encoder_name == "openvino"
    assert [p.name.startswith(f"{kind}-encoder-") and p.name.endswith("-1024") for p in tmp_path.iterdir()] == [True]
    image, labels = case(ABD, "tsA_slab")
    volume = sitk.GetArrayFromImage(sitk.ReadImage(str(image))).astype(np.float32)
    truth = sitk.GetArrayFromImage(sitk.ReadImage(str(labels)))
    boxes = boxes_from_labels(truth, names(ABD), labels=[1, 2, 3, 13])
    for z in (10, 20):
        prompts = np.array([b.xyxy() for b in boxes], np.float32)
        e, o = eager_b.embed(volume[z]), ov_b.embed(volume[z])
        assert (e["features"] - o["features"]).abs().max().item() < fast_encoder.EXACT_TOLERANCE
        pe, po = eager_b.decode(e, prompts), ov_b.decode(o, prompts)
        assert np.abs(pe - po).max() < 1e-3
        me, mo = pe > 0.5, po > 0.5
        assert 0.05 < me.mean() < 0.95  # random weights still give masks with both classes to agree on
        assert np.count_nonzero(me != mo) <= 2, np.count_nonzero(me != mo)


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
