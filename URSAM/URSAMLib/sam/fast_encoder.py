"""Faster CPU paths for the SAM image encoders, the one cost paid per slice.

``make_encoder(image_encoder, name, device, model=..., input_size=...) -> (callable, name)``
gives a callable that maps the encoder's input batch (1, 3, S, S) to the same
features as ``image_encoder``. Paths:

- ``openvino``: the encoder converted to OpenVINO and compiled for the CPU with
  float32 inference (OpenVINO would pick bf16 by itself on a CPU that has it).
  Same numbers as eager to about 1e-5; checked against eager when the model is
  converted. Every backend (LiteMedSAM 256 px, SAM ViT-B/L/H and MedSAM 1024 px).
- ``openvino-bf16``: the same model compiled for bfloat16 inference, offered
  where the CPU has bf16 instructions (OpenVINO's ``BF16`` capability: AVX512-BF16
  or AMX). Approximate: opt-in only, never chosen by ``auto`` (:data:`BF16_NOTE`).
- ``onnx``: LiteMedSAM exported to ONNX and run by ONNX Runtime (fp32), checked
  against eager when the file is made.
- ``onnx-int8``: the same graph with its matrix products dynamically quantized
  to int8 (per-channel weights). Approximate: opt-in only.
- ``auto``: the fastest exact path that this installation can run (AUTO_ORDER:
  ``openvino``, then ``onnx``), else ``eager``. On a GPU every path is eager.

What each path costs on a given CPU is measured by ``ursam bench`` and
``benchmarks/encoder_paths.py``, not assumed here.

Converted models are cached in a user folder, never in the repository and
never downloaded: ``$URSAM_CACHE``, else ``$XDG_CACHE_HOME/ursam``, else
``~/.cache/ursam``. A model's name holds a digest of the encoder's weights
and the versions of the runtimes that made it, so a new checkpoint or runtime
makes a new one; files are written to a temporary name and renamed (an
OpenVINO model, two files, as a folder), so a crash or a second process never
leaves a half-written model. A conversion that fails for good leaves a note
beside it (``.failed``), so that later runs fall back at once.
"""
from __future__ import annotations

import contextlib
import gc
import hashlib
import logging
import os
import threading
import warnings
from pathlib import Path

import numpy as np
import torch

from ..atomic import atomic_path, atomic_write_text, cache_dir, staged_dir
from ..errors import URSAMError
from . import ENCODER_PATHS

#: fast paths by name (URSAMLib.sam.ENCODER_PATHS); ``auto`` tries AUTO_ORDER, best first (exact paths only)
PATHS = ENCODER_PATHS
AUTO_ORDER = ("openvino", "onnx")
#: paths that only LiteMedSAM's encoder has (the ONNX export is LiteMedSAM's)
LITEMEDSAM_ONLY = ("onnx", "onnx-int8")
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
        import onnx  # noqa: PLC0415 (optional package)
        import onnxruntime  # noqa: PLC0415 (optional package)
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
    from onnxruntime.quantization import QuantType, quantize_dynamic  # noqa: PLC0415 (optional encoder path)

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


def _tag(text):
    return "".join(c if c.isalnum() or c in ".-" else "_" for c in text)


def artifact_path(image_encoder, variant, digest=None):
    """Where the cached ONNX model of ``variant`` (fp32 or int8) for these weights and runtimes lives."""
    onnx, ort = _runtime()
    tag = _tag(f"torch{torch.__version__}-onnx{onnx.__version__}-ort{ort.__version__}")
    digest = digest or weights_digest(image_encoder)
    return cache_dir() / f"litemedsam-encoder-{digest[:20]}-{variant}-{tag}-{INPUT_SIZE}.onnx"


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


# ----------------------------------------------------------------------------------------------
# OpenVINO

def _openvino():
    try:
        import openvino  # noqa: PLC0415 (optional package)
    except ImportError as err:
        raise Unavailable(f"needs openvino (pip install openvino): {err}") from None
    except Exception as err:  # a broken install (missing shared library, wrong CPU): fall back
        raise Unavailable(f"openvino cannot load: {type(err).__name__}: {err}") from None
    return openvino


def ov_version():
    """OpenVINO's release and build (``2026.4.1-22982``), the part that changes what it converts to."""
    return "-".join(_openvino().__version__.split("-")[:2])


_CORE = []


def _core():
    ov = _openvino()
    if not _CORE:
        try:
            _CORE.append(ov.Core())
        except Exception as err:
            raise Unavailable(f"OpenVINO cannot start: {type(err).__name__}: {err}") from None
    return _CORE[0]


def cpu_has_bf16():
    """Whether OpenVINO can run bf16 natively on this CPU (AVX512-BF16 or AMX: its ``BF16`` capability)."""
    try:
        return "BF16" in _core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    except Unavailable:
        return False
    except Exception:
        return False


def ir_dir(image_encoder, model, input_size, digest=None):
    """Where the cached OpenVINO model (a folder: model.xml, model.bin) of these weights and runtimes lives."""
    digest = digest or weights_digest(image_encoder)
    tag = _tag(f"torch{torch.__version__}-ov{ov_version()}")
    return cache_dir() / f"{model}-encoder-{digest[:20]}-openvino-{tag}-{input_size}"


def _example(input_size):
    # A plain tensor, made outside inference mode: the converter traces the module with it.
    return torch.rand(1, 3, input_size, input_size, generator=torch.Generator().manual_seed(0))


def _convert_openvino(image_encoder, folder, input_size, onnx_file=None):
    """Convert the encoder to an OpenVINO model in ``folder`` (atomically), checked against eager in f32.

    From LiteMedSAM's cached ONNX file where there is one (under a second), else from the torch module
    through ``torch.export`` (16 s for LiteMedSAM, 25 s for SAM ViT-B, about 1 GB of memory: the graph
    is traced with shapes only), else through TorchScript tracing (which runs the model while tracing:
    more than 8 GB for ViT-B).
    """

    ov = _openvino()
    x = _example(input_size)
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the tracer's notes say nothing to a user
            if onnx_file is not None and Path(onnx_file).is_file():
                converted = _core().read_model(str(onnx_file))
            else:
                try:
                    converted = ov.convert_model(torch.export.export(image_encoder, (x,)))
                except Exception:  # an older torch or OpenVINO, or a module torch.export cannot take
                    converted = ov.convert_model(image_encoder, example_input=x)
    except Exception as err:
        raise Unavailable(f"OpenVINO conversion failed: {type(err).__name__}: {err}") from None
    try:
        with staged_dir(folder) as stage:
            os.chmod(stage, 0o755)  # mkdtemp's folder is private; a cached model is as readable as a file
            # f32 weights: save_model's default fp16 compression would cost the exact path its exactness.
            ov.save_model(converted, str(stage / "model.xml"), compress_to_fp16=False)
            del converted
            gc.collect()
            with torch.no_grad():
                ref = image_encoder(x).numpy()
            out = OvEncoder(stage / "model.xml", torch.device("cpu"), 1, "f32")(x).numpy()
            diff = float(np.abs(out - ref).max())
            if not np.isfinite(diff) or diff > EXACT_TOLERANCE:
                raise Unavailable(f"the OpenVINO model differs from eager by {diff:.2e}")
    except (Unavailable, OSError) as err:
        if isinstance(err, OSError):
            if (folder / "model.xml").is_file():
                return  # a second process converted it first
            raise Unavailable(f"cannot write the OpenVINO model into the cache folder {folder.parent}: {err}",
                              lasting=False) from None
        raise
    except Exception as err:
        raise Unavailable(f"OpenVINO conversion failed: {type(err).__name__}: {err}") from None


class OvEncoder:
    """Callable like the encoder: (1, 3, S, S) float tensor -> features tensor, through OpenVINO on the CPU.

    ``precision`` f32 or bf16 is set explicitly: OpenVINO's own default on a CPU with bf16 instructions
    is bf16, which is not the exact path. ``threads``: OpenVINO's threads for this model (torch's
    setting does not reach it).
    """

    def __init__(self, xml, device, threads, precision="f32"):
        # Property names as strings: they are the same in every OpenVINO release since 2023.
        config = {"INFERENCE_PRECISION_HINT": precision,
                  "PERFORMANCE_HINT": "LATENCY",
                  "NUM_STREAMS": 1,
                  "INFERENCE_NUM_THREADS": max(1, int(threads)),
                  # On a shared machine or a desktop (Slicer), threads pinned to cores wait for a busy core.
                  "ENABLE_CPU_PINNING": False}
        self.path = Path(xml)
        self.device = device
        self.precision = precision
        self.compiled = _core().compile_model(str(xml), "CPU", config)
        got = str(self.compiled.get_property("INFERENCE_PRECISION_HINT"))
        want = {"f32": "float32", "bf16": "bfloat16"}[precision]
        if want not in got:
            raise Unavailable(f"OpenVINO compiled the encoder for {got}, not {want}", lasting=False)
        self.request = self.compiled.create_infer_request()
        # One request serves every caller; a second caller (the slice embedded ahead, a cancelled run's last
        # slice) waits for it instead of finding it busy.
        self._lock = threading.Lock()
        shape = self.compiled.input(0).get_partial_shape()
        self.input_shape = tuple(int(d.get_length()) for d in shape) if shape.is_static else None

    def __call__(self, x):
        if self.input_shape is not None and tuple(x.shape) != self.input_shape:
            raise ValueError(f"the OpenVINO encoder takes {self.input_shape}, got {tuple(x.shape)}")
        arr = x.detach().to("cpu", torch.float32).contiguous().numpy()
        with self._lock:
            out = self.request.infer({0: arr})[0]  # copied out of the request's buffer (share_outputs off)
        return torch.from_numpy(out).to(self.device)


def _build_openvino(image_encoder, name, device, model, input_size, digest):
    if name == "openvino-bf16" and not cpu_has_bf16():
        raise Unavailable("this CPU has no bf16 instructions (AVX512-BF16 or AMX) that OpenVINO can use",
                          lasting=False)
    folder = ir_dir(image_encoder, model, input_size, digest)
    onnx_file = None
    if model == "litemedsam":
        try:
            onnx_file = artifact_path(image_encoder, "fp32", digest)
        except Unavailable:
            pass
    _make_once(folder, lambda: _convert_openvino(image_encoder, folder, input_size, onnx_file))
    try:
        return OvEncoder(folder / "model.xml", torch.device(device), torch.get_num_threads(),
                         "bf16" if name == "openvino-bf16" else "f32")
    except Unavailable:
        raise
    except Exception as err:
        raise Unavailable(f"OpenVINO cannot load {folder}: {type(err).__name__}: {err}", lasting=False) from None


# ----------------------------------------------------------------------------------------------
# Choosing a path

def _build(image_encoder, name, device, model="litemedsam", input_size=INPUT_SIZE, digest=None):
    if torch.device(device).type != "cpu":
        raise Unavailable("the fast paths run on CPU; on a GPU the eager encoder is the fast one")
    if name in LITEMEDSAM_ONLY and model != "litemedsam":
        raise Unavailable(f"the {name} path is LiteMedSAM's; use openvino for {model}")
    digest = digest or weights_digest(image_encoder)
    if name.startswith("openvino"):
        return _build_openvino(image_encoder, name, device, model, input_size, digest)
    fp32 = artifact_path(image_encoder, "fp32", digest)
    _make_once(fp32, lambda: _export_onnx(image_encoder, fp32))
    path = fp32
    if name == "onnx-int8":
        path = artifact_path(image_encoder, "int8", digest)
        _make_once(path, lambda: _quantize_int8(fp32, path))
    try:
        return OrtEncoder(path, torch.device(device), torch.get_num_threads())
    except Exception as err:
        raise Unavailable(f"ONNX Runtime cannot load {path}: {err}") from None


def available_paths(model="litemedsam"):
    """Fast paths this installation could run (their runtimes import, bf16 where the CPU has it);
    conversion may still fail."""
    out = []
    try:
        _core()
        out.append("openvino")
        if cpu_has_bf16():
            out.append("openvino-bf16")
    except Unavailable:
        pass
    if model == "litemedsam":
        try:
            _runtime()
            out.extend(LITEMEDSAM_ONLY)
        except Unavailable:
            pass
    return tuple(out)


def make_encoder(image_encoder, name, device, model="litemedsam", input_size=INPUT_SIZE):
    """The encoder callable of path ``name`` and the name of the path actually used.

    ``model`` names the encoder in the cache (litemedsam, sam-vit-b, ...), ``input_size`` its square
    input. ``auto`` falls back to eager when no fast path can run here; a named path that cannot
    run is a user error.
    """
    if name == "eager":
        return image_encoder, "eager"
    if name != "auto" and name not in PATHS:
        raise URSAMError(f"unknown encoder path {name!r}; use auto, eager, {', '.join(PATHS)}")
    if torch.device(device).type != "cpu":
        if name == "auto":
            return image_encoder, "eager"
        raise URSAMError(f"encoder path {name!r} is not available: the fast paths run on CPU; on a GPU the "
                         "eager encoder is the fast one (use --encoder auto or eager)")
    digest = weights_digest(image_encoder)
    if name == "auto":
        for candidate in AUTO_ORDER:
            if candidate in LITEMEDSAM_ONLY and model != "litemedsam":
                continue
            try:
                return _build(image_encoder, candidate, device, model, input_size, digest), candidate
            except Unavailable:
                continue
        return image_encoder, "eager"
    try:
        return _build(image_encoder, name, device, model, input_size, digest), name
    except Unavailable as err:
        raise URSAMError(f"encoder path {name!r} is not available: {err}") from None
