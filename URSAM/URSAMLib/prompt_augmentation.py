"""Prompt augmentation (paper §3.3): n randomly shifted copies of a box prompt.

The ratio is a fraction of the slice's longest side (0.01 of 1024 px is about
10 px, METHOD.md §3). Each of the four box coordinates moves independently by
a uniform shift in [-ratio*S, +ratio*S]. The shifts are drawn once per organ,
so member i of the ensemble uses the same shifted box on every slice and is a
coherent 3D segmentation of its own.
"""
from __future__ import annotations

import numpy as np


def augment_box(box_xyxy, n, ratio, side, rng):
    """Return an (n, 4) array of shifted [x0, y0, x1, y1] boxes.

    Boxes stay at least one pixel wide and inside [0, side-1]... of the slice:
    ``side`` is (width, height).
    """
    box = np.asarray(box_xyxy, dtype=np.float64)
    width, height = side
    reach = ratio * max(width, height)
    shifts = rng.uniform(-reach, reach, size=(n, 4))
    return shift_box(box, shifts, side)


def shift_box(box_xyxy, shifts, side):
    """``box_xyxy`` moved by each row of ``shifts`` (n, 4), clipped and ordered as in augment_box.

    Per-slice prompts (URSAMLib.prompts) move each slice's box by its organ's shifts.
    """
    box = np.asarray(box_xyxy, dtype=np.float64)
    width, height = side
    out = box[None, :] + shifts
    out[:, [0, 2]] = np.clip(out[:, [0, 2]], 0, width - 1)
    out[:, [1, 3]] = np.clip(out[:, [1, 3]], 0, height - 1)
    # A shift may cross the sides of a thin box; keep them ordered.
    x0 = np.minimum(out[:, 0], out[:, 2]); x1 = np.maximum(out[:, 0], out[:, 2])
    y0 = np.minimum(out[:, 1], out[:, 3]); y1 = np.maximum(out[:, 1], out[:, 3])
    return np.stack([x0, y0, x1, y1], axis=1)


def organ_rngs(seed, labels):
    """One generator per organ, keyed by label, so adding an organ leaves the others' shifts alone."""
    return {int(label): np.random.default_rng([int(seed), int(label)]) for label in labels}
