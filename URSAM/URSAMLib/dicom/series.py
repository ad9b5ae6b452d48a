"""The one reader of a DICOM CT series folder: which series, whether it is a CT the engine can use, its slices.

:func:`find_series` reads the headers of the folder's files (pydicom, no
pixels) and refuses, with one line naming the problem and the folder, what
would give a wrong volume or wrong contours later: several image series and
no ``--series`` to choose one, a series that is not CT, enhanced multi-frame
files, slices that do not share one orientation, size and pixel spacing, a
tilted gantry (slices shifted in their own plane), two slices at one position,
and gaps (the spacing between consecutive positions not uniform: a missing
slice). :func:`read_series` reads the voxels with SimpleITK (GDCM, which
handles the compressed transfer syntaxes) in the checked order and verifies
that the image's geometry is the one of the slice headers, so voxel ``[k, j,
i]`` of the array is pixel (row ``j``, column ``i``) of ``slices[k]``.

The DICOM geometry (PS3.3 C.7.6.2.1.1): pixel (row ``j``, column ``i``) of a
slice lies at ``ImagePositionPatient + i * PixelSpacing[1] * row direction + j
* PixelSpacing[0] * column direction``, the two directions being the two
halves of ``ImageOrientationPatient``. Slices are kept in ascending order along
the normal ``row direction x column direction``, the order in which SimpleITK
stacks them.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Tuple

import numpy as np
import pydicom
import SimpleITK as sitk
from pydicom.errors import InvalidDicomError

from ..errors import URSAMError

#: the only modality the engine segments from DICOM (its windowing and its structure sets are CT's)
MODALITY = "CT"
#: a spacing between consecutive slices further than this from the median spacing (relative) is a gap
SPACING_TOLERANCE = 0.1
#: direction cosines of two slices may differ by this much and still be one orientation
ORIENTATION_TOLERANCE = 1e-4

_TAGS = ["SOPClassUID", "SOPInstanceUID", "SeriesInstanceUID", "StudyInstanceUID", "FrameOfReferenceUID",
         "Modality", "SeriesDescription", "Rows", "Columns", "PixelSpacing", "ImagePositionPatient",
         "ImageOrientationPatient", "NumberOfFrames"]


@dataclass(frozen=True)
class DicomSlice:
    """One image file of a series."""
    path: str
    sop_instance_uid: str
    sop_class_uid: str
    #: ImagePositionPatient (mm, LPS): the centre of the first transmitted pixel
    position: Tuple[float, float, float]


@dataclass(frozen=True)
class DicomSeries:
    """A checked CT series: its identity and the geometry of each slice."""
    folder: str
    series_instance_uid: str
    study_instance_uid: str
    #: None where the files have none (a structure set or a SEG then cannot reference it)
    frame_of_reference_uid: Optional[str]
    modality: str
    #: ImageOrientationPatient: the row direction (along a row, increasing column), then the column direction
    orientation: Tuple[float, ...]
    #: PixelSpacing as DICOM orders it: between rows, then between columns (mm)
    pixel_spacing: Tuple[float, float]
    rows: int
    columns: int
    #: ascending along :attr:`normal`: ``slices[k]`` is slice ``k`` of the image :func:`read_series` reads
    slices: Tuple[DicomSlice, ...]

    @property
    def row_direction(self):
        return np.array(self.orientation[:3], float)

    @property
    def column_direction(self):
        return np.array(self.orientation[3:], float)

    @property
    def normal(self):
        return np.cross(self.row_direction, self.column_direction)

    @property
    def files(self):
        return [s.path for s in self.slices]

    def to_patient(self, k, columns_rows):
        """Patient coordinates (mm, N x 3) of continuous pixel indices ``(column, row)`` (N x 2) on slice ``k``,
        from that slice's own ImagePositionPatient."""
        uv = np.asarray(columns_rows, float).reshape(-1, 2)
        origin = np.array(self.slices[k].position, float)
        return (origin + np.outer(uv[:, 0] * self.pixel_spacing[1], self.row_direction)
                + np.outer(uv[:, 1] * self.pixel_spacing[0], self.column_direction))


@dataclass(frozen=True)
class _Header:
    path: Path
    ds: object  # pydicom Dataset without pixels

    def get(self, name, default=None):
        return self.ds.get(name, default)


def _headers(folder):
    """The image files of ``folder`` (not its sub-folders, as GDCM reads a series), in name order."""
    found = []
    for path in sorted(p for p in Path(folder).iterdir() if p.is_file()):
        try:
            ds = pydicom.dcmread(str(path), stop_before_pixels=True, specific_tags=_TAGS)
        except (InvalidDicomError, OSError, ValueError, TypeError, AttributeError, EOFError):
            continue  # not a DICOM file: folders of exported series hold DICOMDIRs, notes, thumbnails
        if ds.get("SeriesInstanceUID") and ds.get("Rows"):
            found.append(_Header(path, ds))  # an image; structure sets, reports and DICOMDIRs have no Rows
    return found


def _describe(uid, members):
    first = members[0]
    text = f"{uid} ({first.get('Modality') or 'no modality'}, {len(members)} file{'s' * (len(members) != 1)}"
    description = str(first.get("SeriesDescription") or "").strip()
    return text + (f", {description!r})" if description else ")")


def _group(headers):
    groups = {}
    for h in headers:
        groups.setdefault(str(h.get("SeriesInstanceUID")), []).append(h)
    return groups


def _floats(value, n, what, path):
    try:
        out = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        out = ()
    if len(out) != n:
        raise URSAMError(f"DICOM slice has no valid {what}", path)
    return out


def find_series(folder, series_uid=None):
    """The checked :class:`DicomSeries` of a folder: the one image series in it, or ``series_uid``."""
    folder = Path(folder)
    groups = _group(_headers(folder))
    if not groups:
        raise URSAMError("no DICOM series found in the folder", folder)
    if series_uid is not None:
        if series_uid not in groups:
            listed = "; ".join(_describe(uid, m) for uid, m in groups.items())
            raise URSAMError(f"no DICOM series {series_uid} in the folder (it holds {listed})", folder)
        members = groups[series_uid]
    elif len(groups) > 1:
        listed = "; ".join(_describe(uid, m) for uid, m in groups.items())
        raise URSAMError(f"the folder holds {len(groups)} DICOM image series, choose one with --series UID: "
                         f"{listed}", folder)
    else:
        series_uid, members = next(iter(groups.items()))
    return _check(folder, series_uid, members)


def _check(folder, uid, members):
    first = members[0]
    modality = str(first.get("Modality") or "")
    if modality != MODALITY:
        raise URSAMError(f"DICOM series {uid} is {modality or 'of no modality'}, not {MODALITY} "
                         "(a DICOM input must be a CT series)", folder)
    frames = [h for h in members if int(h.get("NumberOfFrames") or 1) > 1]
    if frames:
        raise URSAMError(f"DICOM series {uid} is stored as enhanced multi-frame images ({frames[0].path.name}); "
                         "export it as one image per slice", folder)
    orientation = _floats(first.get("ImageOrientationPatient"), 6, "ImageOrientationPatient", first.path)
    spacing = _floats(first.get("PixelSpacing"), 2, "PixelSpacing", first.path)
    shape = (int(first.get("Rows")), int(first.get("Columns") or 0))
    row, col = np.array(orientation[:3]), np.array(orientation[3:])
    normal = np.cross(row, col)
    if abs(np.linalg.norm(normal) - 1.0) > 1e-3 or abs(float(row @ col)) > 1e-3:
        raise URSAMError(f"DICOM slice's ImageOrientationPatient is not two unit, perpendicular directions "
                         f"({first.path.name})", folder)
    slices, heights = [], []
    for h in members:
        if not np.allclose(_floats(h.get("ImageOrientationPatient"), 6, "ImageOrientationPatient", h.path),
                           orientation, atol=ORIENTATION_TOLERANCE):
            raise URSAMError(f"DICOM series {uid} mixes slice orientations ({first.path.name} and {h.path.name}): "
                             "a localizer in the series, or not one volume", folder)
        if (int(h.get("Rows")), int(h.get("Columns") or 0)) != shape or \
                not np.allclose(_floats(h.get("PixelSpacing"), 2, "PixelSpacing", h.path), spacing, rtol=1e-4):
            raise URSAMError(f"DICOM series {uid} mixes slice sizes or pixel spacings ({first.path.name} and "
                             f"{h.path.name})", folder)
        position = _floats(h.get("ImagePositionPatient"), 3, "ImagePositionPatient", h.path)
        slices.append(DicomSlice(str(h.path), str(h.get("SOPInstanceUID") or ""), str(h.get("SOPClassUID") or ""),
                                 position))
        heights.append(float(np.dot(position, normal)))
    order = np.argsort(heights, kind="stable")
    slices = [slices[i] for i in order]
    heights = np.asarray(heights)[order]
    _check_positions(folder, uid, slices, heights, row, col, spacing)
    frames_of_reference = {str(h.get("FrameOfReferenceUID")) for h in members if h.get("FrameOfReferenceUID")}
    if len(frames_of_reference) > 1:
        raise URSAMError(f"DICOM series {uid} has slices in {len(frames_of_reference)} frames of reference", folder)
    return DicomSeries(folder=str(folder), series_instance_uid=uid,
                       study_instance_uid=str(first.get("StudyInstanceUID") or ""),
                       frame_of_reference_uid=next(iter(frames_of_reference), None), modality=modality,
                       orientation=orientation, pixel_spacing=spacing, rows=shape[0], columns=shape[1],
                       slices=tuple(slices))


def _check_positions(folder, uid, slices, heights, row, col, spacing):
    """Two slices at one position, gaps (a missing slice), and slices shifted in their plane (gantry tilt)."""
    if len(slices) < 2:
        return  # one slice: check_volume refuses it as a volume
    steps = np.diff(heights)
    name = [Path(s.path).name for s in slices]
    same = np.flatnonzero(steps < 1e-3)
    if same.size:
        i = int(same[0])
        raise URSAMError(f"DICOM series {uid} has two slices at one position ({heights[i]:.2f} mm along the slice "
                         f"normal): {name[i]} and {name[i + 1]}", folder)
    step = float(np.median(steps))
    off = np.flatnonzero(np.abs(steps - step) > SPACING_TOLERANCE * step)
    if off.size:
        i = int(off[0])
        raise URSAMError(f"DICOM series {uid} has missing slices or uneven spacing: {steps[i]:.2f} mm between "
                         f"{name[i]} and {name[i + 1]} ({heights[i]:.2f} and {heights[i + 1]:.2f} mm along the "
                         f"slice normal) where the spacing is {step:.2f} mm", folder)
    origin = np.array(slices[0].position)
    shift = np.array([[np.dot(np.array(s.position) - origin, row), np.dot(np.array(s.position) - origin, col)]
                      for s in slices])
    if np.abs(shift).max() > 0.1 * min(spacing):
        i = int(np.abs(shift).max(axis=1).argmax())
        raise URSAMError(f"DICOM series {uid} has slices shifted in their own plane ({name[i]} by "
                         f"{np.abs(shift[i]).max():.2f} mm): a tilted gantry, which needs resampling first", folder)


def read_series(series):
    """The voxels of a checked series as a SimpleITK image whose slice ``k`` is ``series.slices[k]``."""
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(series.files)
    image = reader.Execute()
    expected_spacing = (series.pixel_spacing[1], series.pixel_spacing[0])
    direction = np.array(image.GetDirection()).reshape(3, 3)
    ok = (image.GetSize()[:2] == (series.columns, series.rows) and image.GetSize()[2] == len(series.slices)
          and np.allclose(image.GetOrigin(), series.slices[0].position, atol=1e-3)
          and np.allclose(direction[:, 0], series.row_direction, atol=1e-4)
          and np.allclose(direction[:, 1], series.column_direction, atol=1e-4)
          and (len(series.slices) < 2 or np.allclose(direction[:, 2], series.normal, atol=1e-4))
          and np.allclose(image.GetSpacing()[:2], expected_spacing, rtol=1e-4))
    if not ok:
        # GDCM placed the voxels otherwise than the headers do: masks and contours would not line up.
        raise URSAMError(f"DICOM series {series.series_instance_uid}: the image read has another geometry than "
                         "its slice headers", series.folder)
    return image
