"""Faster CPU paths for the LiteMedSAM image encoder, the one cost paid per slice.

``make_encoder(image_encoder, name, device) -> (callable, name)`` gives a
callable that maps the encoder's input batch (1, 3, 256, 256) to the same
features as ``image_encoder``. Paths:

- ``onnx``: the encoder exported to ONNX and run by ONNX Runtime (fp32). Same
  numbers as eager to about 1e-5; checked against eager when the file is made.
- ``onnx-int8``: the same graph with its matrix products dynamically quantized
  to int8 (per-channel weights). Approximate: opt-in only, never chosen by ``auto``.
- ``auto``: the fastest exact path that this installation can run (``onnx``
  on CPU when onnxruntime and onnx are installed), else ``eager``.

What each path costs on a given CPU is measured by ``ursam bench`` and
``benchmarks/encoder_paths.py`` (which also tries torch.compile,
channels-last, bf16 and torch's own int8), not assumed here.

Exported files are cached in a user folder, never in the repository and
never downloaded: ``$URSAM_CACHE``, else ``$XDG_CACHE_HOME/ursam``, else
``~/.cache/ursam``. A file's name holds a digest of the encoder's weights
and the versions of torch, onnx and onnxruntime, so a new checkpoint or
runtime makes a new file; files are written to a temporary name and renamed,
so a crash or a second process never leaves a half-written model.
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import warnings
from pathlib import Path

import numpy as np
import torch

from ..atomic import atomic_path, atomic_write_text
from ..errors import URSAMError

#: fast paths by name; ``auto`` tries AUTO_ORDER, best first (exact paths only)
PATHS = ("onnx", "onnx-int8")
AUTO_ORDER = ("onnx",)
#: the encoder's input: LiteMedSAM pads every slice to 256 x 256
INPUT_SIZE = 256
#: largest absolute feature difference from eager accepted for an exact path
EXACT_TOLERANCE = 1e-3


class Unavailable(Exception):
    """This path cannot run here (missing runtime, export failure, GPU device...).

    ``lasting``: the same weights and runtimes would fail again (not so for a full disk).
    """

    def __init__(self, message, lasting=True):
        super().__init__(message)
        self.lasting = lasting


def cache_dir():
    """The user cache folder for exported models (created on first use)."""
    root = os.environ.get("URSAM_CACHE")
    if not root:
        xdg = os.environ.get("XDG_CACHE_HOME")
        root = Path(xdg) / "ursam" if xdg else Path.home() / ".cache" / "ursam"
    return Path(root)


def weights_digest(module):
    """SHA-256 of a module's parameters and buffers (names, shapes, dtypes and bytes)."""
    digest = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        t = t.detach().cpu().contiguous()
        digest.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
        digest.update(t.numpy().tobytes() if t.dtype != torch.bfloat16 else t.float().numpy().tobytes())
    return digest.hexdigest()


def _runtime():
    try:
        import onnx
        import onnxruntime
    except ImportError as err:
        raise Unavailable(f"needs onnx and onnxruntime (pip install 'ursam[fast]'): {err}") from None
    return onnx, onnxruntime


@contextlib.contextmanager
def _cache_file(path):
    """An atomic write into the cache; a cache that cannot be written is no lasting failure."""
    try:
        with atomic_path(path) as tmp:
            yield tmp
    except OSError as err:
        raise Unavailable(f"cannot write {path.name} into the cache folder {path.parent}: {err}",
                          lasting=False) from None


def _export_onnx(image_encoder, path):
    """Export the encoder (on CPU, eval mode) to ``path`` atomically, and check it against eager."""
    onnx, ort = _runtime()
    x = torch.rand(1, 3, INPUT_SIZE, INPUT_SIZE, generator=torch.Generator().manual_seed(0))
    with _cache_file(path) as tmp:
        _export_checked(image_encoder, x, tmp, ort)


def _export_checked(image_encoder, x, tmp, ort):
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the exporter's tracer notes say nothing to a user
            try:
                # The TorchScript exporter keeps GELU as one ONNX Gelu node (opset 20), which
                # ONNX Runtime runs fused; the dynamo exporter spells it out in five nodes.
                torch.onnx.export(image_encoder, (x,), str(tmp), input_names=["image"],
                                  output_names=["features"], opset_version=20, dynamo=False)
            except Exception:
                torch.onnx.export(image_encoder, (x,), str(tmp), input_names=["image"],
                                  output_names=["features"], opset_version=20, dynamo=True,
                                  external_data=False)
            ref = image_encoder(x).numpy()
        out = _session(tmp, 1).run(None, {"image": x.numpy()})[0]
        diff = float(np.abs(out - ref).max())
        if not np.isfinite(diff) or diff > EXACT_TOLERANCE:
            raise Unavailable(f"the ONNX export differs from eager by {diff:.2e}")
    except (Unavailable, OSError):
        raise
    except Exception as err:
        raise Unavailable(f"ONNX export failed: {type(err).__name__}: {err}") from None


def _quantize_int8(src, path):
    _runtime()
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quiet = logging.getLogger().level
    logging.getLogger().setLevel(logging.ERROR)  # its advice to pre-process is no use to the user
    try:
        with _cache_file(path) as tmp:
            try:
                quantize_dynamic(str(src), str(tmp), weight_type=QuantType.QInt8, per_channel=True,
                                 op_types_to_quantize=["MatMul", "Gemm"])
            except OSError:
                raise
            except Exception as err:
                raise Unavailable(f"int8 quantization failed: {type(err).__name__}: {err}") from None
    finally:
        logging.getLogger().setLevel(quiet)


def _session(path, threads):
    _, ort = _runtime()
    so = ort.SessionOptions()
    so.intra_op_num_threads = max(1, threads)
    so.inter_op_num_threads = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # Idle ORT threads must not spin while torch runs the decoder on the same cores.
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    # No arena of its own: freed activations go back to malloc, where the decoder reuses them
    # (with its arena and memory patterns ONNX Runtime held 600 MiB more, at the same speed).
    so.enable_cpu_mem_arena = False
    so.enable_mem_pattern = False
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def artifact_path(image_encoder, variant):
    """Where the cached model of ``variant`` (fp32 or int8) for these weights and runtimes lives."""
    onnx, ort = _runtime()
    tag = f"torch{torch.__version__}-onnx{onnx.__version__}-ort{ort.__version__}"
    tag = "".join(c if c.isalnum() or c in ".-" else "_" for c in tag)
    name = f"litemedsam-encoder-{weights_digest(image_encoder)[:20]}-{variant}-{tag}-{INPUT_SIZE}.onnx"
    return cache_dir() / name


class OrtEncoder:
    """Callable like the encoder: (1, 3, 256, 256) float tensor -> features tensor."""

    def __init__(self, path, device, threads):
        self.path = Path(path)
        self.device = device
        self.session = _session(path, threads)

    def __call__(self, x):
        if tuple(x.shape) != (1, 3, INPUT_SIZE, INPUT_SIZE):
            raise ValueError(f"the ONNX encoder takes (1, 3, {INPUT_SIZE}, {INPUT_SIZE}), got {tuple(x.shape)}")
        arr = x.detach().to("cpu", torch.float32).contiguous().numpy()
        out = self.session.run(None, {"image": arr})[0]
        return torch.from_numpy(out).to(self.device)


def _make_once(path, make):
    """Make a cached file unless it exists; a failure is remembered beside it (``.failed``), so that
    later runs fall back at once instead of exporting again, until the weights or runtimes change."""
    if path.exists():
        return
    failed = path.with_name(path.name + ".failed")
    if failed.exists():
        raise Unavailable(failed.read_text().strip() or "an earlier export failed")
    try:
        make()
    except Unavailable as err:
        if not err.lasting:
            raise
        try:
            atomic_write_text(failed, str(err) + "\n")
        except OSError:
            pass  # a read-only cache: retry next time
        raise


def _build(image_encoder, name, device):
    if torch.device(device).type != "cpu":
        raise Unavailable("the ONNX paths run on CPU; on a GPU the eager encoder is the fast one")
    fp32 = artifact_path(image_encoder, "fp32")
    _make_once(fp32, lambda: _export_onnx(image_encoder, fp32))
    path = fp32
    if name == "onnx-int8":
        path = artifact_path(image_encoder, "int8")
        _make_once(path, lambda: _quantize_int8(fp32, path))
    try:
        return OrtEncoder(path, torch.device(device), torch.get_num_threads())
    except Exception as err:
        raise Unavailable(f"ONNX Runtime cannot load {path}: {err}") from None


def available_paths():
    """Fast paths this installation could run (their runtimes import); export may still fail."""
    try:
        _runtime()
    except Unavailable:
        return ()
    return PATHS


def make_encoder(image_encoder, name, device):
    """The encoder callable of path ``name`` and the name of the path actually used.

    ``auto`` falls back to eager when no fast path can run here; a named path
    that cannot run is a user error.
    """
    if name == "eager":
        return image_encoder, "eager"
    if name == "auto":
        for candidate in AUTO_ORDER:
            try:
                return _build(image_encoder, candidate, device), candidate
            except Unavailable:
                continue
        return image_encoder, "eager"
    if name not in PATHS:
        raise URSAMError(f"unknown encoder path {name!r}; use auto, eager, {', '.join(PATHS)}")
    try:
        return _build(image_encoder, name, device), name
    except Unavailable as err:
        raise URSAMError(f"encoder path {name!r} is not available: {err}") from None
