"""The review and statistics tables of a run, and reading a flagged region back from its row.

The flagged regions (connected components of each organ's high-uncertainty
voxels) and the per-organ statistics are computed by ``URSAMLib.review``. Each
row of "UR-SAM review" records a seed voxel and the region's voxel box, so
Accept and Reject find the region again from the scene alone (after a scene
reload too): it is the connected part of the organ's flagged segment, inside
the box, that holds the seed (``URSAMLib.review.component_mask``).
"""
from __future__ import annotations

import numpy as np
import vtk

from URSAMLib.errors import URSAMError
from URSAMLib.review import Component, component_mask, flagged_components, organ_statistics  # noqa: F401

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
    ("Status", "str", "", "pending, accepted (added to the rectified segment), rejected (removed from it) or "
                          "corrected (a SAM box corrected the organ on slices it lies on)"),
    ("Label", "int", "", "organ label value"),
    ("Seed IJK", "str", "", "one voxel of the region (i,j,k)"),
    ("Box IJK", "str", "", "voxel box of the region: i0,i1,j0,j1,k0,k1 (inclusive)"),
]
STATISTICS_COLUMNS = [
    ("Organ", "str", "", "organ"),
    ("Review", "str", "", "check: its predicted Dice is below the organ's threshold; ok: it is not"),
    ("Predicted Dice", "double", "", "the quality estimate's Dice of the organ (fitted on the template library)"),
    ("Dice interval", "str", "", "the 80 % interval of the predicted Dice"),
    ("Label", "int", "", "label value"),
    ("Volume", "double", "ml", "rectified segment volume"),
    ("Ensemble volume", "double", "ml", "ensemble mask volume"),
    ("Mean uncertainty", "double", "", "mean entropy over the organ's box"),
    ("Flagged volume", "double", "ml", "high-uncertainty (flagged) volume"),
    ("Flagged fraction", "double", "", "flagged / (flagged or rectified) voxels"),
    ("Flagged regions", "int", "", "connected flagged regions listed in the review table"),
    ("Threshold T", "double", "", "class-specific uncertainty threshold (eq. 4)"),
    ("Prompts", "str", "", "prompt mode of the SAM run: box3d (the paper's), slice or propagate"),
    ("Slices to check", "str", "", "the organ's slices (k of the input), most expected wrong voxels first"),
]
#: columns the panel hides (bookkeeping)
HIDDEN_REVIEW_COLUMNS = ("Label", "Seed IJK", "Box IJK")
#: statistics columns the panel hides (the ranked slices are for "Next slice to check")
HIDDEN_STATISTICS_COLUMNS = ("Label", "Slices to check")
#: statistics table column <- URSAMLib.review.organ_statistics key
STATISTICS_KEYS = {"Organ": "organ", "Review": "review", "Predicted Dice": "predicted_dice",
                   "Dice interval": "dice_interval", "Slices to check": "slices_to_check", "Label": "label", "Volume": "rectified_ml", "Ensemble volume": "ensemble_ml",
                   "Mean uncertainty": "mean_uncertainty_in_box", "Flagged volume": "flagged_ml",
                   "Flagged fraction": "flagged_fraction", "Flagged regions": "flagged_regions",
                   "Threshold T": "threshold_T", "Prompts": "prompts"}


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
                # the view adds " [unit]" to the title itself (qMRMLTableModel): the title is the name alone
                tableNode.SetColumnTitle(name, name)
        # Since Slicer 5.6.1 the header is the column's title (and its unit); 5.6.0 knew only names as headers
        # (SetUseColumnNameAsColumnHeader, deprecated since, and then the unit is not shown).
        if hasattr(tableNode, "SetUseColumnTitleAsColumnHeader"):
            tableNode.SetUseColumnTitleAsColumnHeader(True)
        else:
            tableNode.SetUseColumnNameAsColumnHeader(True)
        tableNode.SetLocked(True)  # edited through Accept/Reject, not by typing
        table.Modified()
    finally:
        tableNode.EndModify(wasModified)


def componentRow(c, ijkToRasWorld, status=PENDING):
    r, a, s, _ = ijkToRasWorld @ np.append(np.asarray(c.centre_ijk, float), 1.0)
    return {"ID": c.id, "Organ": c.organ, "Volume": round(c.ml, 4),
            "Mean uncertainty": round(c.mean_uncertainty, 4), "Max uncertainty": round(c.max_uncertainty, 4),
            "R": round(float(r), 2), "A": round(float(a), 2), "S": round(float(s), 2),
            "Status": status, "Label": c.label, "Seed IJK": ",".join(str(v) for v in c.seed_ijk),
            "Box IJK": ",".join(str(v) for v in c.box_ijk)}


def fillReviewTable(tableNode, components, ijkToRasWorld):
    fillTable(tableNode, REVIEW_COLUMNS, [componentRow(c, ijkToRasWorld) for c in components])


def fillStatisticsTable(tableNode, rows):
    """``rows``: URSAMLib.review.organ_statistics."""
    fillTable(tableNode, STATISTICS_COLUMNS, [{col: row[key] for col, key in STATISTICS_KEYS.items()} for row in rows])


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
                     (), ints(value("Seed IJK")), ints(value("Box IJK")))


def slicesToCheck(tableNode, organ):
    """The organ's slices (k of the input volume), most expected wrong voxels first, from the statistics
    table; [] where the table ranks none (a table of an older run)."""
    table = tableNode.GetTable()
    organs, ranked = table.GetColumnByName("Organ"), table.GetColumnByName("Slices to check")
    if organs is None or ranked is None:
        return []
    for row in range(table.GetNumberOfRows()):
        if organs.GetValue(row) == organ:
            text = str(ranked.GetValue(row))
            return [int(v) for v in text.split(",") if v.strip()]
    raise URSAMError(f"'{tableNode.GetName()}' has no row of {organ}")


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
