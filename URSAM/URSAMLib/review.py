"""Flagged regions for review: connected components of each organ's high-uncertainty voxels.

A flagged region is a connected component (26-connectivity, so one blob is one
region) of one organ's M_unc (METHOD.md §4). The CLI lists them in report.json;
the Slicer module shows them as the rows of its review table.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from scipy import ndimage

STRUCTURE = ndimage.generate_binary_structure(3, 3)


@dataclass
class Component:
    id: int
    label: int
    organ: str
    voxels: int
    ml: float
    mean_uncertainty: float
    max_uncertainty: float
    centre_ijk: tuple  # (i, j, k), float
    seed_ijk: tuple  # (i, j, k): one voxel of the region
    box_ijk: tuple  # (i0, i1, j0, j1, k0, k1), inclusive
    #: the voxels of the region expected to be wrong (its voxels times their mean error probability),
    #: where the result has calibrated probabilities; None otherwise
    expected_errors: float = None
    #: what fixing the region is expected to add to its organ's Dice: its expected wrong voxels over the
    #: organ's segmented voxels (Dice's first-order change where the result and the truth are about as large)
    expected_dice_gain: float = None

    @property
    def region(self):
        """(z, y, x) slices of the component's box."""
        i0, i1, j0, j1, k0, k1 = self.box_ijk
        return slice(k0, k1 + 1), slice(j0, j1 + 1), slice(i0, i1 + 1)

    def to_json(self):
        d = asdict(self)
        d["centre_ijk"] = [round(v, 2) for v in self.centre_ijk]
        d["ml"] = round(self.ml, 4)
        d["mean_uncertainty"] = round(self.mean_uncertainty, 4)
        d["max_uncertainty"] = round(self.max_uncertainty, 4)
        if self.expected_errors is not None:
            d["expected_errors"] = round(self.expected_errors, 2)
        if self.expected_dice_gain is not None:
            d["expected_dice_gain"] = round(self.expected_dice_gain, 5)
        return d


def flagged_components(unc_labels, uncertainty, organs, voxel_ml, min_voxels=1, error_probability=None,
                       segmented=None):
    """Components of each organ's flagged voxels; ``organs`` is ``[(label, name)]``.

    Ordered by organ, then largest first; with ``error_probability`` (each
    voxel's probability of being wrong, from a calibrated result) all regions
    by their expected errors instead, most first, so the review starts where
    the most is likely wrong, and with ``segmented`` (``{label: voxels of the
    organ's result}``) by the expected Dice gain of fixing each. Ids count
    from 1, stable for a given input.
    """
    found = ndimage.find_objects(np.asarray(unc_labels).astype(np.int32, copy=False))
    out = []
    for label, name in organs:
        if label < 1 or label > len(found) or found[label - 1] is None:
            continue
        box = found[label - 1]
        mask = unc_labels[box] == label
        u = uncertainty[box]
        components, n = ndimage.label(mask, STRUCTURE)
        index = np.arange(1, n + 1)
        counts = np.bincount(components.ravel(), minlength=n + 1)[1:]
        sums = ndimage.sum_labels(u, components, index)
        errors = ndimage.sum_labels(error_probability[box], components, index) if error_probability is not None \
            else [None] * n
        maxima = ndimage.maximum(u, components, index)
        centres = ndimage.center_of_mass(mask, components, index)
        rows = []
        for k, sl in enumerate(ndimage.find_objects(components)):
            if counts[k] < min_voxels:
                continue
            local = np.argwhere(components[sl] == k + 1)[0]
            seed = [int(local[a] + sl[a].start + box[a].start) for a in range(3)]  # z, y, x
            lo = [sl[a].start + box[a].start for a in range(3)]
            hi = [sl[a].stop - 1 + box[a].start for a in range(3)]
            centre = [float(centres[k][a] + box[a].start) for a in range(3)]
            rows.append(Component(0, int(label), name, int(counts[k]), float(counts[k] * voxel_ml),
                                  float(sums[k] / counts[k]), float(maxima[k]), tuple(centre[::-1]),
                                  tuple(seed[::-1]), (lo[2], hi[2], lo[1], hi[1], lo[0], hi[0]),
                                  None if errors[k] is None else float(errors[k])))
        rows.sort(key=lambda c: -c.voxels)
        out.extend(rows)
    if error_probability is not None:
        if segmented is not None:
            for c in out:
                c.expected_dice_gain = c.expected_errors / max(1, int(segmented.get(c.label, 0)))
            out.sort(key=lambda c: (-c.expected_dice_gain, -c.expected_errors))
        else:
            out.sort(key=lambda c: -c.expected_errors)
    for i, c in enumerate(out, start=1):
        c.id = i
    return out


def component_mask(flagged_mask_in_box, component):
    """The component inside its box: the connected part of the organ's flagged mask holding the seed."""
    components, _ = ndimage.label(flagged_mask_in_box, STRUCTURE)
    i0, _, j0, _, k0, _ = component.box_ijk
    si, sj, sk = component.seed_ijk
    value = components[sk - k0, sj - j0, si - i0]
    return None if value == 0 else components == value


def organ_statistics(result, rectified, ensemble, unc_labels, components):
    """Per organ of the main prompt set: volumes, mean uncertainty in its box, flagged fraction, and its quality
    estimate (predicted Dice, interval, review decision, ranked slices)."""
    voxel_ml = result.voxel_ml
    regions = {}
    for c in components:
        regions[c.label] = regions.get(c.label, 0) + 1
    rows = []
    for o in result.main_organs():
        rect = rectified == o.label
        flagged = unc_labels == o.label
        n_rect, n_flag = int(np.count_nonzero(rect)), int(np.count_nonzero(flagged))
        union = int(np.count_nonzero(rect | flagged))
        u_own = o.uncertainty()[0]
        u_box = u_own[o.box_in_region] if u_own is not None else None
        rows.append({
            "organ": o.name, "label": int(o.label),
            "rectified_ml": n_rect * voxel_ml, "ensemble_ml": int(np.count_nonzero(ensemble == o.label)) * voxel_ml,
            "mean_uncertainty_in_box": float(u_box.mean()) if u_box is not None and u_box.size else 0.0,
            "flagged_ml": n_flag * voxel_ml, "flagged_fraction": n_flag / union if union else 0.0,
            "flagged_regions": regions.get(o.label, 0),
            "threshold_T": float(o.info.get("T", float("nan"))),
        })
        q = result.quality.get(o.name)
        rows[-1].update({
            "predicted_dice": float(q.predicted_dice) if q is not None else float("nan"),
            "dice_interval": f"{q.interval[0]:.2f}-{q.interval[1]:.2f}" if q is not None else "",
            "review": q.review if q is not None else "",
            # the organ's slices along the input's third axis, most expected wrong voxels first
            "slices_to_check": ",".join(str(z) for z, _ in q.slices) if q is not None else "",
        })
    return rows
