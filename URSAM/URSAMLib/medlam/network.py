"""The MedLAM network (METHOD.md §1): a 3D U-Net with a latent-coordinate head.

The encoder has five levels of two 3x3x3 conv + InstanceNorm + ReLU blocks
with four max-poolings between them; a linear head maps the flattened
bottleneck of a 64^3 patch (4^3 x 384 = 24576 values with the paper's widths)
through 192 and 96 units to a 3-vector ``p``, the patch's position in a
learned anatomical coordinate system. The decoder returns pixel features at
1/4, 1/2 and 1/1 of the patch size for the local refinement.

Sign convention, used everywhere in this package: for patches ``a`` and ``b``,
``offset(p_a, p_b) = r * tanh(p_a - p_b)`` approximates ``centre_a - centre_b``
in mm, in (z, y, x) order. At inference ``a`` is the support landmark's patch
and ``b`` a query crop, so the landmark lies at ``query_centre + offset``.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

#: the paper's widths; a 64^3 patch gives the 24576 -> 192 -> 96 -> 3 head
PAPER_WIDTHS = (48, 48, 96, 192, 384)
#: r in mm, (z, y, x)
PAPER_RANGE_MM = (1500.0, 600.0, 600.0)


@dataclass
class NetConfig:
    widths: tuple = PAPER_WIDTHS
    #: channels of the three decoder feature maps (the paper: 96)
    feature_channels: int = 96
    patch_size: int = 64
    range_mm: tuple = PAPER_RANGE_MM
    #: HU breakpoints and the values they map to (piecewise linear)
    hu_points: tuple = (-1000.0, -200.0, 200.0, 1500.0)
    hu_values: tuple = (0.0, 0.2, 0.8, 1.0)
    spacing_mm: float = 3.0
    dropout: float = 0.2
    hidden: tuple = field(default=None)

    def __post_init__(self):
        self.widths = tuple(int(w) for w in self.widths)
        self.range_mm = tuple(float(v) for v in self.range_mm)
        self.hu_points = tuple(float(v) for v in self.hu_points)
        self.hu_values = tuple(float(v) for v in self.hu_values)
        if self.hidden is None:
            # The paper's 192 and 96 are half and a quarter of the bottleneck width.
            self.hidden = (max(self.widths[4] // 2, 4), max(self.widths[4] // 4, 4))
        self.hidden = tuple(int(v) for v in self.hidden)
        self.validate()

    def validate(self):
        if len(self.widths) != 5 or min(self.widths) < 1:
            raise ValueError(f"widths must be 5 positive numbers, got {self.widths}")
        if self.patch_size < 16 or self.patch_size % 16:
            raise ValueError(f"patch_size must be a multiple of 16 (four poolings), got {self.patch_size}")
        if len(self.range_mm) != 3 or min(self.range_mm) <= 0:
            raise ValueError(f"range_mm must be 3 positive numbers, got {self.range_mm}")
        if len(self.hu_points) != len(self.hu_values) or len(self.hu_points) < 2 \
                or any(b <= a for a, b in zip(self.hu_points, self.hu_points[1:])):
            raise ValueError("hu_points must increase and match hu_values in length")
        if self.spacing_mm <= 0:
            raise ValueError(f"spacing_mm must be positive, got {self.spacing_mm}")

    def to_dict(self):
        d = asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    @classmethod
    def from_dict(cls, d):
        known = set(cls.__dataclass_fields__)
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown network settings {sorted(unknown)}")
        return cls(**d)


def _block(cin, cout):
    return nn.Sequential(
        nn.Conv3d(cin, cout, 3, padding=1),
        nn.InstanceNorm3d(cout, affine=True),
        nn.ReLU(inplace=True),
    )


def _double(cin, cmid, cout):
    return nn.Sequential(_block(cin, cmid), _block(cmid, cout))


class MedLAMNet(nn.Module):
    """``forward(x)`` -> {"position": (B, 3), "features": [f_1/4, f_1/2, f_1/1]}."""

    def __init__(self, config=None):
        super().__init__()
        self.config = config or NetConfig()
        w = self.config.widths
        fc = self.config.feature_channels
        # Encoder: the first block of each level keeps the width of its input
        # (as in MedLSAM); widths[i] is the level's output width.
        self.enc = nn.ModuleList([
            _double(1, w[0], w[0]),
            _double(w[0], w[0], w[1]),
            _double(w[1], w[1], w[2]),
            _double(w[2], w[2], w[3]),
            _double(w[3], w[3], w[4]),
        ])
        self.drop = nn.Dropout(self.config.dropout)
        # Decoder: 1/8 at widths[3] channels, then the three feature maps.
        self.dec8 = _double(w[4] + w[3], w[3], w[3])
        self.dec4 = _double(w[3] + w[2], fc, fc)
        self.dec2 = _double(fc + w[1], fc, fc)
        self.dec1 = _double(fc + w[0], fc, fc)
        cells = (self.config.patch_size // 16) ** 3
        h1, h2 = self.config.hidden
        # No nonlinearity between the linear layers, as in MedLSAM's head.
        self.head = nn.Sequential(nn.Linear(cells * w[4], h1), nn.Linear(h1, h2), nn.Linear(h2, 3))
        # Start with latent positions close together: offsets near 0 rather than
        # saturated tanh (r is up to 1.5 m), which keeps the first steps stable.
        with torch.no_grad():
            self.head[-1].weight.mul_(0.1)
            self.head[-1].bias.zero_()

    def forward(self, x, position=True, features=True):
        skips = []
        out = x
        for i, level in enumerate(self.enc):
            if i:
                out = F.max_pool3d(out, 2)
            out = level(out)
            skips.append(out)
        bottleneck = self.drop(out)
        result = {}
        if position:
            result["position"] = self.head(bottleneck.flatten(1))
        if features:
            out = bottleneck
            maps = []
            for dec, skip in zip((self.dec8, self.dec4, self.dec2, self.dec1), skips[3::-1]):
                out = F.interpolate(out, scale_factor=2, mode="trilinear", align_corners=False)
                out = dec(torch.cat((out, skip), 1))
                maps.append(out)
            result["features"] = maps[1:]
        return result

    def offset_mm(self, p_a, p_b):
        """``centre_a - centre_b`` in mm (z, y, x), from the latent positions (see module doc)."""
        r = torch.as_tensor(self.config.range_mm, dtype=p_a.dtype, device=p_a.device)
        return r * torch.tanh(p_a - p_b)


#: the scale of each decoder feature map relative to the patch
FEATURE_SCALES = (4, 2, 1)
