"""Batched patch geometry for the augmented copies: random affine maps, elastic fields, sampling.

A patch of side S is a grid of offsets ``i - S // 2`` (voxels, z y x) around
its centre. The augmented copy's voxel ``i`` shows the scan point

    coords[i] = M @ (i - S // 2) + elastic[i] + centre

with ``M = R @ diag(s)`` (scale first, then rotate), exactly as the numpy
sampler (sampling.py) defines it; the matching loss reads ``coords`` to know
which voxels of the copy show the same anatomy as a point of the original.
Coordinates are kept channel-last, (P, S, S, S, 3), the layout
``grid_sample`` reads; ``channels_first`` gives the loss's (P, 3, S, S, S)
as a view.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def uniform(generator, shape, low, high, device):
    """Uniform floats in [low, high) from ``generator`` (on ``device``)."""
    return torch.rand(shape, generator=generator, device=device).mul_(high - low).add_(low)


def rotations(angles):
    """(P, 3, 3) rotations ``Rz @ Ry @ Rx`` from angles (P, 3) in radians, about the z, y and x axes.

    Axes in (z, y, x) order; the same matrices as sampling.py's ``_rotation``.
    """
    c, s = torch.cos(angles), torch.sin(angles)
    one, zero = torch.ones_like(c[:, 0]), torch.zeros_like(c[:, 0])

    def mat(rows):
        return torch.stack([torch.stack(r, -1) for r in rows], -2)

    rz = mat([(one, zero, zero), (zero, c[:, 0], -s[:, 0]), (zero, s[:, 0], c[:, 0])])
    ry = mat([(c[:, 1], zero, s[:, 1]), (zero, one, zero), (-s[:, 1], zero, c[:, 1])])
    rx = mat([(c[:, 2], -s[:, 2], zero), (s[:, 2], c[:, 2], zero), (zero, zero, one)])
    return rz @ ry @ rx


def random_affine(generator, n, max_deg, max_scale, p, device):
    """(n, 3, 3) matrices ``R @ diag(s)``, the identity for patches left unaugmented (probability 1 - p).

    Returns (matrices, which patches got one: (n,) bool).
    """
    use = torch.rand(n, generator=generator, device=device) < p
    scale = uniform(generator, (n, 3), 1.0 - max_scale, 1.0 + max_scale, device)
    angles = uniform(generator, (n, 3), -math.radians(max_deg), math.radians(max_deg), device)
    m = rotations(angles) * scale[:, None, :]
    eye = torch.eye(3, device=device).expand(n, 3, 3)
    return torch.where(use[:, None, None], m, eye), use


def random_elastic(generator, n, points, max_voxels, p, device):
    """(n, points, points, points, 3) control-point moves (voxels, z y x); zero for unaugmented patches.

    The border control points are pinned, as torchio does, so the field fades
    at the patch's edges. Returns (moves, which patches got one: (n,) bool).
    """
    use = torch.rand(n, generator=generator, device=device) < p
    coarse = uniform(generator, (n, points, points, points, 3), -max_voxels, max_voxels, device)
    inner = torch.zeros((points,) * 3, dtype=torch.bool, device=device)
    inner[1:-1, 1:-1, 1:-1] = True
    return coarse.mul_((inner[None] & use[:, None, None, None])[..., None]), use


def _interp_matrix(points, size, device):
    """(size, points): linear interpolation weights of ``points`` control points onto ``size`` voxels.

    The 1D factor of ``F.interpolate(..., mode="trilinear", align_corners=True)``.
    """
    eye = torch.eye(points, device=device)[None]
    return F.interpolate(eye, size=size, mode="linear", align_corners=True)[0].T.contiguous()


def patch_coords(affine, elastic, centres, size, out=None):
    """Scan coordinates of every voxel of each augmented copy: (P, S, S, S, 3), z y x.

    ``affine``: (P, 3, 3); ``elastic``: (P, n, n, n, 3) control-point moves;
    ``centres``: (P, 3) float; ``out``: an optional contiguous (P, S, S, S, 3)
    float32 tensor to write into. Along z both parts are combinations of 2 + n
    functions of the slice index (1, the offset ``i - S // 2``, and the n
    linear-interpolation weights of the elastic control points), with
    coefficients that are (S, S, 3) planes; one batched matrix product with
    those planes writes the whole output in a single pass.
    """
    p, device = affine.shape[0], affine.device
    n = elastic.shape[1]
    r = torch.arange(size, device=device, dtype=torch.float32) - size // 2
    w = _interp_matrix(n, size, device)                                            # S, n
    basis = torch.cat([torch.ones_like(r)[:, None], r[:, None], w], 1)             # S, 2 + n
    cols = affine.transpose(1, 2)                                                  # P, 3 (axis), 3
    planes = torch.empty((p, 2 + n, size, size, 3), device=device)
    planes[:, 0] = (centres[:, None, None, :] + cols[:, 1, None, None, :] * r[None, :, None, None]) + \
        cols[:, 2, None, None, :] * r[None, None, :, None]
    planes[:, 1] = cols[:, 0, None, None, :]
    # The elastic field's trilinear upsampling is separable: x and y here, z in the product below.
    field = torch.einsum("pabcd,kc->pabkd", elastic, w)                            # P, n, n, S, 3
    planes[:, 2:] = torch.einsum("pabkd,jb->pajkd", field, w)                      # P, n, S, S, 3
    if out is None:
        out = torch.empty((p, size, size, size, 3), device=device)
    torch.bmm(basis.expand(p, -1, -1), planes.view(p, 2 + n, -1), out=out.view(p, size, -1))  # P, S, S*S*3
    return out


def channels_first(coords):
    """(P, S, S, S, 3) -> (P, 3, S, S, S), a view (the channels_last_3d layout)."""
    return coords.permute(0, 4, 1, 2, 3)


def sampling_grid(shapes, affine, elastic, centres, size):
    """``grid_sample``'s grid for :func:`patch_coords`'s points: (P, S, S, S, 3).

    ``shapes``: (P, 3) long, the (D, H, W) of each patch's scan. The
    normalized grid (x y z order, -1..1 over the scan, corners aligned) is an
    affine function of the scan coordinates, so it is built the same way from
    transformed parts rather than from the coordinates (one pass, not several).
    """
    p = affine.shape[0]
    scale = 2.0 / (shapes.float() - 1.0).clamp(min=1.0)                               # P, 3 (z y x)
    # grid = T @ zyx - 1, with T the axis reversal times the scale.
    to_grid = torch.zeros((p, 3, 3), device=affine.device)
    to_grid[:, 0, 2], to_grid[:, 1, 1], to_grid[:, 2, 0] = scale[:, 2], scale[:, 1], scale[:, 0]
    moved = torch.einsum("pij,pabcj->pabci", to_grid, elastic)
    origin = torch.einsum("pij,pj->pi", to_grid, centres) - 1.0
    return patch_coords(to_grid @ affine, moved, origin, size)


def sample(bank, scans, grid, out, rows):
    """Trilinear samples of the scans into ``out[rows]``, as [0, 1] intensities (raw / 255).

    ``bank``: a ``bank.VolumeBank``; ``scans``: (Q,) long, each patch's scan;
    ``grid``: (Q, S, S, S, 3) from :func:`sampling_grid`; ``out``: (P, S, S, S);
    ``rows``: Q sorted row numbers of ``out``. One ``grid_sample`` per run of
    consecutive rows from one scan (an example's patches), written in place.
    Outside the scan reads 0, and a point between an edge voxel and the
    outside mixes that voxel with 0 (``grid_sample``'s zeros padding).
    """
    size = tuple(grid.shape[1:4])
    scans = scans.tolist()
    q = 0
    while q < len(rows):
        end = q + 1
        while end < len(rows) and rows[end] == rows[end - 1] + 1 and scans[end] == scans[q]:
            end += 1
        g = grid[q:end].view(1, (end - q) * size[0], size[1], size[2], 3)
        res = F.grid_sample(bank.source(scans[q]), g, mode="bilinear", padding_mode="zeros", align_corners=True)
        torch.div(res.view((end - q,) + size), 255.0, out=out[rows[q]:rows[q] + end - q])
        q = end
