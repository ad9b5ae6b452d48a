"""A synthetic abdominal CT cohort for the demo (no data needed).

Each "patient" is an elliptic body (skin, subcutaneous fat, muscle wall,
visceral fat) with a spine, and five labelled organs at CT-like Hounsfield
values of a contrast-enhanced portal-venous scan: liver, spleen, both
kidneys and the aorta. Between patients, body size, organ size, shape (a
smooth random deformation of each organ's ellipsoid) and position vary, and
every scan has its own noise, so the demo's registration and SAM face the
kind of variation a real cohort has. Everything is seeded: the same seed
gives the same cohort.

Grids are LPS with identity direction, as SimpleITK writes them: x runs to
the patient's left, y to posterior, z to superior.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from ..atomic import atomic_write_text

#: label values and names, in FLARE22 naming (so terminology and colours match real data)
ORGANS = {1: "liver", 2: "kidney_right", 3: "spleen", 4: "aorta", 5: "kidney_left"}
HU = {"air": -1000.0, "fat": -95.0, "muscle": 45.0, "bone": 700.0, "marrow": 220.0, "bowel": 20.0,
      "liver": 105.0, "spleen": 115.0, "kidney": 160.0, "aorta": 190.0}


@dataclass
class PhantomGrid:
    """Voxels (x, y, z) and spacing in mm; the default is a 3 mm, 5 mm-slice abdominal scan."""
    size: tuple = (128, 128, 36)
    spacing: tuple = (3.0, 3.0, 5.0)


def _smooth_noise(rng, shape, coarse=4, waves=6):
    """Smooth random field of unit variance: a sum of random plane waves of about ``coarse`` periods."""
    axes = [np.linspace(0.0, 2 * np.pi, n, dtype=np.float32) for n in shape]
    out = np.zeros(shape, np.complex64)
    for _ in range(waves):
        k = rng.normal(size=3) * coarse / 2.0
        phase = rng.uniform(0, 2 * np.pi)
        # cos(kx + ky + kz + phase) as the real part of a product of 1D phasors: no 3D cos to evaluate.
        e = [np.exp(1j * (k[i] * axes[i] + (phase if i == 0 else 0.0))).astype(np.complex64) for i in range(3)]
        out += e[0][:, None, None] * (e[1][:, None] * e[2][None, :])[None]
    return out.real * np.float32(np.sqrt(2.0 / waves))


def _blob(coords, centre, radii, rng, wobble=0.12, tilt=0.0):
    """An ellipsoid deformed by a smooth random field; coords are (Z, Y, X) mm arrays."""
    z, y, x = (c - c0 for c, c0 in zip(coords, centre[::-1]))
    if tilt:
        ca, sa = np.cos(tilt), np.sin(tilt)
        x, y = ca * x - sa * y, sa * x + ca * y
    r = np.sqrt((x / radii[0]) ** 2 + (y / radii[1]) ** 2 + (z / radii[2]) ** 2)
    return r < 1.0 + wobble * _smooth_noise(rng, r.shape)


def make_patient(seed, grid=PhantomGrid()):
    """One synthetic CT: ``(image, labels)`` as SimpleITK images (HU int16, labels uint8)."""
    rng = np.random.default_rng(seed)
    nx, ny, nz = grid.size
    sx, sy, sz = grid.spacing
    zz, yy, xx = np.meshgrid((np.arange(nz) - (nz - 1) / 2) * sz, (np.arange(ny) - (ny - 1) / 2) * sy,
                             (np.arange(nx) - (nx - 1) / 2) * sx, indexing="ij")
    coords = (zz, yy, xx)
    u = lambda lo, hi: float(rng.uniform(lo, hi))  # noqa: E731

    # Body: an ellipse slowly changing along z, 10-25 mm of fat under the skin, a muscle wall.
    a, b = u(150, 175), u(110, 128)
    taper = 1.0 + 0.04 * zz / max(1.0, nz * sz / 2)
    body_r = np.sqrt((xx / (a * taper)) ** 2 + ((yy - 5) / (b * taper)) ** 2)
    fat_t = u(10, 25)
    hu = np.full(zz.shape, HU["air"], np.float32)
    body = body_r < 1.0
    hu[body] = HU["fat"]
    inner_r = np.sqrt((xx / (a * taper - fat_t)) ** 2 + ((yy - 5) / (b * taper - fat_t)) ** 2)
    hu[inner_r < 1.0] = HU["muscle"]
    cavity_r = np.sqrt((xx / (a * taper - fat_t - 12)) ** 2 + ((yy - 5) / (b * taper - fat_t - 12)) ** 2)
    cavity = cavity_r < 1.0
    # Visceral fat with bowel loops: soft, textured, lower than the organs.
    bowel = _smooth_noise(rng, zz.shape, coarse=9) > 0.6
    hu[cavity] = HU["fat"] + 25 * _smooth_noise(rng, zz.shape, coarse=6)[cavity]
    hu[cavity & bowel] = HU["bowel"]

    labels = np.zeros(zz.shape, np.uint8)
    # Spine: vertebral body (marrow in a bone shell), posterior in the midline; not labelled.
    spine_c = (u(-4, 4), b * 0.45 + u(-4, 4))
    d_spine = np.sqrt((xx - spine_c[0]) ** 2 + (yy - spine_c[1]) ** 2)
    hu[d_spine < 19] = HU["bone"]
    hu[d_spine < 15] = HU["marrow"]
    # Aorta: a tube in front of the spine, a little to the left, drifting slowly along z.
    ao_r = u(10, 13)
    ao_x = spine_c[0] + u(8, 16) + 3 * np.sin(zz / 60.0 + u(0, 6))
    ao_y = spine_c[1] - 19 - ao_r - u(2, 6)
    aorta = np.sqrt((xx - ao_x) ** 2 + (yy - ao_y) ** 2) < ao_r
    s = u(0.85, 1.15)
    zc = u(-10, 10)  # the organs move together along z, patient to patient
    organs = {
        # name: (centre x, y, z in mm), radii (x, y, z), tilt
        "liver": ((-a * 0.42 + u(-8, 8), u(-25, -5), zc + 35 + u(-8, 8)),
                  (s * u(62, 75), s * u(50, 60), s * u(55, 70)), u(-0.3, 0.1)),
        "spleen": ((a * 0.55 + u(-8, 6), b * 0.25 + u(-8, 8), zc + 40 + u(-8, 8)),
                   (s * u(22, 28), s * u(35, 45), s * u(38, 48)), u(-0.6, -0.2)),
        "kidney_right": ((-52 + u(-8, 4), b * 0.42 + u(-6, 6), zc - 25 + u(-8, 8)),
                         (s * u(22, 27), s * u(18, 23), s * u(42, 52)), u(0.2, 0.5)),
        "kidney_left": ((52 + u(-4, 8), b * 0.42 + u(-6, 6), zc - 20 + u(-8, 8)),
                        (s * u(22, 27), s * u(18, 23), s * u(42, 52)), u(-0.5, -0.2)),
    }
    hu_of = {"liver": HU["liver"], "spleen": HU["spleen"], "kidney_right": HU["kidney"],
             "kidney_left": HU["kidney"]}
    value_of = {v: k for k, v in ORGANS.items()}
    free = cavity & (d_spine >= 21) & ~aorta
    for name, (centre, radii, tilt) in organs.items():
        m = _blob(coords, centre, radii, rng, tilt=tilt) & free
        # A thin fat gap keeps neighbouring organs apart, as fascia does.
        m &= ~ndimage.binary_dilation(labels > 0, iterations=1)
        labels[m] = value_of[name]
        hu[m] = hu_of[name] + 8 * _smooth_noise(rng, zz.shape, coarse=5)[m]
    # Kidney hilum: a fat-filled notch on the medial side, as in real kidneys.
    for name in ("kidney_right", "kidney_left"):
        kid = labels == value_of[name]
        if kid.any():
            cz, cy, cx = np.argwhere(kid).mean(0)
            medial = np.sign((nx - 1) / 2 - cx)
            notch = (np.abs(zz - (cz - (nz - 1) / 2) * sz) < 12) & (np.abs(yy - (cy - (ny - 1) / 2) * sy) < 6) & \
                (medial * (xx - (cx - (nx - 1) / 2) * sx) > 8)
            carve = kid & notch
            labels[carve] = 0
            hu[carve] = HU["fat"]
    labels[aorta & cavity] = value_of["aorta"]
    hu[aorta & cavity] = HU["aorta"]

    # Scanner noise and the partial-volume blur of a 3 mm reconstruction.
    hu = ndimage.gaussian_filter(hu, sigma=(0.4, 0.7, 0.7))
    hu += rng.normal(0, 14, size=hu.shape).astype(np.float32)
    hu = np.clip(hu, -1024, 3071)

    origin = (-(nx - 1) / 2 * sx, -(ny - 1) / 2 * sy, -(nz - 1) / 2 * sz + u(-20, 20))
    image = sitk.GetImageFromArray(np.round(hu).astype(np.int16))
    label_image = sitk.GetImageFromArray(labels)
    for im in (image, label_image):
        im.SetSpacing(grid.spacing)
        im.SetOrigin(origin)
    return image, label_image


def make_cohort(folder, n_templates=3, n_queries=1, seed=0, grid=PhantomGrid()):
    """Write a cohort in the dataset layout (``dataset.json``, ``cases/<id>/image.nii.gz``, ``labels``).

    The first ``n_templates`` patients are the ``support`` list, the rest the
    ``query`` list; the folder is both a template library and an evaluation
    dataset. Returns the folder.
    """

    folder = Path(folder)
    ids = [f"phantom_{i + 1:02d}" for i in range(n_templates + n_queries)]
    for i, case_id in enumerate(ids):
        image, labels = make_patient(seed * 1000 + i, grid)
        case = folder / "cases" / case_id
        case.mkdir(parents=True, exist_ok=True)
        sitk.WriteImage(image, str(case / "image.nii.gz"), True)
        sitk.WriteImage(labels, str(case / "labels.nii.gz"), True)
    meta = {"name": "ursam-phantom", "modality": "CT", "region": "abdomen (synthetic)",
            "labels": {str(k): v for k, v in ORGANS.items()},
            "support": ids[:n_templates], "query": ids[n_templates:],
            "note": "synthetic CT made by URSAMLib.phantom; not patient data"}
    atomic_write_text(folder / "dataset.json", json.dumps(meta, indent=1))
    return folder
