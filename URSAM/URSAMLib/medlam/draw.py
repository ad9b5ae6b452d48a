"""Self-supervised training batches for MedLAM, drawn as batched tensor operations on the training device.

The same examples as sampling.py's numpy ``draw_batch`` (which stays as the
reference, ``--sampler numpy``), for every patch of every example at once:

- a centre on a body voxel of the example's scan (first body voxel of
  ``TRIES`` random draws, else the last draw);
- the augmented copy around that centre: affine (rotation, scaling) and
  elastic deformation (warp.py), ``grid_sample`` of the scans, then a random
  monotone intensity remap and Gaussian noise;
- the original patch, a plain crop (exact, no interpolation) around the
  centre moved by a random integer shift; its centre is what the offset loss
  compares: ``centre_i - centre_j`` (voxels) is the displacement between two
  patches of a scan;
- points of the original patch (preferring body voxels) and their scan
  coordinates, the targets of the matching loss.

A batch is drawn in two parts: :func:`plan` takes every random number from
one ``torch.Generator`` on the training device, in a fixed order; rendering
the patches then uses no randomness, so it can be split over threads (the
CPU path, ``workers``) and the batch is the same for any split. The same seed
and generator state give the same batch on one device (another device's
generator gives other numbers).
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from .bank import VolumeBank
from .sampling import AugmentConfig
from .warp import channels_first, patch_coords, random_affine, random_elastic, sample, sampling_grid

#: random draws per centre or point before giving up on finding body
TRIES = 20
#: MedLSAM's intensity remap: a threshold drawn in each of these intervals, one sigmoid each
REMAP_EDGES = (0.2, 0.4, 0.6, 0.8)
REMAP_WIDTH = 0.1


@dataclass
class Plan:
    """Every random choice of one batch; P = B * n patch rows, example ``e`` owns rows ``e*n .. e*n + n - 1``."""
    size: int
    n_patches: int
    scan: torch.Tensor         # (B,) long: each example's scan in the bank
    scans: torch.Tensor        # (P,) long: each row's scan
    centre: torch.Tensor       # (P, 3) long: centre of the augmented copy
    affine: torch.Tensor       # (P, 3, 3) float: identity where not turned
    elastic: torch.Tensor      # (P, n, n, n, 3) float: control-point moves, zero where not bent
    warped: list               # P bools: the copy is turned or bent
    remap: list                # P bools: the copy's intensities are remapped
    thresholds: torch.Tensor   # (P, m) float: the remap's sigmoid thresholds
    noise: torch.Tensor        # (N, S, S, S) float: the noise of the N noisy rows, in row order
    noisy: list                # P ints: the row's index into ``noise``, -1 for none
    oc: torch.Tensor           # (P, 3) long: centre of the original patch (centre + shift)
    tries: torch.Tensor        # (P, K, T, 3) long: candidate voxels of the original patch for the points


def _first_hit(candidates, hit):
    """The first candidate with ``hit``, else the last: (P, ..., T, 3), (P, ..., T) -> (P, ..., 3)."""
    t = hit.shape[-1]
    first = torch.argmax(hit.to(torch.uint8), dim=-1)
    pick = torch.where(hit.any(-1), first, torch.full_like(first, t - 1))
    index = pick[..., None, None].expand(*pick.shape, 1, 3)
    return torch.gather(candidates, -2, index).squeeze(-2)


def _random_voxels(generator, shape, bounds, device):
    """Uniform integer voxels in [0, bounds): ``shape`` (P, ...) + (3,), with bounds (P, 3) long."""
    u = torch.rand(tuple(shape) + (3,), generator=generator, device=device)
    b = bounds.view((bounds.shape[0],) + (1,) * (len(shape) - 1) + (3,))
    return (u * b).long().clamp_(max=b - 1)


def _remap(x, thresholds):
    """MedLSAM's random monotone remap of patches ``x`` (k, S, S, S), in place: a sum of sigmoids, in (0, 1).

    ``thresholds``: (k, m), one per sigmoid, each patch its own.
    """
    k, m = thresholds.shape
    steep = x * (1.0 / REMAP_WIDTH)
    t = thresholds.view(k, m, 1, 1, 1) * (1.0 / REMAP_WIDTH)
    x.copy_(torch.sigmoid_(steep - t[:, 0]))
    for i in range(1, m):
        x.add_(torch.sigmoid_(steep - t[:, i]))
    return x.mul_(1.0 / m)


def _runs(rows):
    """Consecutive runs of the sorted row numbers ``rows``, as (start, stop) pairs: one slice each, no copies."""
    out = []
    for r in rows:
        if out and out[-1][1] == r:
            out[-1][1] = r + 1
        else:
            out.append([r, r + 1])
    return [tuple(x) for x in out]


def plan(bank: VolumeBank, batch_size, size, aug: AugmentConfig, generator, n_patches=2):
    """Every random choice of a batch (:class:`Plan`), all from ``generator``, in a fixed order."""
    device = bank.device
    g = generator
    b, n, p = batch_size, n_patches, batch_size * n_patches
    scan = (torch.rand(b, generator=g, device=device) * len(bank)).long().clamp_(max=len(bank) - 1)
    scans = scan.repeat_interleave(n)
    shapes = bank.shapes[scans]
    candidates = _random_voxels(g, (p, TRIES), shapes, device)                     # P, T, 3
    centre = _first_hit(candidates, bank.values(scans, candidates) > aug.body)     # P, 3

    affine, turned = random_affine(g, p, aug.rotate_deg, aug.scale, aug.p_affine, device)
    elastic, bent = random_elastic(g, p, aug.elastic_points, aug.elastic_voxels, aug.p_elastic, device)
    remap = (torch.rand(p, generator=g, device=device) < aug.p_intensity).tolist()
    edges = torch.tensor(REMAP_EDGES, device=device)
    thresholds = torch.lerp(edges[:-1], edges[1:],
                            torch.rand((p, len(edges) - 1), generator=g, device=device))
    noisy_rows = (torch.rand(p, generator=g, device=device) < aug.p_noise).tolist()
    noise = torch.randn((sum(noisy_rows), size, size, size), generator=g, device=device).mul_(aug.noise_std)
    noisy, k = [], 0
    for hit in noisy_rows:
        noisy.append(k if hit else -1)
        k += bool(hit)
    shift = torch.zeros_like(centre)
    if aug.shift:
        u = torch.rand((p, 3), generator=g, device=device)
        shift = (u * (2 * aug.shift + 1)).long().clamp_(max=2 * aug.shift) - aug.shift
    bounds = torch.full((p, 3), size, dtype=torch.long, device=device)
    tries = _random_voxels(g, (p, aug.points, TRIES), bounds, device)              # P, K, T, 3
    return Plan(size=size, n_patches=n, scan=scan, scans=scans, centre=centre, affine=affine, elastic=elastic,
                warped=(turned | bent).tolist(), remap=remap, thresholds=thresholds, noise=noise, noisy=noisy,
                oc=centre + shift, tries=tries)


def render(bank: VolumeBank, pl: Plan, aug: AugmentConfig, a, z, out):
    """Rows ``a .. z - 1`` of the batch into ``out`` (from :func:`allocate`); no randomness."""
    size = pl.size
    ori, copy, coords = out["ori"], out["copy"], out["coords"]
    patch_coords(pl.affine[a:z], pl.elastic[a:z], pl.centre[a:z].float(), size, out=coords[a:z])
    # A copy neither turned nor bent lies on whole voxels: a plain crop gives it exactly, and faster.
    for r0, r1 in _runs([r for r in range(a, z) if not pl.warped[r]]):
        bank.crops(pl.scans[r0:r1], pl.centre[r0:r1] - size // 2, size, out=copy[r0:r1])
    rows = [r for r in range(a, z) if pl.warped[r]]
    if rows:
        idx = torch.tensor(rows, device=bank.device)
        grid = sampling_grid(bank.shapes[pl.scans[idx]], pl.affine[idx], pl.elastic[idx],
                             pl.centre[idx].float(), size)
        sample(bank, pl.scans[idx], grid, copy, rows)
        del grid
    for r0, r1 in _runs([r for r in range(a, z) if pl.remap[r]]):
        _remap(copy[r0:r1], pl.thresholds[r0:r1])
    # Noisy rows take consecutive noise tensors, so a run of rows is one slice of each.
    for r0, r1 in _runs([r for r in range(a, z) if pl.noisy[r] >= 0]):
        copy[r0:r1].add_(pl.noise[pl.noisy[r0]:pl.noisy[r0] + r1 - r0])

    bank.crops(pl.scans[a:z], pl.oc[a:z] - size // 2, size, out=ori[a:z])
    k = pl.tries.shape[1]
    tries = pl.tries[a:z]
    flat = (tries[..., 0] * size + tries[..., 1]) * size + tries[..., 2]
    body = ori[a:z].view(z - a, 1, -1).expand(z - a, k, -1).gather(2, flat) > aug.body
    out["points"][a:z] = _first_hit(tries, body)


def allocate(p, size, points, device):
    """Empty output tensors for ``p`` patch rows of side ``size`` with ``points`` matching points each."""
    return {
        "ori": torch.empty((p, size, size, size), device=device),
        "copy": torch.empty((p, size, size, size), device=device),
        "coords": torch.empty((p, size, size, size, 3), device=device),
        "points": torch.empty((p, points, 3), dtype=torch.long, device=device),
    }


@contextmanager
def _torch_threads(n):
    """Torch's intra-op threads set to ``n`` inside the block (threads started in it inherit that)."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _split(batch_size, parts):
    """Example ranges (start, stop) of about equal size: ``parts`` of them at most, none empty."""
    parts = max(1, min(parts, batch_size))
    cuts = [round(i * batch_size / parts) for i in range(parts + 1)]
    return [(cuts[i], cuts[i + 1]) for i in range(parts) if cuts[i + 1] > cuts[i]]


def draw_batch(bank: VolumeBank, batch_size, size, aug: AugmentConfig, generator, n_patches=2, workers=1):
    """``batch_size`` examples of ``n_patches`` patches each, every example from one random scan of ``bank``.

    ``generator``: a ``torch.Generator`` on ``bank.device``. ``workers``: on
    the CPU, threads that render a share of the examples each, every one with
    a single torch thread (the CPU path: all cores busy with whole patches,
    not with hand-offs inside each small operation, which cost several times
    the work on a busy machine); on CUDA it is ignored. The batch does not
    depend on ``workers``. Returns tensors on the bank's device, with
    B = ``batch_size``, n = ``n_patches``, S = ``size``, K = ``aug.points``:

    - ``ori``, ``aug``: (B, n, 1, S, S, S) float32, the original patches and their augmented copies;
    - ``coords``: (B, n, 3, S, S, S) float32, the scan coordinate (z y x, voxels) of every voxel of ``aug``;
    - ``points``: (B, n, K, 3) long, voxels of ``ori`` for the matching loss;
    - ``point_coords``: (B, n, K, 3) float32, their scan coordinates;
    - ``centre``: (B, n, 3) float32, the scan coordinate of voxel ``S // 2`` of ``ori``;
    - ``scan``: (B,) long, each example's scan in ``bank``.
    """
    b, n = batch_size, n_patches
    pl = plan(bank, b, size, aug, generator, n)
    out = allocate(b * n, size, aug.points, bank.device)
    if bank.device.type == "cpu":
        parts = _split(b, workers)
        with _torch_threads(1):
            if len(parts) == 1:
                render(bank, pl, aug, 0, b * n, out)
            else:
                with ThreadPoolExecutor(len(parts)) as pool:
                    # list(): a worker's exception is raised here.
                    list(pool.map(lambda ez: render(bank, pl, aug, ez[0] * n, ez[1] * n, out), parts))
    else:
        render(bank, pl, aug, 0, b * n, out)

    def per_example(t):
        return t.reshape((b, n) + tuple(t.shape[1:]))

    points = out["points"]
    return {
        "ori": per_example(out["ori"][:, None]),
        "aug": per_example(out["copy"][:, None]),
        "coords": per_example(channels_first(out["coords"])),
        "points": per_example(points),
        "point_coords": per_example((points - size // 2 + pl.oc[:, None, :]).float()),
        "centre": per_example(pl.oc.float()),
        "scan": pl.scan,
    }
