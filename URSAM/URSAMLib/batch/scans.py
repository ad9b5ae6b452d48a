"""The scans of a cohort: a folder of scans or a CSV manifest, and the digests that make a run resumable.

A folder: every NIfTI, NRRD or MHA file in it is a scan, named by its file
name without the suffix, and every sub-folder holding a DICOM series is a scan
named by the sub-folder. A manifest: a CSV file with the columns ``id`` and
``image``, and optionally ``labels`` (a reference label map: Dice in the
summary) and ``boxes`` (a box file, instead of a template library); relative
paths are taken from the manifest's folder.
"""
from __future__ import annotations

import csv
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import SimpleITK as sitk

from ..errors import URSAMError
from ..templates import file_digest

#: single-file image formats a scan folder may hold (DICOM comes as series in sub-folders)
SCAN_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")
MANIFEST_COLUMNS = ("id", "image", "labels", "boxes")
#: names the batch writes beside the scans' folders; no scan may take them
RESERVED = ("summary.csv", "failed.csv", "summary.md", "batch.json")


@dataclass
class Scan:
    id: str
    image: str
    labels: Optional[str] = None
    boxes: Optional[str] = None


def _scan_id(name):
    low = name.lower()
    for suffix in SCAN_SUFFIXES:
        if low.endswith(suffix):
            return name[: -len(suffix)]
    return None


def _is_dicom_folder(folder):
    try:
        return bool(sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder)))
    except RuntimeError:
        return False


def check_id(scan_id, where):
    """A scan id names its output folder: no path parts, not hidden, not one of the batch's own files."""
    if (not scan_id or scan_id != scan_id.strip() or "/" in scan_id or "\\" in scan_id or scan_id.startswith(".")
            or scan_id in RESERVED):
        raise URSAMError(f"scan id {scan_id!r} cannot name an output folder (no slashes, no leading dot, "
                         f"none of {', '.join(RESERVED)})", where)
    return scan_id


def find_scans(source, skipped=None):
    """The scans of a folder or a CSV manifest, in a stable order. ``skipped``: a list that receives the
    sub-folders that hold no DICOM series (``(path, reason)``)."""
    path = Path(source)
    if not path.exists():
        raise URSAMError("input not found (a folder of scans or a CSV manifest)", path)
    if path.is_file():
        if path.suffix.lower() != ".csv":
            raise URSAMError("input must be a folder of scans or a CSV manifest (id,image[,labels][,boxes])", path)
        return read_manifest(path)
    scans, seen = [], {}
    for entry in sorted(path.iterdir(), key=lambda p: p.name):
        if entry.name.startswith("."):
            continue
        if entry.is_dir():
            if _is_dicom_folder(entry):
                scan_id = entry.name
            else:
                if skipped is not None:
                    skipped.append((str(entry), "no DICOM series in it"))
                continue
        else:
            scan_id = _scan_id(entry.name)
            if scan_id is None:
                continue
        check_id(scan_id, entry)
        if scan_id in seen:
            raise URSAMError(f"two scans would share the id {scan_id!r} ({seen[scan_id]} and {entry.name}); "
                             "rename one or list them in a manifest", path)
        seen[scan_id] = entry.name
        scans.append(Scan(scan_id, str(entry)))
    if not scans:
        raise URSAMError("no scans in the folder (NIfTI, NRRD, MHA files, or DICOM series in sub-folders)", path)
    return scans


def read_manifest(path):
    """The scans of a CSV manifest (columns id, image, and optionally labels and boxes)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise URSAMError("manifest is not UTF-8 text", path) from None
    reader = csv.DictReader(text.splitlines())
    columns = [c.strip().lower() for c in (reader.fieldnames or [])]
    if "id" not in columns or "image" not in columns:
        raise URSAMError("manifest needs a header with the columns id and image (optionally labels, boxes)", path)
    unknown = [c for c in columns if c not in MANIFEST_COLUMNS]
    if unknown:
        raise URSAMError(f"manifest has unknown column(s) {', '.join(unknown)}; the columns are "
                         f"{', '.join(MANIFEST_COLUMNS)}", path)
    reader.fieldnames = columns
    scans, seen = [], set()
    for n, row in enumerate(reader, start=2):
        if None in row:
            raise URSAMError(f"manifest line {n} has more fields than the header", path)
        row = {k: (v or "").strip() for k, v in row.items()}
        if not any(row.values()):
            continue
        scan_id, image = row["id"], row["image"]
        if not image:
            raise URSAMError(f"manifest line {n} ({scan_id or 'no id'}) has no image", path)
        check_id(scan_id, f"{path}, line {n}")
        if scan_id in seen:
            raise URSAMError(f"manifest lists the id {scan_id!r} twice (line {n})", path)
        seen.add(scan_id)

        def resolve(value):
            return str((path.parent / value).absolute()) if value and not Path(value).is_absolute() else (value or None)

        scans.append(Scan(scan_id, resolve(image), resolve(row.get("labels")), resolve(row.get("boxes"))))
    if not scans:
        raise URSAMError("manifest lists no scans", path)
    return scans


# ----------------------------------------------------------------------------------------------
# Digests: a rerun skips a scan whose inputs and settings are what made its outputs

def scan_digest(scan, common):
    """The hash recorded in a scan's report.json: its input files and the run's common settings."""
    parts = {"common": common, "image": file_digest(scan.image),
             "labels": file_digest(scan.labels) if scan.labels else None,
             "boxes": file_digest(scan.boxes) if scan.boxes else None}
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()
