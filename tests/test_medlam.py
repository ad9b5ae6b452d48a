"""MedLAM, the learned localizer (METHOD.md §1): network, sign convention, training, checkpoints, inference.

Tiny networks (widths 2..8, 32^3 patches) keep these tests to seconds on 2 cores.
"""
import json
import re
import subprocess
import sys

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from scipy import ndimage
from shared_data import HN, case

from URSAMLib.errors import URSAMError
from URSAMLib.localizers import LOCALIZERS, localize
from URSAMLib.medlam import budget
from URSAMLib.medlam.bank import VolumeBank
from URSAMLib.medlam.checkpoint import load_network, save_checkpoint
from URSAMLib.medlam.draw import draw_batch as draw_tensor_batch
from URSAMLib.medlam.losses import medlam_loss, pair_offsets
from URSAMLib.medlam.network import MedLAMNet, NetConfig
from URSAMLib.medlam.preprocessing import crop, extreme_points, map_hu, prepare_path
from URSAMLib.medlam.sampling import AugmentConfig, draw_batch
from URSAMLib.medlam.training import (
    TrainSettings,
    _restore_rng,
    _rng_state,
    _to_tensors,
    activation_bytes,
    fit_batch_size,
    train,
)

TINY = dict(widths=(2, 2, 4, 4, 8), feature_channels=4, patch_size=32, dropout=0.0)
EXTRA = ["pt_242", "pt_243", "pt_245"]


def tiny_net(seed=0, **kw):
    torch.manual_seed(seed)
    return MedLAMNet(NetConfig(**{**TINY, **kw}))


@pytest.fixture(scope="module")
def volumes():
    return [prepare_path(case(HN, c)[0], pad=0).volume for c in EXTRA[:2]]


def test_network_shapes_and_paper_head():
    net = tiny_net()
    out = net(torch.rand(3, 1, 32, 32, 32))
    assert out["position"].shape == (3, 3)
    assert [tuple(f.shape) for f in out["features"]] == [(3, 4, 8, 8, 8), (3, 4, 16, 16, 16), (3, 4, 32, 32, 32)]
    # The paper's configuration: 4^3 x 384 = 24576 -> 192 -> 96 -> 3, decoder features of 96 channels.
    paper = MedLAMNet(NetConfig())
    assert [(m.in_features, m.out_features) for m in paper.head] == [(24576, 192), (192, 96), (96, 3)]
    assert paper.dec1[-1][0].out_channels == 96
    assert [paper.enc[i][-1][0].out_channels for i in range(5)] == [48, 48, 96, 192, 384]


def test_offset_sign_convention():
    """offset(p_a, p_b) ~ centre_a - centre_b: what training fits is what inference adds to the query centre."""
    net = tiny_net(range_mm=(1500.0, 600.0, 600.0))
    pa = torch.tensor([[0.2, -0.1, 0.0]])
    pb = torch.zeros(1, 3)
    d = net.offset_mm(pa, pb)
    assert d[0, 0] > 0 and d[0, 1] < 0 and d[0, 2] == 0
    assert torch.allclose(net.offset_mm(pb, pa), -d)
    assert torch.all(net.offset_mm(torch.full((1, 3), 50.0), pb).abs() <= torch.tensor([1500.0, 600.0, 600.0]))
    # An ideal embedding (p = position / r, in the linear range of tanh) makes the
    # training pairs' predictions equal their targets ...
    centres = torch.tensor([[[10.0, 20.0, 30.0], [14.0, 18.0, 33.0], [9.0, 25.0, 28.0]]])  # voxels
    r = torch.tensor(net.config.range_mm)
    ideal = centres * 3.0 / r * 1e-3
    net_lin = tiny_net(range_mm=tuple((r * 1e3).tolist()))
    pred, target = pair_offsets(net_lin, ideal * 1.0, centres, 3.0)
    assert torch.allclose(pred, target, atol=1e-2)
    assert torch.allclose(target[0], (centres[0, 0] - centres[0, 1]) * 3.0)
    # ... and inference's point = query centre + offset(p_support, p_query) lands on the support point.
    support, query = ideal[0, 0:1], ideal[0, 1:2]
    point = centres[0, 1] + net_lin.offset_mm(support, query)[0] / 3.0
    assert torch.allclose(point, centres[0, 0], atol=1e-2)


def test_hu_mapping_and_extreme_points():
    assert np.allclose(map_hu([-2000, -1000, -200, 0, 200, 1500, 3000]), [0, 0, 0.2, 0.5, 0.8, 1, 1])
    mask = np.zeros((10, 10, 10), bool)
    mask[2:5, 3:8, 4:6] = True
    pts = extreme_points(mask)
    assert pts.shape == (6, 3)
    assert [pts[0][0], pts[1][1], pts[2][2], pts[3][0], pts[4][1], pts[5][2]] == [2, 3, 4, 4, 7, 5]
    assert mask[tuple(pts.T)].all()


def test_prepare_maps_points_back_to_the_source_grid():
    p = prepare_path(case(HN, "pt_4")[0], pad=16)
    assert p.volume.dtype == np.uint8 and p.grid.GetSpacing() == (3.0, 3.0, 3.0)
    src = np.array([[10.0, 20.0, 30.0], [64.0, 64.0, 64.0]])
    assert np.allclose(p.zyx_to_source_index(p.source_index_to_zyx(src)), src, atol=1e-6)
    # The padding reads as air; the body is bright.
    assert p.volume[:16].max() == 0 and p.volume.max() > 200


def test_augmented_copy_tracks_anatomy(volumes):
    """Voxels of the augmented copy come from the scan coordinates the sampler says they do."""
    rng = np.random.default_rng(3)
    aug = AugmentConfig(p_intensity=0.0, p_noise=0.0, p_affine=1.0, p_elastic=1.0)
    b = draw_batch(volumes[:1], 1, 32, aug, rng, n_patches=2)

    vol = volumes[0].astype(np.float32) / 255.0
    coords = b["coords"][0, 0]
    expect = ndimage.map_coordinates(vol, coords.reshape(3, -1), order=1, mode="constant").reshape(coords.shape[1:])
    assert np.allclose(b["aug"][0, 0, 0], expect, atol=1e-5)
    # The original patch is a plain crop around its centre.
    padded = np.pad(vol, 16)
    c = b["centre"][0, 0].astype(int) + 16
    assert np.allclose(b["ori"][0, 0, 0], padded[c[0] - 16:c[0] + 16, c[1] - 16:c[1] + 16, c[2] - 16:c[2] + 16])


@pytest.fixture(scope="module")
def small_scans():
    """Two smooth synthetic scans (uint8), smaller than some patches, so crops reach past their edges."""
    rng = np.random.default_rng(7)
    scans = []
    for shape in ((40, 52, 60), (28, 70, 44)):
        v = ndimage.gaussian_filter(rng.uniform(0, 255, shape), 2.0)
        v = (v - v.min()) / (v.max() - v.min()) * 255
        scans.append(v.astype(np.uint8))
    return scans


def _torch_draw(scans, seed, aug=None, batch=3, size=32, workers=1):
    return draw_tensor_batch(VolumeBank(scans), batch, size, aug or AugmentConfig(),
                             torch.Generator().manual_seed(seed), n_patches=2, workers=workers)


def test_torch_sampler_is_seeded(small_scans):
    a = _torch_draw(small_scans, 11)
    b = _torch_draw(small_scans, 11)
    # Rendering split over threads gives the same batch: randomness is all drawn first.
    c = _torch_draw(small_scans, 11, workers=2)
    assert a.keys() == b.keys() == c.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
        assert torch.equal(a[k], c[k]), k
    d = _torch_draw(small_scans, 12)
    for k in ("ori", "aug", "coords", "centre", "points"):
        assert not torch.equal(a[k], d[k]), k


def test_torch_sampler_fields_match_the_numpy_sampler(small_scans):
    aug = AugmentConfig()
    ref = draw_batch(small_scans, 3, 32, aug, np.random.default_rng(0), 2)
    got = _torch_draw(small_scans, 0, aug)
    for k in ("ori", "aug", "coords", "points", "point_coords", "centre"):
        assert tuple(got[k].shape) == ref[k].shape, k
        assert got[k].dtype == torch.from_numpy(ref[k]).dtype, k
    assert got["scan"].shape == (3,)
    # The loss takes the torch batch as it is.
    loss, parts = medlam_loss(tiny_net(), got, 3.0)
    assert torch.isfinite(loss) and parts["offset"] > 0 and parts["match"] > 0


def test_torch_original_patch_is_an_exact_crop_and_the_offset_its_centre_difference(small_scans):
    b = _torch_draw(small_scans, 5, batch=4)
    for e in range(4):
        scan = small_scans[int(b["scan"][e])]
        for i in range(2):
            centre = b["centre"][e, i].numpy()
            assert np.array_equal(centre, np.round(centre))
            expect = crop(scan, centre, 32).astype(np.float32) / 255.0
            assert torch.equal(b["ori"][e, i, 0], torch.from_numpy(expect))
            # The matching points' scan coordinates: their voxel in the crop plus the crop's corner.
            assert torch.equal(b["point_coords"][e, i], (b["points"][e, i] - 16 + b["centre"][e, i]).float())
    pred, target = pair_offsets(tiny_net(), torch.zeros(4, 2, 3), b["centre"], 3.0)
    assert torch.equal(target, (b["centre"][:, 0] - b["centre"][:, 1]) * 3.0)
    assert (target != 0).any()


@pytest.mark.parametrize("warp", [True, False])
def test_torch_identity_augmentation_is_the_crop(small_scans, warp):
    """No rotation, scaling, deformation, remap, noise or shift: the copy is the crop, on whole voxels.

    With ``warp`` the copy goes through the affine and elastic path (grid_sample) with zero
    settings; without, through the plain-crop path for unaugmented copies.
    """
    p = 1.0 if warp else 0.0
    aug = AugmentConfig(shift=0, rotate_deg=0.0, scale=0.0, elastic_voxels=0.0, p_affine=p, p_elastic=p,
                        p_intensity=0.0, p_noise=0.0)
    b = _torch_draw(small_scans, 9, aug, batch=4)
    grid = torch.stack(torch.meshgrid(*[torch.arange(32.0) - 16] * 3, indexing="ij"))
    for e in range(4):
        for i in range(2):
            assert torch.equal(b["coords"][e, i], grid + b["centre"][e, i].view(3, 1, 1, 1))
    if warp:
        assert torch.allclose(b["aug"], b["ori"], rtol=0, atol=1e-5)
    else:
        assert torch.equal(b["aug"], b["ori"])


def test_torch_augmented_copy_tracks_anatomy(small_scans):
    """Every voxel of a fully augmented copy (no remap or noise) is the scan's value at its coordinate."""
    aug = AugmentConfig(p_affine=1.0, p_elastic=1.0, p_intensity=0.0, p_noise=0.0)
    b = _torch_draw(small_scans, 4, aug, batch=2)
    moved = 0.0
    for e in range(2):
        vol = small_scans[int(b["scan"][e])].astype(np.float32) / 255.0
        for i in range(2):
            coords = b["coords"][e, i].numpy()
            # grid-constant: between an edge voxel and the outside, a mix with air, as the crop's zeros give.
            expect = ndimage.map_coordinates(vol, coords.reshape(3, -1), order=1, mode="grid-constant")
            assert np.allclose(b["aug"][e, i, 0].numpy().ravel(), expect, atol=1e-5)
            moved = max(moved, float(np.abs(coords - np.round(coords)).max()))
    assert moved > 0.1  # really warped, not whole voxels


def test_batch_size_rule():
    assert budget.fit_batch_size(10, 100) == 7
    assert budget.fit_batch_size(1, 10**12) == budget.MAX_BATCH
    assert budget.fit_batch_size(10**12, 1) == 1
    tiny = NetConfig(**TINY)
    assert 0 < activation_bytes(tiny) < activation_bytes(NetConfig())
    size, why = fit_batch_size(tiny, 2, "cpu")
    assert 1 <= size <= budget.MAX_BATCH and why.startswith(str(size))


def test_one_training_step_lowers_the_loss(volumes):
    net = tiny_net(seed=1)
    batch = _to_tensors(draw_batch(volumes, 1, 32, AugmentConfig(), np.random.default_rng(0), 2), "cpu")
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    before, parts = medlam_loss(net, batch, 3.0)
    assert parts["offset"] > 0 and parts["match"] > 0
    opt.zero_grad()
    before.backward()
    opt.step()
    after, _ = medlam_loss(net, batch, 3.0)
    assert after.item() < before.item()


def _train(tmp_path, name, steps, resume=False):
    images = [case(HN, c)[0] for c in EXTRA]
    settings = TrainSettings(steps=steps, batch_size=1, patches_per_scan=2, save_every=2, log_every=1,
                             val_images=1, val_pairs=2, seed=5)
    return train(images, tmp_path / name, settings, NetConfig(**TINY), device="cpu", resume=resume,
                 cache_dir=tmp_path / "cache")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    d = tmp_path_factory.mktemp("medlam")
    return _train(d, "tiny.pt", 3)


def test_checkpoint_stores_config_seed_step_and_optimizer(trained):
    state = torch.load(trained, weights_only=True)
    assert state["format"] == "ursam-medlam" and state["step"] == 3 and state["seed"] == 5
    assert state["config"]["widths"] == [2, 2, 4, 4, 8] and state["config"]["patch_size"] == 32
    assert state["optimizer"]["state"] and "rng" in state
    assert [h["step"] for h in state["history"] if "val_offset_error_mm" in h] == [2, 3]
    net, _ = load_network(trained)
    assert net.config.widths == (2, 2, 4, 4, 8) and not net.training


def test_resume_continues_exactly(tmp_path):
    straight = _train(tmp_path, "a.pt", 4)
    _train(tmp_path, "b.pt", 2)
    resumed = _train(tmp_path, "b.pt", 4, resume=True)
    a = torch.load(straight, weights_only=True)
    b = torch.load(resumed, weights_only=True)
    assert b["step"] == 4
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    with pytest.raises(URSAMError, match="exists"):
        _train(tmp_path, "a.pt", 6)


def test_sampler_generator_state_restores_on_its_own_device_type_only():
    drawn = torch.Generator().manual_seed(1)
    torch.rand(5, generator=drawn)
    state = _rng_state(np.random.default_rng(0), drawn)
    assert state["draw_device"] == "cpu"
    fresh = torch.Generator().manual_seed(2)
    assert _restore_rng(np.random.default_rng(5), fresh, state)
    assert torch.equal(fresh.get_state(), drawn.get_state())
    # A CUDA generator's state does not fit a CPU generator: left as it is, and said so.
    state["draw_device"] = "cuda"
    other = torch.Generator().manual_seed(3)
    before = other.get_state()
    assert not _restore_rng(np.random.default_rng(5), other, state)
    assert torch.equal(other.get_state(), before)


def test_bad_checkpoints_are_clear_errors(tmp_path, trained):
    with pytest.raises(URSAMError, match="not found"):
        load_network(tmp_path / "missing.pt")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"\x80\x02 not a checkpoint" * 10)
    with pytest.raises(URSAMError, match="corrupt"):
        load_network(junk)
    other = tmp_path / "other.pt"
    torch.save({"state_dict": {}}, other)
    with pytest.raises(URSAMError, match="not a MedLAM localizer checkpoint"):
        load_network(other)
    state = torch.load(trained, weights_only=True)
    state["config"]["widths"] = [2, 2, 4, 4, 16]
    bad = tmp_path / "mismatch.pt"
    torch.save(state, bad)
    with pytest.raises(URSAMError, match="do not match its network settings"):
        load_network(bad)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(trained.read_bytes()[:2000])
    with pytest.raises(URSAMError, match="corrupt"):
        load_network(truncated)


def test_save_is_atomic(tmp_path):
    """A failing write leaves the previous checkpoint intact and no temporary file."""
    net = tiny_net()
    path = save_checkpoint(tmp_path / "c.pt", net, step=1)
    before = path.read_bytes()

    class Boom:
        def state_dict(self):
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        save_checkpoint(path, net, step=2, optimizer=Boom())
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]


def test_inference_end_to_end_on_a_real_case(trained):
    assert "medlam" in LOCALIZERS
    image, _ = case(HN, "pt_34")
    localization = localize(image, HN, method="medlam", checkpoint=str(trained), device="cpu")
    boxes, info = localization.boxes, localization.info
    assert localization.registrations is None  # MedLAM registers nothing
    size = sitk.ReadImage(str(image)).GetSize()
    names = json.loads((HN / "dataset.json").read_text(encoding="utf-8"))["labels"]
    assert sorted(b.name for b in boxes) == sorted(names.values())
    for b in boxes:
        assert all(0 <= lo <= hi < s for lo, hi, s in zip(b.min_ijk, b.max_ijk, size)), b
    assert info["method"] == "medlam" and info["checkpoint_step"] == 3
    assert info["supports"] == json.loads((HN / "dataset.json").read_text(encoding="utf-8"))["support"]
    assert len(info["points"]["Brainstem"]["refined_ijk"]) == 6
    # Seeded: the same boxes again (support features reused from the cache); the options
    # `ursam evaluate` passes to every localizer are accepted.
    again = localize(image, HN, method="medlam", checkpoint=str(trained), device="cpu", missing="skip")
    again, info2 = again.boxes, again.info
    assert info2["support_features_reused"]
    assert [b.to_json() for b in again] == [b.to_json() for b in boxes]


def test_localizer_needs_a_usable_checkpoint(tmp_path):
    image, _ = case(HN, "pt_34")
    with pytest.raises(URSAMError, match="needs a checkpoint"):
        localize(image, HN, method="medlam")
    with pytest.raises(URSAMError, match="not found"):
        localize(image, HN, method="medlam", checkpoint=str(tmp_path / "none.pt"))


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "URSAMLib.cli", *args], capture_output=True, encoding="utf-8", errors="replace")


def test_cli_errors(tmp_path, trained):
    r = _cli("train-localizer", "--images", str(tmp_path / "nowhere"), "--out", str(tmp_path / "x.pt"))
    assert r.returncode == 2 and "ursam: error: --images not found" in r.stderr
    r = _cli("train-localizer", "--images", str(HN), "--role", "nosuchrole", "--out", str(tmp_path / "x.pt"))
    assert r.returncode == 2 and "no 'nosuchrole' cases" in r.stderr
    r = _cli("train-localizer", "--images", str(HN), "--out", str(trained), "--iterations", "1")
    assert r.returncode == 2 and "checkpoint exists" in r.stderr
    r = _cli("localize", str(case(HN, "pt_34")[0]), "--templates", str(HN), "--localizer", "medlam",
             "--out", str(tmp_path / "b.json"))
    assert r.returncode == 2 and "--localizer-checkpoint" in r.stderr
    assert not (tmp_path / "b.json").exists()


def test_train_localizer_torch_sampler_reports_speed(tmp_path):
    listing = tmp_path / "scans.txt"
    listing.write_text("\n".join(str(case(HN, c)[0]) for c in EXTRA), encoding="utf-8")
    out = tmp_path / "t.pt"
    r = _cli("train-localizer", "--images", str(listing), "--out", str(out), "--iterations", "2",
             "--batch-size", "2", "--threads", "1", "--widths", "2,2,4,4,8", "--feature-channels", "4", "--patch-size", "32",
             "--log-every", "1", "--cache", str(tmp_path / "cache"))
    assert r.returncode == 0, r.stderr
    assert out.exists()
    speed = re.search(r"speed: ([0-9.]+) steps/s .*torch sampler, 2 x 2 patches.*drawing ([0-9.]+) s .*network "
                      r"([0-9.]+) s", r.stdout)
    assert speed, r.stdout
    assert float(speed.group(1)) > 0 and float(speed.group(3)) > 0
    assert "steps/s (draw" in r.stderr
    state = torch.load(out, weights_only=True)
    assert state["step"] == 2 and state["train"]["sampler"] == "torch" and "draw" in state["rng"]
    logged = [h for h in state["history"] if "steps_per_second" in h]
    assert [h["step"] for h in logged] == [1, 2]
    assert all(h["draw_seconds"] > 0 and h["step_seconds"] > 0 for h in logged)
