"""MedLAM's training losses (METHOD.md §1).

- Offset loss: MSE between ``r * tanh(p_i - p_j)`` and the true ``centre_i - centre_j``
  (mm, z y x) over the pairs of patches of one scan, measured in units of
  ``offset_unit_mm`` so that it and the matching loss have comparable sizes.
- Multi-scale feature-matching loss: for points of an original patch, the
  softmax over the augmented copy of ``temperature * cosine(feature of the
  point, feature of each voxel)`` should put its mass on the voxels that show
  the same anatomy (scan coordinate within ``radius``, scaled with the
  feature map's voxel size) and little on the voxels far from it (twice the
  radius or more), as in MedLSAM's training code.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .network import FEATURE_SCALES


def pair_offsets(net, positions, centres, spacing_mm):
    """Predicted and true offsets for every pair i < j of patches of one scan.

    ``positions``: (B, n, 3) latent positions; ``centres``: (B, n, 3) voxel centres.
    Returns (pred, target), each (B * n(n-1)/2, 3), in mm.
    """
    n = positions.shape[1]
    i, j = torch.triu_indices(n, n, 1, device=positions.device)
    pred = net.offset_mm(positions[:, i], positions[:, j])
    target = (centres[:, i] - centres[:, j]) * spacing_mm
    return pred.reshape(-1, 3), target.reshape(-1, 3)


def matching_loss(feat_ori, feat_aug, points, point_coords, coords, spacing_mm, radius_mm=3.0,
                  temperature=15.0):
    """Mean over scales of the positive and negative cross-entropy terms.

    ``feat_ori``, ``feat_aug``: lists of (B, C, n, n, n) maps at FEATURE_SCALES;
    ``points``: (B, K, 3) voxel indices in the original patch; ``point_coords``:
    (B, K, 3) their scan coordinates; ``coords``: (B, 3, S, S, S) scan coordinate of
    each voxel of the augmented copy.
    """
    total = 0.0
    b, k, _ = points.shape
    for fo, fa, scale in zip(feat_ori, feat_aug, FEATURE_SCALES):
        c = fo.shape[1]
        fa = F.normalize(fa.flatten(2), dim=1)                          # B, C, N
        idx = torch.div(points, scale, rounding_mode="floor").clamp(max=fo.shape[-1] - 1)
        flat = (idx[..., 0] * fo.shape[-2] + idx[..., 1]) * fo.shape[-1] + idx[..., 2]  # B, K
        q = torch.gather(fo.flatten(2), 2, flat[:, None, :].expand(b, c, k))        # B, C, K
        q = F.normalize(q, dim=1)
        logits = temperature * torch.einsum("bck,bcn->bkn", q, fa)
        logp = torch.log_softmax(logits, dim=-1)
        # Where each coarse voxel of the copy comes from: the mean of its fine voxels.
        cc = F.avg_pool3d(coords, scale) if scale > 1 else coords
        cc = cc.flatten(2)                                                # B, 3, N
        dist = torch.cdist(point_coords, cc.transpose(1, 2)) * spacing_mm   # B, K, N
        pos = dist <= radius_mm * scale
        near = dist < 2 * radius_mm * scale          # neither negative nor ignored: few voxels
        term = 0.0
        n_pos = pos.sum()
        if n_pos > 0:
            term = term - logp[pos].sum() / n_pos
        # -log(1 - p) over the negatives = over all voxels minus the few near ones.
        log1m = torch.log1p(-logp.exp().clamp(max=1 - 1e-6))
        n_neg = near.numel() - near.sum()
        if n_neg > 0:
            term = term - (log1m.sum() - log1m[near].sum()) / n_neg
        total = total + term
    return total / len(FEATURE_SCALES)


def medlam_loss(net, batch, spacing_mm, unit_mm=10.0, radius_mm=3.0, temperature=15.0,
                offset_weight=1.0, match_weight=1.0):
    """(total, {"offset", "match", "offset_mm_error"}) for a batch from ``sampling.draw_batch`` as tensors."""
    b, n = batch["ori"].shape[:2]

    def flat(t):
        return t.reshape((b * n,) + tuple(t.shape[2:]))

    fmt = torch.channels_last_3d if batch["ori"].device.type == "cpu" else torch.contiguous_format
    ori = net(flat(batch["ori"]).contiguous(memory_format=fmt))
    aug = net(flat(batch["aug"]).contiguous(memory_format=fmt), position=False)
    pred, target = pair_offsets(net, ori["position"].reshape(b, n, 3), batch["centre"], spacing_mm)
    off = F.mse_loss(pred / unit_mm, target / unit_mm)
    match = matching_loss(ori["features"], aug["features"], flat(batch["points"]), flat(batch["point_coords"]),
                          flat(batch["coords"]), spacing_mm, radius_mm, temperature)
    total = offset_weight * off + match_weight * match
    with torch.no_grad():
        err = (pred - target).norm(dim=1).mean()
    return total, {"offset": float(off.detach()), "match": float(match.detach()), "offset_mm_error": float(err)}
