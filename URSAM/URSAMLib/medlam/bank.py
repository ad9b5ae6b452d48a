"""The training scans on the training device, for batched patch drawing.

Each scan is one uint8 tensor [z, y, x] on the 3 mm grid (unpadded, as
``preprocessing.prepare(pad=0)`` gives it): the mapped intensity times 255,
so hundreds of scans fit in a few GB. Coordinates are a scan's own voxel
indices; everything outside a scan reads 0 (air), as ``preprocessing.crop``
does. Values come back as float32 ``k / 255``, the numbers the numpy sampler
computes. A batch converts to float only the scans it samples from: float32
copies of all scans saved about a tenth of a batch's time on the CPU, at four
times the memory.
"""
from __future__ import annotations

import torch


class VolumeBank:
    """``volumes``: uint8 arrays [z, y, x] (numpy or torch), stored on ``device``."""

    def __init__(self, volumes, device="cpu"):
        if not volumes:
            raise ValueError("the bank needs at least one scan")
        if any(len(v.shape) != 3 or min(v.shape) < 1 for v in volumes):
            raise ValueError("every scan must be a non-empty 3D array")
        self.device = torch.device(device)
        self.volumes = [torch.as_tensor(v, dtype=torch.uint8).to(self.device) for v in volumes]
        #: (N, 3) long: each scan's shape
        self.shapes = torch.tensor([tuple(v.shape) for v in volumes], dtype=torch.long, device=self.device)

    def __len__(self):
        return len(self.volumes)

    @property
    def nbytes(self):
        return sum(v.numel() * v.element_size() for v in self.volumes)

    def source(self, scan):
        """Scan ``scan`` as (1, 1, D, H, W) float32 in raw units (0..255), for ``grid_sample``."""
        return self.volumes[scan].float()[None, None]

    def values(self, scans, zyx):
        """Voxel values in [0, 1] at integer points; 0 outside the scan.

        ``scans``: (P,) long; ``zyx``: (P, ..., 3) long. Returns (P, ...) float32.
        """
        shape = self.shapes[scans].view((-1,) + (1,) * (zyx.dim() - 2) + (3,))
        inside = ((zyx >= 0) & (zyx < shape)).all(-1)
        at = torch.minimum(zyx.clamp(min=0), shape - 1)
        out = torch.empty(zyx.shape[:-1], device=self.device)
        for p, s in enumerate(scans.tolist()):
            out[p] = self.volumes[s][at[p, ..., 0], at[p, ..., 1], at[p, ..., 2]]
        return out.div_(255.0).mul_(inside)

    def crops(self, scans, corners, size, out=None):
        """Plain crops: voxel ``i`` of crop ``p`` is scan voxel ``corners[p] + i``.

        ``scans``: (P,) long; ``corners``: (P, 3) long; ``out``: an optional
        (P, size, size, size) float32 tensor to write into. Returns (P, size,
        size, size) float32 in [0, 1], 0 outside the scan. One sliced copy per
        crop: an axis-aligned block copies far faster than a gather of its voxels.
        """
        if out is None:
            out = torch.empty((len(scans), size, size, size), device=self.device)
        lo = corners.clamp(min=0)
        hi = torch.minimum(corners + size, self.shapes[scans])
        for p, (s, a, b, c) in enumerate(zip(scans.tolist(), lo.tolist(), hi.tolist(), corners.tolist())):
            inside = all(x < y for x, y in zip(a, b))
            if not inside or a != c or any(y - x != size for x, y in zip(a, b)):
                out[p].zero_()  # partly or wholly outside the scan: air there
            if inside:
                torch.div(self.volumes[s][a[0]:b[0], a[1]:b[1], a[2]:b[2]], 255.0,
                          out=out[p, a[0] - c[0]:b[0] - c[0], a[1] - c[1]:b[1] - c[1], a[2] - c[2]:b[2] - c[2]])
        return out
