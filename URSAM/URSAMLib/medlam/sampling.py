"""Self-supervised training pairs for MedLAM (METHOD.md §1), drawn from unlabelled CT.

For each example two patch centres are drawn in one scan. Each centre gives

- an original patch (a plain crop, moved by a small random shift), whose
  centre positions give the offset target ``centre_0 - centre_1`` in mm;
- an augmented copy: the same region under a random rotation, scaling and
  elastic deformation, then a random intensity remapping and noise. For every
  voxel of the copy the sampler keeps the scan coordinate it came from, which
  says which voxels of the copy show the same anatomy as a point of the
  original patch: the targets of the feature-matching loss.

All randomness comes from one ``numpy.random.Generator``, so a seed and the
generator's state reproduce the batches exactly (resume included).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from scipy import ndimage

from .preprocessing import crop


@dataclass
class AugmentConfig:
    """MedLSAM's augmentation settings (its training code) as defaults."""
    #: random shift of the original patch against its augmented copy, voxels
    shift: int = 8
    rotate_deg: float = 15.0
    scale: float = 0.1
    #: elastic deformation: control points per axis and their largest move (voxels)
    elastic_points: int = 5
    elastic_voxels: float = 3.0
    #: probability of each augmentation
    p_affine: float = 0.5
    p_elastic: float = 0.5
    p_intensity: float = 0.5
    p_noise: float = 0.5
    noise_std: float = 0.2
    #: a voxel is "body" (worth choosing as a centre or point) above this mapped intensity
    body: float = 0.1
    #: points per patch for the feature-matching loss
    points: int = 20

    def to_dict(self):
        return asdict(self)


def _body_point(volume_u8, rng, lo, hi, body, tries=20):
    """A random voxel in [lo, hi) that is body if one is found in ``tries`` draws."""
    threshold = body * 255
    p = None
    for _ in range(tries):
        p = rng.integers(lo, hi)
        if volume_u8[p[0], p[1], p[2]] > threshold:
            break
    return p


def _rotation(rng, max_deg):
    angles = np.deg2rad(rng.uniform(-max_deg, max_deg, size=3))
    cz, cy, cx = np.cos(angles)
    sz, sy, sx = np.sin(angles)
    rz = np.array([[1, 0, 0], [0, cz, -sz], [0, sz, cz]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rx = np.array([[cx, -sx, 0], [sx, cx, 0], [0, 0, 1]])
    return rz @ ry @ rx


def _elastic_field(rng, size, n_points, max_disp):
    """A smooth displacement field (3, size, size, size) in voxels through random control points."""
    import torch  # noqa: PLC0415 (torch loads only where a model runs)
    import torch.nn.functional as F  # noqa: PLC0415 (torch loads only where a model runs)

    coarse = rng.uniform(-max_disp, max_disp, size=(3, n_points, n_points, n_points))
    # Pin the border control points, as torchio does, so the field fades at the edges.
    coarse[:, [0, -1], :, :] = 0
    coarse[:, :, [0, -1], :] = 0
    coarse[:, :, :, [0, -1]] = 0
    field = F.interpolate(torch.from_numpy(coarse).float()[None], size=(size,) * 3, mode="trilinear",
                          align_corners=True)
    return field[0].numpy()


def _remap_intensity(x, rng):
    """MedLSAM's random monotone remapping: a sum of sigmoids at random thresholds."""
    edges = (0.2, 0.4, 0.6, 0.8)
    out = np.zeros_like(x)
    n = len(edges) - 1
    for a, b in zip(edges, edges[1:]):
        t = rng.uniform(a, b)
        out += 1.0 / (n * (1.0 + np.exp(np.clip(-(x - t) / 0.1, -50, 50))))
    return out.astype(np.float32)


def _augmented_patch(volume_u8, centre, size, aug, rng):
    """The augmented copy around ``centre`` and the scan coordinate of each of its voxels."""
    grid = np.indices((size,) * 3, dtype=np.float32).reshape(3, -1) - size // 2
    coords = grid
    if rng.random() < aug.p_affine:
        s = 1.0 + rng.uniform(-aug.scale, aug.scale, size=3)
        m = _rotation(rng, aug.rotate_deg) * s[None, :]
        coords = (m @ grid).astype(np.float32)
    coords = coords.reshape(3, size, size, size)
    if rng.random() < aug.p_elastic:
        coords = coords + _elastic_field(rng, size, aug.elastic_points, aug.elastic_voxels).astype(np.float32)
    coords = coords + np.asarray(centre, np.float32)[:, None, None, None]
    # Sample from a region around the centre only (fast), in that region's frame.
    c = np.asarray(centre, np.float32)[:, None, None, None]
    side = 2 * int(np.ceil(np.abs(coords - c).max())) + 4
    region = crop(volume_u8, np.asarray(centre), side)
    local = coords - c + side // 2
    patch = ndimage.map_coordinates(region.astype(np.float32) / 255.0, local, order=1, mode="constant", cval=0.0)
    if rng.random() < aug.p_intensity:
        patch = _remap_intensity(patch, rng)
    if rng.random() < aug.p_noise:
        patch = patch + rng.normal(0.0, aug.noise_std, size=patch.shape).astype(np.float32)
    return patch.astype(np.float32), coords.astype(np.float32)


def _match_points(patch_u8_or_f, n, rng, body, tries=20):
    """``n`` voxel indices of a patch for the matching loss, preferring body voxels."""
    size = patch_u8_or_f.shape[0]
    pts = np.zeros((n, 3), np.int64)
    for k in range(n):
        for _ in range(tries):
            p = rng.integers(0, size, size=3)
            if patch_u8_or_f[p[0], p[1], p[2]] > body:
                break
        pts[k] = p
    return pts


def draw_example(volume_u8, size, aug, rng, n_patches=2):
    """``n_patches`` patches of one scan (uint8 [z, y, x] on the 3 mm grid, unpadded), each with its copy.

    Every pair of these patches is a pair of random patches of the same scan
    for the offset loss; MedLSAM draws 2, more give more pairs for the same
    network passes.
    """
    shape = np.array(volume_u8.shape)
    keys = ("ori", "aug", "coords", "points", "point_coords", "centre")
    example = {k: [] for k in keys}
    for _ in range(n_patches):
        c = _body_point(volume_u8, rng, np.zeros(3, np.int64), shape, aug.body)
        aug_patch, coords = _augmented_patch(volume_u8, c, size, aug, rng)
        shift = rng.integers(-aug.shift, aug.shift + 1, size=3) if aug.shift else np.zeros(3, np.int64)
        oc = c + shift
        ori = crop(volume_u8, oc, size).astype(np.float32) / 255.0
        points = _match_points(ori, aug.points, rng, aug.body)
        example["ori"].append(ori[None])
        example["aug"].append(aug_patch[None])
        example["coords"].append(coords)
        example["points"].append(points)
        # Scan coordinates of the points: where the copy must show the same anatomy.
        example["point_coords"].append((points - size // 2 + oc).astype(np.float32))
        example["centre"].append(oc.astype(np.float32))
    return {k: np.stack(v) for k, v in example.items()}


def draw_batch(volumes, batch_size, size, aug, rng, n_patches=2):
    """``batch_size`` examples, each from a scan chosen at random: arrays (B, n_patches, ...)."""
    examples = [draw_example(volumes[int(rng.integers(len(volumes)))], size, aug, rng, n_patches)
                for _ in range(batch_size)]
    return {k: np.stack([e[k] for e in examples]) for k in examples[0]}


def draw_pairs(volumes, n, size, rng, body=0.1):
    """Plain (unaugmented) patch pairs for validation: (ori0, ori1, centre0, centre1) arrays."""
    out = {"ori0": [], "ori1": [], "centre0": [], "centre1": []}
    for i in range(n):
        v = volumes[i % len(volumes)]
        shape = np.array(v.shape)
        for k in range(2):
            c = _body_point(v, rng, np.zeros(3, np.int64), shape, body)
            out[f"ori{k}"].append(crop(v, c, size).astype(np.float32)[None] / 255.0)
            out[f"centre{k}"].append(c.astype(np.float32))
    return {k: np.stack(v) for k, v in out.items()}
