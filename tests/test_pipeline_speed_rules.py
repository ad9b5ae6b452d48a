"""The speed rules of the pipeline, checked on real CT (no timings here: those live in `ursam bench`).

- one encoder call per distinct slice, whatever the number of organs and augmented boxes;
- the fast box decoder gives SAM's masks: same probabilities (to float rounding) as the eager
  decoder, on LiteMedSAM and on segment-anything's decoder, and decoding only a region equals
  cropping the full slice;
- the process-level settings (malloc tuning, decoder threads) are applied and undone as documented.
"""
import sys
import threading

import numpy as np
import pytest
import SimpleITK as sitk
import torch
import torch.nn.functional as F
from shared_data import ABD, HN, case, names

from URSAMLib import pipeline
from URSAMLib.boxes import boxes_from_labels
from URSAMLib.errors import URSAMError
from URSAMLib.progress import Cancelled, Progress
from URSAMLib.prompt_modes import PromptSet
from URSAMLib.sam import backends as sam_backend
from URSAMLib.sam.backends import make_backend
from URSAMLib.sam.fast_decoder import BoxDecoder, UnsupportedDecoder

#: probabilities of the fast decoder may differ from eager by float rounding only
PROB_TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def slab():
    image, labels = case(ABD, "tsA_slab")
    volume = sitk.GetArrayFromImage(sitk.ReadImage(str(image))).astype(np.float32)
    truth = sitk.GetArrayFromImage(sitk.ReadImage(str(labels)))
    return volume, truth


@pytest.fixture(scope="module")
def eager_decoder(litemedsam):
    """A LiteMedSAM backend on the eager decoder, sharing the session backend's encoder output."""
    return make_backend("litemedsam", device="cpu", encoder="eager", decoder="eager")


class Counting:
    """A real backend that counts encoder calls per slice."""

    def __init__(self, backend, volume):
        self.backend, self.volume, self.calls = backend, volume, {}

    def __getattr__(self, name):
        return getattr(self.backend, name)

    def embed(self, slice2d):
        z = (slice2d.__array_interface__["data"][0] - self.volume.__array_interface__["data"][0]) // slice2d.nbytes
        self.calls[z] = self.calls.get(z, 0) + 1
        return self.backend.embed(slice2d)


@pytest.mark.parametrize("n_aug, organs", [(1, [2, 13]), (3, [1, 2, 3, 13])])
def test_one_encoder_call_per_distinct_slice_whatever_the_organs_and_boxes(slab, litemedsam, n_aug, organs):
    volume, truth = slab[0][10:14], slab[1][10:14]
    boxes = boxes_from_labels(truth, names(ABD), labels=organs)
    manual = boxes_from_labels(truth, names(ABD), perturb_px=20, seed=2, labels=organs[:1])
    boxes[0].min_ijk[2] = boxes[0].max_ijk[2] = 1  # one organ on one slice only
    union = pipeline.distinct_slices(boxes + manual)
    counting = Counting(litemedsam, volume)
    maps, timings = pipeline.run(volume, counting, [PromptSet("box3d", boxes)], pipeline.Params(n_aug=n_aug),
                                   baselines={"manual": manual})
    assert sorted(counting.calls) == union and set(counting.calls.values()) == {1}
    assert timings["distinct_slices"] == len(union)
    # every organ of every prompt set was decoded: probabilities are in [0, 1] and not all zero
    assert len(maps) == len(boxes) + len(manual)
    for o in maps:
        assert 0 <= o.p_auto.min() and o.p_auto.max() <= 1 and o.p_auto.max() > 0.5, o.name


def test_embedding_the_next_slice_ahead_keeps_the_calls_and_the_masks(slab, litemedsam):
    """The encoder of slice k + 1 runs while slice k is decoded (sam.views.EmbedAhead): each slice is still
    embedded once, and every map is the same to the bit as with the encoder and decoder taking turns."""
    volume, truth = slab[0][8:16], slab[1][8:16]
    boxes = boxes_from_labels(truth, names(ABD), labels=[2, 3])
    # gaps: slices 3, 4 and 7 have no prompt, so they are skipped in the order of the slices ahead
    boxes[0].min_ijk[2], boxes[0].max_ijk[2] = 5, 6
    boxes[1].min_ijk[2], boxes[1].max_ijk[2] = 0, 2
    runs = {}
    for ahead in (False, True):
        counting = Counting(litemedsam, volume)
        counting.embeds_ahead = ahead
        maps, timings = pipeline.run(volume, counting, [PromptSet("box3d", boxes)], pipeline.Params(n_aug=3))
        assert sorted(counting.calls) == pipeline.distinct_slices(boxes) == [0, 1, 2, 5, 6]
        assert set(counting.calls.values()) == {1} and timings["encoder_seconds"] > 0
        runs[ahead] = maps
    for a, b in zip(runs[False], runs[True]):
        assert np.array_equal(a.p_auto, b.p_auto) and np.array_equal(a.p_mean, b.p_mean), a.name
        assert a.p_auto.max() > 0.5, a.name

    assert not [t for t in threading.enumerate() if t.name.startswith("ursam-encoder")]  # no thread left



def test_a_run_cancelled_while_a_slice_is_embedded_ahead_leaves_the_encoder_free(slab, litemedsam):
    """Cancel stops the run between slices while the next slice is being embedded on the encoder thread; the
    run waits for that call, so the same backend segments again at once (an OpenVINO request left busy would
    refuse it) and no encoder thread is left."""

    volume, truth = slab[0][8:16], slab[1][8:16]
    boxes = boxes_from_labels(truth, names(ABD), labels=[2, 3])
    steps = []
    progress = Progress(cancel=lambda: len(steps) >= 2, callback=lambda stage, done, total: steps.append(done))
    with pytest.raises(Cancelled):
        pipeline.run(volume, litemedsam, [PromptSet("box3d", boxes)], pipeline.Params(n_aug=1), progress=progress)
    assert not [t for t in threading.enumerate() if t.name.startswith("ursam-encoder")]
    maps, _ = pipeline.run(volume, litemedsam, [PromptSet("box3d", boxes)], pipeline.Params(n_aug=1))
    assert all(o.p_auto.max() > 0.5 for o in maps)

def _boxes_and_regions(shape, rng, k):
    h, w = shape
    boxes, regions = [], []
    for _ in range(k):
        x0, y0 = rng.uniform(0, w - 12), rng.uniform(0, h - 12)
        x1, y1 = min(w - 1, x0 + rng.uniform(4, w / 2)), min(h - 1, y0 + rng.uniform(4, h / 2))
        boxes.append([x0, y0, x1, y1])
        regions.append((slice(int(max(0, y0 - 6)), min(h, int(y1) + 7)),
                        slice(int(max(0, x0 - 5)), min(w, int(x1) + 9))))
    return np.asarray(boxes, np.float32), regions


@pytest.mark.parametrize("dataset, case_id, z", [(ABD, "tsA_slab", 15), (HN, "pt_34", 80)])
def test_fast_decoder_gives_the_eager_decoders_probabilities(litemedsam, eager_decoder, dataset, case_id, z):
    image, _ = case(dataset, case_id)
    volume = sitk.GetArrayFromImage(sitk.ReadImage(str(image))).astype(np.float32)
    assert litemedsam.decoder_name == "fast"
    emb = litemedsam.embed(volume[z])
    emb_eager = {k: v for k, v in emb.items() if k != "decoder_state"}  # same features, eager decoder
    boxes, regions = _boxes_and_regions(emb["shape"], np.random.default_rng(z), 7)
    ref = eager_decoder.decode(emb_eager, boxes)
    full = litemedsam.decode(emb, boxes)
    assert full.shape == ref.shape == (7,) + emb["shape"]
    assert np.abs(full - ref).max() < PROB_TOLERANCE
    assert np.array_equal(full > 0.5, ref > 0.5)
    # decoding only each box's region gives the same values as cropping the full slice
    crops = litemedsam.decode_regions(emb, boxes, regions, batch=3)
    for c, r, p in zip(crops, regions, ref):
        assert c.shape == p[r].shape
        assert np.abs(c - p[r]).max() < PROB_TOLERANCE


def test_region_resize_is_torchs_bilinear():
    rng = np.random.default_rng(0)
    for (h_in, w_in), (h_out, w_out) in [((212, 256), (101, 122)), ((256, 256), (128, 128)),
                                         ((64, 48), (200, 150)), ((256, 200), (512, 400))]:
        low = torch.from_numpy(rng.standard_normal((2, h_in, w_in)).astype(np.float32))
        ref = F.interpolate(low[:, None], size=(h_out, w_out), mode="bilinear", align_corners=False)[:, 0]
        y0, y1, x0, x1 = h_out // 5, h_out - 3, 1, w_out // 2
        ty = sam_backend._bilinear_taps(h_out, h_in, y0, y1)
        tx = sam_backend._bilinear_taps(w_out, w_in, x0, x1)
        out = sam_backend._resize_region(low, ty, tx)
        assert torch.allclose(out, ref[:, y0:y1, x0:x1], atol=1e-5)


def _segment_anything_decoder(depth=2):
    from segment_anything.modeling import MaskDecoder, PromptEncoder, TwoWayTransformer  # noqa: PLC0415 (optional backend package)

    torch.manual_seed(0)
    pe = PromptEncoder(embed_dim=256, image_embedding_size=(64, 64), input_image_size=(1024, 1024),
                       mask_in_chans=16)
    md = MaskDecoder(num_multimask_outputs=3, transformer=TwoWayTransformer(depth=depth, embedding_dim=256,
                                                                            mlp_dim=2048, num_heads=8),
                     transformer_dim=256, iou_head_depth=3, iou_head_hidden_dim=256)
    for m in (pe, md):  # random non-trivial LayerNorm and bias values, so no term is checked against zero
        for name, p in m.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.data.add_(0.1 * torch.randn_like(p))
    return pe.eval(), md.eval()


def test_fast_decoder_fits_segment_anythings_decoder():
    pe, md = _segment_anything_decoder()
    dec = BoxDecoder(pe, md)
    feats = torch.randn(1, 256, 64, 64)
    boxes = torch.tensor([[100.0, 120.0, 600.0, 500.0], [10.0, 900.0, 300.0, 1000.0], [0.0, 0.0, 1023.0, 1023.0]])
    with torch.inference_mode():
        sparse, dense = pe(points=None, boxes=boxes[:, None], masks=None)
        ref, _ = md(image_embeddings=feats, image_pe=pe.get_dense_pe(), sparse_prompt_embeddings=sparse,
                    dense_prompt_embeddings=dense, multimask_output=False)
        keys = dec.tokens_and_keys(dec.prepare(feats), boxes.numpy())
        out = dec.upscale(keys, slice(0, 64), slice(0, 64))
    assert out.shape == ref[:, 0].shape
    assert (out - ref[:, 0]).abs().max() < 1e-3 * max(1.0, ref.abs().max().item())


def test_a_decoder_of_another_shape_falls_back_to_eager(monkeypatch):
    pe, md = _segment_anything_decoder(depth=3)
    with pytest.raises(UnsupportedDecoder):
        BoxDecoder(pe, md)

    class Model:
        prompt_encoder, mask_decoder = pe, md

    backend = sam_backend.SamBackend(device="cpu")
    backend._setup_decoder(Model, "auto")
    assert backend._fast is None and backend.decoder_name == "eager"
    with pytest.raises(URSAMError, match="fast decoder does not fit"):
        backend._setup_decoder(Model, "fast")
    with pytest.raises(URSAMError, match="unknown decoder path"):
        backend._setup_decoder(Model, "quick")


def test_decoder_chunks_keep_an_organs_boxes_together_and_feed_every_worker():
    regions = ["a"] * 4 + ["b"] * 4 + ["c"] * 4 + ["d"]  # four organs: box + 3 augmented, one manual box
    chunks = sam_backend.plan_chunks(regions, batch=16, workers=2)
    assert sorted(i for c in chunks for i in c) == list(range(13))
    assert len(chunks) >= 2 and all(len(c) <= 7 for c in chunks)
    assert all(len({regions[i] for i in c}) <= 2 for c in chunks)
    assert [regions[i] for i in chunks[0]] == ["a"] * 4 + []  # a run is not split when it fits
    assert sam_backend.plan_chunks(regions, batch=3, workers=1)[0] == [0, 1, 2]
    assert sam_backend.plan_chunks([], batch=16, workers=2) == []
    threads = torch.get_num_threads()
    with sam_backend.one_torch_thread():
        inside = torch.get_num_threads()
    assert inside == 1 and torch.get_num_threads() == threads


def test_malloc_tuning_is_applied_once_and_can_be_turned_off(monkeypatch):
    if not sys.platform.startswith("linux"):
        pytest.skip("glibc only")
    assert sam_backend.tune_malloc() in (True, False)
    assert sam_backend.tune_malloc() == sam_backend._malloc_tuned  # idempotent: computed once
    monkeypatch.setattr(sam_backend, "_malloc_tuned", None)
    monkeypatch.setenv("URSAM_MALLOC_TUNE", "0")
    assert sam_backend.tune_malloc() is False
