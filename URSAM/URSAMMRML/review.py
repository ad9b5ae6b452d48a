"""Reviewing flagged regions: connected components, the review and statistics tables.

A flagged region is a connected component (26-connectivity) of one organ's
high-uncertainty voxels (M_unc of METHOD.md §4, as shown in "UR-SAM flagged").
Each row of "UR-SAM review" is one component; it records a seed voxel and the
component's voxel box, so Accept and Reject can find it again from the scene
alone (after a scene reload too): the component is the connected part of the
organ's flagged segment, inside the box, that contains the seed.

The component bookkeeping is plain numpy; it would belong in URSAMLib (see
/work/notes/requests_slicer.md) and moves there once the engine offers it.
"""
from dataclasses import dataclass

import numpy as np
import vtk
from scipy import ndimage

#: 26-connectivity: diagonal neighbours join, so one blob is one row
STRUCTURE = ndimage.generate_binary_structure(3, 3)

PENDING, ACCEPTED, REJECTED = "pending", "accepted", "rejected"

REVIEW_COLUMNS = [  # (name, kind, unit, description)
    ("ID", "int", "", "component number"),
    ("Organ", "str", "", "organ whose high-uncertainty voxels form the region"),
    ("Volume", "double", "ml", "region volume"),
    ("Mean uncertainty", "double", "", "mean entropy of the ensemble over the region (0 to log 2)"),
    ("Max uncertainty", "double", "", "largest entropy in the region"),
    ("R", "double", "mm", "centre of the region, right"),
    ("A", "double", "mm", "centre of the region, anterior"),
    ("S", "double", "mm", "centre of the region, superior"),
    ("Status", "str", "", "pending, accepted (added to the rectified segment) or rejected (removed from it)"),
    ("Label", "int", "", "organ label value"),
    ("Seed IJK", "str", "", "one voxel of the region (i,j,k)"),
    ("Box IJK", "str", "", "voxel box of the region: i0,i1,j0,j1,k0,k1 (inclusive)"),
]
STATISTICS_COLUMNS = [
    ("Organ", "str", "", "organ"),
    ("Label", "int", "", "label value"),
    ("Volume", "double", "ml", "rectified segment volume"),
    ("Ensemble volume", "double", "ml", "ensemble mask volume"),
    ("Mean uncertainty", "double", "", "mean entropy over the organ's box"),
    ("Flagged volume", "double", "ml", "high-uncertainty (flagged) volume"),
    ("Flagged fraction", "double", "", "flagged / (flagged or rectified) voxels"),
    ("Flagged regions", "int", "", "connected flagged regions listed in the review table"),
    ("Threshold T", "double", "", "class-specific uncertainty threshold (eq. 4)"),
]
#: columns the panel hides (bookkeeping)
HIDDEN_REVIEW_COLUMNS = ("Label", "Seed IJK", "Box IJK")


@dataclass
class Component:
    id: int
    label: int
    organ: str
    voxels: int
    ml: float
    meanUncertainty: float
    maxUncertainty: float
    centreIjk: tuple  # (i, j, k), float
    seedIjk: tuple  # (i, j, k), int
    boxIjk: tuple  # (i0, i1, j0, j1, k0, k1), inclusive
    status: str = PENDING

    @property
    def region(self):
        """(z, y, x) slices of the component's box."""
        i0, i1, j0, j1, k0, k1 = self.boxIjk
        return slice(k0, k1 + 1), slice(j0, j1 + 1), slice(i0, i1 + 1)


def flaggedComponents(uncLabels, uncertainty, organs, voxelMl, minVoxels=1):
    """Connected components of each organ's flagged voxels; ``organs`` is ``[(label, name)]``.

    Rows are ordered by organ, then largest first; ids count from 1.
    """
    found = ndimage.find_objects(np.asarray(uncLabels).astype(np.int32, copy=False))
    out = []
    for label, name in organs:
        if label < 1 or label > len(found) or found[label - 1] is None:
            continue
        box = found[label - 1]
        mask = uncLabels[box] == label
        u = uncertainty[box]
        components, n = ndimage.label(mask, STRUCTURE)
        if n == 0:
            continue
        index = np.arange(1, n + 1)
        counts = np.bincount(components.ravel(), minlength=n + 1)[1:]
        sums = ndimage.sum_labels(u, components, index)
        maxima = ndimage.maximum(u, components, index)
        centres = ndimage.center_of_mass(mask, components, index)
        rows = []
        for k, sl in enumerate(ndimage.find_objects(components)):
            if counts[k] < minVoxels:
                continue
            local = np.argwhere(components[sl] == k + 1)[0]
            seed = [int(local[a] + sl[a].start + box[a].start) for a in range(3)]  # z, y, x
            lo = [sl[a].start + box[a].start for a in range(3)]
            hi = [sl[a].stop - 1 + box[a].start for a in range(3)]
            centre = [float(centres[k][a] + box[a].start) for a in range(3)]
            rows.append(Component(0, int(label), name, int(counts[k]), float(counts[k] * voxelMl),
                                  float(sums[k] / counts[k]), float(maxima[k]), tuple(centre[::-1]),
                                  tuple(seed[::-1]), (lo[2], hi[2], lo[1], hi[1], lo[0], hi[0])))
        rows.sort(key=lambda c: -c.voxels)
        out.extend(rows)
    for i, c in enumerate(out, start=1):
        c.id = i
    return out


def componentMask(flaggedMaskInBox, component):
    """The component inside its box: the connected part of the organ's flagged mask holding the seed."""
    components, _ = ndimage.label(flaggedMaskInBox, STRUCTURE)
    i0, _, j0, _, k0, _ = component.boxIjk
    si, sj, sk = component.seedIjk
    value = components[sk - k0, sj - j0, si - i0]
    if value == 0:
        return None
    return components == value


def organStatistics(result, rectified, ensemble, uncLabels, components):
    """One dict per organ of the main prompt set: volumes, mean uncertainty, flagged fraction."""
    voxelMl = result.voxel_ml
    regions = {}
    for c in components:
        regions[c.label] = regions.get(c.label, 0) + 1
    rows = []
    for o in result.main_organs():
        rect = rectified == o.label
        flagged = uncLabels == o.label
        nRect, nFlag = int(np.count_nonzero(rect)), int(np.count_nonzero(flagged))
        union = int(np.count_nonzero(rect | flagged))
        uBox = o.u[o.box_in_region] if o.u is not None else None
        rows.append({
            "Organ": o.name, "Label": int(o.label),
            "Volume": nRect * voxelMl, "Ensemble volume": int(np.count_nonzero(ensemble == o.label)) * voxelMl,
            "Mean uncertainty": float(uBox.mean()) if uBox is not None and uBox.size else 0.0,
            "Flagged volume": nFlag * voxelMl, "Flagged fraction": nFlag / union if union else 0.0,
            "Flagged regions": regions.get(o.label, 0),
            "Threshold T": float(o.info.get("T", float("nan"))),
        })
    return rows


def _newArray(kind):
    return {"int": vtk.vtkIntArray, "double": vtk.vtkDoubleArray, "str": vtk.vtkStringArray}[kind]()


def fillTable(tableNode, columns, rows):
    """Replace a table node's content; ``rows`` are dicts keyed by column name."""
    wasModified = tableNode.StartModify()
    try:
        tableNode.RemoveAllColumns()
        table = tableNode.GetTable()
        for name, kind, unit, description in columns:
            array = _newArray(kind)
            array.SetName(name)
            array.SetNumberOfValues(len(rows))
            for r, row in enumerate(rows):
                value = row[name]
                array.SetValue(r, str(value) if kind == "str" else value)
            table.AddColumn(array)
            if unit:
                tableNode.SetColumnUnitLabel(name, unit)
            tableNode.SetColumnDescription(name, description)
            if hasattr(tableNode, "SetColumnTitle"):
                tableNode.SetColumnTitle(name, f"{name} ({unit})" if unit else name)
        # Slicer 5.8 shows column titles; 5.6 needs column names switched on as headers.
        if hasattr(tableNode, "SetUseColumnTitleAsColumnHeader"):
            tableNode.SetUseColumnTitleAsColumnHeader(True)
        else:
            tableNode.SetUseColumnNameAsColumnHeader(True)
        tableNode.SetLocked(True)  # edited through Accept/Reject, not by typing
        table.Modified()
    finally:
        tableNode.EndModify(wasModified)


def componentRow(c, ijkToRasWorld):
    r, a, s, _ = ijkToRasWorld @ np.append(np.asarray(c.centreIjk, float), 1.0)
    return {"ID": c.id, "Organ": c.organ, "Volume": round(c.ml, 4),
            "Mean uncertainty": round(c.meanUncertainty, 4), "Max uncertainty": round(c.maxUncertainty, 4),
            "R": round(float(r), 2), "A": round(float(a), 2), "S": round(float(s), 2),
            "Status": c.status, "Label": c.label, "Seed IJK": ",".join(str(v) for v in c.seedIjk),
            "Box IJK": ",".join(str(v) for v in c.boxIjk)}


def fillReviewTable(tableNode, components, ijkToRasWorld):
    fillTable(tableNode, REVIEW_COLUMNS, [componentRow(c, ijkToRasWorld) for c in components])


def fillStatisticsTable(tableNode, rows):
    fillTable(tableNode, STATISTICS_COLUMNS, rows)


def componentFromTable(tableNode, row):
    """The component of one review-table row (0-based), read back from the table."""
    table = tableNode.GetTable()
    if row < 0 or row >= table.GetNumberOfRows():
        raise IndexError(f"row {row} is not in '{tableNode.GetName()}' ({table.GetNumberOfRows()} rows)")

    def value(name):
        column = table.GetColumnByName(name)
        if column is None:
            raise KeyError(f"'{tableNode.GetName()}' has no column '{name}'; is it a UR-SAM review table?")
        return column.GetValue(row)

    ints = lambda text: tuple(int(v) for v in str(text).split(","))  # noqa: E731
    return Component(int(value("ID")), int(value("Label")), str(value("Organ")), 0, float(value("Volume")),
                     float(value("Mean uncertainty")), float(value("Max uncertainty")),
                     (), ints(value("Seed IJK")), ints(value("Box IJK")), str(value("Status")))


def setStatus(tableNode, row, status):
    column = tableNode.GetTable().GetColumnByName("Status")
    wasLocked = tableNode.GetLocked()
    tableNode.SetLocked(False)
    column.SetValue(row, status)
    column.Modified()
    tableNode.GetTable().Modified()
    tableNode.SetLocked(wasLocked)
    tableNode.Modified()


def rowCentre(tableNode, row):
    table = tableNode.GetTable()
    return [float(table.GetColumnByName(k).GetValue(row)) for k in ("R", "A", "S")]
