"""MedLAM, the paper's learned landmark localizer (METHOD.md §1), as a second localizer.

- network.py: the 3D U-Net with the latent-position head and multi-scale features;
- preprocessing.py: LPS orientation, 3 mm voxels, HU mapping, padding, extreme points;
- sampling.py, losses.py, training.py: self-supervised training on unlabelled CT;
- bank.py, warp.py, draw.py: the batched tensor sampler (the default; sampling.py is the reference);
- budget.py: the default batch size, fitted to the device's memory;
- checkpoint.py: checkpoint files (settings, weights, resumable training state);
- inference.py: support latents and kernels, query crops, offset, local refinement, boxes.

Importing this package does not import torch; the localizer loads it on first use.
"""
from __future__ import annotations


def localize_medlam(image, library, organs=None, progress=None, **options):
    """``localize.LOCALIZERS["medlam"]``: see :func:`URSAMLib.medlam.inference.localize_medlam`."""
    from .inference import localize_medlam as run  # noqa: PLC0415 (imports torch: loads only where a model runs)

    return run(image, library, organs=organs, progress=progress, **options)
