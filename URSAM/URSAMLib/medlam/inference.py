"""MedLAM inference (METHOD.md §1): organ boxes in a query CT from labelled support scans.

1. Supports: each organ's 6 extreme points in each support scan; the latent
   positions of the 64^3 patches centred on them are averaged over the
   supports, and so are the (normalized) decoder features around each point,
   which become the kernels of the local match.
2. Query: the latent positions of ``query_crops`` random patches are
   averaged; each point lies at the mean crop centre plus
   ``r * tanh(p_support - p_query)`` (network.py's sign convention).
3. Refinement: a patch around each point is matched against the support
   kernels at the three feature scales (mean cosine similarity, summed over
   scales), and the point moves to the best match.
4. The box spans the extremes of the 6 points (min z from the min-z point,
   and so on), mapped back to the query's voxels, plus the METHOD.md §1 margin.
"""
from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..boxes import OrganBox
from ..errors import URSAMError
from ..imageio import check_volume, read_image
from ..localization import DEFAULT_MARGIN, Localization
from ..orientation import Orientation
from ..progress import STAGE_LOCALIZE, Progress
from ..templates import Library
from .checkpoint import load_network, pick_device
from .network import FEATURE_SCALES
from .preprocessing import crop, extreme_points, prepare


@dataclass
class MedLAMOptions:
    #: random query patches whose latent positions are averaged (MedLSAM: 10)
    query_crops: int = 10
    #: local feature-match refinement on (MedLSAM's multi-scale search)
    refine: bool = True
    #: half-size of the support feature kernels at full resolution, voxels (MedLSAM: 8^3 patch)
    kernel_radius: int = 4
    #: the refinement searches this many voxels (3 mm) around the coarse point along each axis;
    #: MedLSAM searches its whole 64^3 patch (32), which costs 8 times more on a CPU
    refine_radius: int = 16
    #: query crops are centred on body voxels (mapped intensity above this)
    body: float = 0.1
    seed: int = 0

    def to_json(self):
        return asdict(self)


@dataclass
class SupportAtlas:
    """What the supports contribute, per organ label: averaged latents and feature kernels."""
    latent: dict = field(default_factory=dict)       # label -> (6, 3) tensor
    kernels: dict = field(default_factory=dict)      # label -> [per scale (6, C, k, k, k)]
    counts: dict = field(default_factory=dict)       # label -> supports that label it
    supports: list = field(default_factory=list)
    seconds: float = 0.0
    cpu_seconds: float = 0.0


def _patches(volume_u8, centres_zyx, size, device):
    arr = np.stack([crop(volume_u8, c, size) for c in centres_zyx]).astype(np.float32) / 255.0
    return torch.from_numpy(arr[:, None]).to(device)


def _kernel(feature, scale, radius):
    """The normalized features around the patch centre at one scale: (B, C, k, k, k)."""
    n = feature.shape[-1]
    c = (n * scale // 2) // scale
    r = max(1, radius // scale)
    lo, hi = max(c - r, 0), min(c + r + 1, n)
    return F.normalize(feature[:, :, lo:hi, lo:hi, lo:hi], dim=1)


@torch.no_grad()
def build_supports(net, templates, organs, options=None, progress=None, device="cpu"):
    """Latents and kernels of each organ from the support templates (templates.Template)."""
    options = options or MedLAMOptions()
    progress = progress or Progress()
    cfg = net.config
    size = cfg.patch_size
    atlas = SupportAtlas()
    t0, cpu0 = time.perf_counter(), time.process_time()
    progress.stage(f"MedLAM: reading {len(templates)} support scans", total=len(templates))
    for i, template in enumerate(templates):
        image = template.read_image()
        label_image, _ = template.read_labels(reference=image)
        prepared = prepare(image, cfg.spacing_mm, size // 2, cfg.hu_points, cfg.hu_values, template.image_path)
        labels = prepared.resample_labels(label_image)
        found = []
        for value in organs:
            mask = labels == value
            if not mask.any():
                continue
            pts = extreme_points(mask)
            out = net(_patches(prepared.volume, pts, size, device))
            latent = out["position"].float()
            kernels = [_kernel(f.float(), s, options.kernel_radius) for f, s in zip(out["features"], FEATURE_SCALES)]
            if value in atlas.latent:
                atlas.latent[value] += latent
                atlas.kernels[value] = [a + k for a, k in zip(atlas.kernels[value], kernels)]
                atlas.counts[value] += 1
            else:
                atlas.latent[value] = latent
                atlas.kernels[value] = kernels
                atlas.counts[value] = 1
            found.append(int(value))
        atlas.supports.append({"case": template.case_id, "organs": found})
        progress.step(i + 1, len(templates))
    for value in atlas.latent:
        atlas.latent[value] /= atlas.counts[value]
        atlas.kernels[value] = [k / atlas.counts[value] for k in atlas.kernels[value]]
    atlas.seconds = time.perf_counter() - t0
    atlas.cpu_seconds = time.process_time() - cpu0
    progress.done()
    return atlas


@torch.no_grad()
def query_position(net, prepared, options, device):
    """Mean latent position and mean centre (padded-grid voxels) of random body patches."""
    rng = np.random.default_rng(options.seed)
    inner = np.array(prepared.inner_shape)
    pad = prepared.pad
    body = np.argwhere(prepared.volume[pad:pad + inner[0], pad:pad + inner[1], pad:pad + inner[2]]
                       > options.body * 255)
    if len(body) == 0:
        raise URSAMError("the CT shows no body (no voxel above about -600 HU)")
    centres = body[rng.choice(len(body), size=options.query_crops, replace=len(body) < options.query_crops)] + pad
    out = net(_patches(prepared.volume, centres, net.config.patch_size, device), features=False)
    return out["position"].float().mean(0), centres.astype(np.float64).mean(0)


def _local_similarity(feature, kernel, reach):
    """Mean cosine similarity of a kernel at every cell within ``reach`` cells of the patch centre cell.

    ``feature``: (C, n, n, n) normalized; ``kernel``: (C, k, k, k). Returns (2 reach + 1)^3.
    """
    n = feature.shape[-1]
    ks = kernel.shape[-1]
    half = ks // 2
    scale_centre = n // 2
    lo = scale_centre - reach - half
    region = torch.zeros((feature.shape[0],) + (2 * reach + ks,) * 3, dtype=feature.dtype, device=feature.device)
    a, b = max(lo, 0), min(lo + region.shape[-1], n)
    region[:, a - lo:b - lo, a - lo:b - lo, a - lo:b - lo] = feature[:, a:b, a:b, a:b]
    return F.conv3d(region[None], kernel[None])[0, 0] / ks ** 3


@torch.no_grad()
def refine_points(net, prepared, points_zyx, kernels, device, radius=16):
    """Move each point to the best local match of its support kernels; returns (points, similarity).

    The match searches offsets of up to ``radius`` voxels along each axis. At
    each feature scale the kernel was centred on the cell holding the patch
    centre voxel; a match ``e`` cells away means ``e * scale`` voxels, so the
    coarse maps are read at ``offset / scale`` (trilinear) and the scales' mean
    similarities are summed.
    """
    size = net.config.patch_size
    centres = np.rint(points_zyx).astype(np.int64)
    feats = net(_patches(prepared.volume, centres, size, device), position=False)["features"]
    side = 2 * radius + 1
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float32, device=device)
    total = torch.zeros((len(centres), side, side, side), device=device)
    for f, k, scale in zip(feats, kernels, FEATURE_SCALES):
        f = F.normalize(f.float(), dim=1)
        reach = max(1, -(-radius // scale))
        for i in range(len(centres)):
            sim = _local_similarity(f[i], k[i], reach)
            if scale == 1 and reach == radius:
                total[i] += sim
                continue
            # Sample the coarse map at offset / scale cells; grid_sample wants (x, y, z) in [-1, 1].
            g = offsets / scale / reach
            gz, gy, gx = torch.meshgrid(g, g, g, indexing="ij")
            grid = torch.stack((gx, gy, gz), -1)[None]
            total[i] += F.grid_sample(sim[None, None], grid, mode="bilinear", padding_mode="border",
                                      align_corners=True)[0, 0]
    flat = total.reshape(len(centres), -1)
    best, idx = flat.max(1)
    arg = np.stack(np.unravel_index(idx.cpu().numpy(), (side,) * 3), 1)
    return centres + arg - radius, (best / len(kernels)).cpu().numpy()


def box_from_points(prepared, points_zyx):
    """Source-index box (lo, hi as x, y, z ints) spanning the extremes of the 6 points."""
    lo = np.array([points_zyx[a][a] for a in range(3)], np.float64)
    hi = np.array([points_zyx[3 + a][a] for a in range(3)], np.float64)
    lo, hi = np.minimum(lo, hi), np.maximum(lo, hi)
    corners = np.array([[(hi if b else lo)[a] for a, b in enumerate(bits)] for bits in np.ndindex(2, 2, 2)])
    idx = prepared.zyx_to_source_index(corners)
    return np.floor(idx.min(0) + 0.5).astype(int), np.floor(idx.max(0) + 0.5).astype(int)


# -- the localizer entry point (localize.LOCALIZERS["medlam"]) -------------------------------------

_CACHE = OrderedDict()
_CACHE_SIZE = 2


def _cached(checkpoint, library, templates, organs, options, device, progress):
    """(net, atlas, state), reused while the checkpoint file, library and organs stay the same."""
    path = Path(checkpoint)
    stat = path.stat() if path.exists() else None
    key = (str(path.absolute()), stat.st_mtime_ns if stat else None, stat.st_size if stat else None,
           str(Path(library.path).absolute()), tuple(t.case_id for t in templates), tuple(sorted(organs)),
           options.kernel_radius, device)
    if key in _CACHE:
        _CACHE.move_to_end(key)
        return _CACHE[key] + (True,)
    net, state = load_network(path, device)
    if device == "cpu":
        # mkldnn's 3D convolutions run about twice as fast in channels-last layout.
        net.to(memory_format=torch.channels_last_3d)
    atlas = build_supports(net, templates, organs, options, progress, device)
    _CACHE[key] = (net, atlas, state)
    while len(_CACHE) > _CACHE_SIZE:
        _CACHE.popitem(last=False)
    return net, atlas, state, False


def localize_medlam(image, library, organs=None, progress=None, checkpoint=None, device="auto",
                    margin=DEFAULT_MARGIN, missing="error", **options):
    """MedLAM localizer with :func:`URSAMLib.localizers.localize`'s signature; returns a
    :class:`URSAMLib.localization.Localization` without support registrations (MedLAM registers nothing;
    ``ursam evaluate``'s atlas baseline runs its own registrations).

    Options: ``checkpoint`` (required: a file from ``ursam train-localizer``),
    ``device`` (auto, cpu, cuda), ``margin=(z_slices, grid_px)``, ``missing``
    ("error" or "skip", as the registration localizer), and the fields of
    :class:`MedLAMOptions`.
    """

    progress = progress or Progress()
    if checkpoint is None:
        raise URSAMError("the MedLAM localizer needs a checkpoint (--localizer-checkpoint PATH; "
                         "train one with `ursam train-localizer`)")
    try:
        opts = MedLAMOptions(**options)
    except TypeError as err:
        raise URSAMError(f"unknown MedLAM localizer option: {err}") from None
    if opts.query_crops < 1:
        raise URSAMError(f"query_crops must be at least 1, got {opts.query_crops}")
    if not isinstance(library, Library):
        library = Library(library)
    device = pick_device(device)
    wanted = library.resolve_organs(organs)
    templates = library.templates()
    net, atlas, state, reused = _cached(checkpoint, library, templates, list(wanted), opts, device, progress)

    t0, cpu0 = time.perf_counter(), time.process_time()
    if isinstance(image, (str, Path)):
        source = read_image(image, "image")
        check_volume(source, image)
        where = image
    else:
        source = image
        check_volume(source, "<in-memory image>")
        where = None
    cfg = net.config
    progress.stage(f"{STAGE_LOCALIZE} (MedLAM)", total=len(wanted))
    prepared = prepare(source, cfg.spacing_mm, cfg.patch_size // 2, cfg.hu_points, cfg.hu_values, where)
    try:
        p_query, centre = query_position(net, prepared, opts, device)
    except URSAMError as err:
        raise URSAMError(str(err), where) from None
    spacing = cfg.spacing_mm
    size = np.array(source.GetSize())
    orientation = Orientation.of(source)  # the margin is on the slices SAM sees
    lo_valid = np.full(3, prepared.pad, np.float64)
    hi_valid = lo_valid + np.array(prepared.inner_shape) - 1
    boxes, raw, skipped, points_info = [], [], {}, {}
    absent = [name for v, name in wanted.items() if v not in atlas.latent]
    if organs is not None and absent and missing == "error":
        raise URSAMError(f"no support scan of the library labels {', '.join(absent)}", library.meta_path)
    for i, (value, name) in enumerate(wanted.items()):
        progress.step(i + 1, len(wanted))
        if value not in atlas.latent:
            skipped[name] = "no support scan labels it"
            continue
        offset = net.offset_mm(atlas.latent[value], p_query[None]).cpu().numpy().astype(np.float64)
        coarse = np.clip(centre + offset / spacing, lo_valid, hi_valid)
        points = coarse
        similarity = None
        if opts.refine:
            points, similarity = refine_points(net, prepared, coarse, atlas.kernels[value], device,
                                                 opts.refine_radius)
            points = np.clip(points, lo_valid, hi_valid)
        lo, hi = box_from_points(prepared, points)
        if np.any(hi < 0) or np.any(lo > size - 1):
            skipped[name] = "its box lies outside the image"
            continue
        notes = [f"MedLAM, {atlas.counts[value]} support scan(s)"]
        clo, chi = np.maximum(lo, 0), np.minimum(hi, size - 1)
        if np.any(clo != lo) or np.any(chi != hi):
            notes.append("box reaches past the image and was clipped")
        box = OrganBox(int(value), name, clo.tolist(), chi.tolist(), notes)
        raw.append(box)
        boxes.append(orientation.add_margin(box, int(margin[0]), float(margin[1])))
        points_info[name] = {
            "coarse_ijk": np.round(prepared.zyx_to_source_index(coarse), 1).tolist(),
            "refined_ijk": np.round(prepared.zyx_to_source_index(points), 1).tolist(),
        }
        if similarity is not None:
            points_info[name]["similarity"] = np.round(similarity, 3).tolist()
    progress.done()
    for name, reason in skipped.items():
        progress.warn(f"{name} was not localized: {reason}; it is skipped")
    seconds = time.perf_counter() - t0
    info = {"method": "medlam", "library": str(Path(library.path).absolute()),
            "checkpoint": str(Path(checkpoint).absolute()), "checkpoint_step": int(state.get("step", 0)),
            "network": state.get("config"), "device": device,
            "supports": [s["case"] for s in atlas.supports], "margin_z_xy": [int(margin[0]), float(margin[1])],
            "options": opts.to_json(), "seconds": round(seconds, 2),
            # CPU time, which other processes on the machine do not inflate (support features excluded)
            "cpu_seconds": round(time.process_time() - cpu0, 2),
            "support_seconds": round(atlas.seconds, 2), "support_cpu_seconds": round(atlas.cpu_seconds, 2), "support_features_reused": reused,
            "raw_boxes": [b.to_json() for b in raw], "points": points_info, "skipped": skipped}
    return Localization(boxes, info, image, library)
