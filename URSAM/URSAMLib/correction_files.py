"""A correction applied to a result folder (``ursam correct``): its files, report.json and the undo record.

A result folder (what ``ursam segment`` writes) is corrected as a whole: the corrected organ's voxels
change in ``rectified.nii.gz`` and ``rectified.seg.nrrd``, its flags on the changed slices leave
``uncertain.nii.gz`` (a reviewer has corrected them), and report.json gains an entry in its
``corrections`` list (organ, slice, box, the slices changed, seconds) while the organ's volume and its
flagged components (``"status": "corrected"``) follow. The other files are the automatic run's, as
they were.

Atomic: the new folder is staged beside the old one (the files that do not change are hard links, so
staging costs no copy) and replaces it only when it is whole; an interrupted correction leaves the
previous result as it was. The files a correction replaces are kept in ``undo/NNN/`` (NNN counting the
corrections) with the correction's entry, and :func:`undo_last` puts them back: the folder is then the one
before the correction, byte for byte.

Slice numbers and boxes are in the input file's own voxel indices (slice K along the file's third axis, as
box files have them). SAM corrects the canonical axial slices (:mod:`URSAMLib.orientation`): a file whose
third axis is the axial one, in any direction and with its in-plane axes in any order, maps slice for
slice; a file whose third axis is not axial (a sagittal or coronal stack) is refused, since a box on one of
its slices is no box on an axial one.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

import numpy as np

from .atomic import staged_dir
from .boxes import OrganBox
from .correction import Correction, CorrectionOptions, SliceBox, SliceSam, clear_flags, correct_organ
from .correction import remove_from_slice as remove_organ_slice
from .errors import URSAMError
from .imageio import check_same_grid, read_labels, read_scan, write_image
from .orientation import Orientation
from .outputs import _remove_stale_stages, write_json, write_seg_nrrd
from .sam import BackendOptions, needs_checkpoint

#: the files a correction rewrites (and undo puts back)
CORRECTED_FILES = ("rectified.nii.gz", "rectified.seg.nrrd", "uncertain.nii.gz", "report.json")
UNDO_DIR = "undo"
UNDO_RECORD = "correction.json"


@dataclass
class CorrectionRecord:
    """What report.json's ``corrections`` list says of one correction (slices and box in the input file's
    voxel indices)."""
    action: str
    organ: str
    label: int
    slice: int
    box: Optional[List[int]]
    propagate: bool
    max_slices: int
    slices_changed: List[int]
    voxels_added: int
    voxels_removed: int
    stops: dict
    #: the whole correction before writing (reading, the model where it was loaded, SAM) and SAM's part of it
    seconds: float
    sam_seconds: float
    encoder_calls: int

    def to_json(self):
        return dict(self.__dict__)


@dataclass
class ResultFolder:
    """A result folder as a correction reads it: report.json, the result's label map on the input's grid,
    and the way to SAM's canonical slices."""
    path: Path
    report: dict
    reference: object
    labels: np.ndarray
    flagged: np.ndarray
    orientation: Orientation

    @classmethod
    def read(cls, path):
        path = Path(path)
        if not path.is_dir():
            raise URSAMError("result folder not found", path)
        report_path = path / "report.json"
        try:
            report = json.loads(report_path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise URSAMError("the result folder has no report.json (is it a folder ursam segment wrote?)",
                             report_path) from None
        except ValueError as err:
            raise URSAMError(f"report.json is not valid JSON ({err})", report_path) from None
        if not isinstance(report, dict) or not isinstance(report.get("organs"), list):
            raise URSAMError("report.json lists no organs", report_path)
        image, labels = read_labels(path / "rectified.nii.gz", what="result label map")
        _, flagged = read_labels(path / "uncertain.nii.gz", image, "flagged-voxel map")
        return cls(path, report, image, labels, flagged, Orientation.of(image))

    def organ(self, name):
        """``(label, name)`` of an organ of the result, by name (any case) or label value."""
        for o in self.report["organs"]:
            if str(o.get("name", "")).lower() == str(name).lower() or str(o.get("label")) == str(name):
                return int(o["label"]), str(o["name"])
        known = ", ".join(str(o.get("name")) for o in self.report["organs"])
        raise URSAMError(f"organ {name!r} is not in this result (its organs: {known})", self.path / "report.json")

    def organs(self):
        return [(int(o["label"]), str(o["name"])) for o in self.report["organs"]]

    def image_path(self, image=None):
        path = image or self.report.get("inputs", {}).get("image")
        if not path:
            raise URSAMError("report.json does not name the input image; give it with --image",
                             self.path / "report.json")
        return path

    # -- the input file's slices and SAM's canonical ones -------------------------------------------
    def check_axial(self):
        """The canonical slices are the file's third-axis slices (in some direction); URSAMError otherwise."""
        if self.orientation.axes[2] != 2:
            names = "xyz"
            axial = names[self.orientation.axes[2]]
            raise URSAMError(f"the file's slices along its third axis are not axial (its axial axis is its {axial} "
                             "axis); SAM corrects axial slices, so draw the box on an axial slice (in 3D Slicer's "
                             "axial view, the Red view)", self.path / "rectified.nii.gz")

    def to_canonical_box(self, k, box):
        """A :class:`SliceBox` on the canonical grid of slice ``k`` and ``box`` [x0, y0, x1, y1] (the file's
        voxel indices); checked against the scan, URSAMError naming the result's label map."""
        where = self.path / "rectified.nii.gz"
        shape = self.labels.shape
        nz = shape[0]
        if not 0 <= int(k) < nz:
            raise URSAMError(f"slice {k} is outside the scan (slices 0..{nz - 1} along the file's third axis)", where)
        box = [int(k), 0, 0, 0, 0] if box is None else [int(k)] + [int(v) for v in box]
        SliceBox(box[0], box[1], box[2], box[3], box[4]).check(shape, where)
        self.check_axial()
        mapped = self.orientation.box_to_canonical(SliceBox(*box).organ_box())
        return SliceBox(int(mapped.min_ijk[2]), int(mapped.min_ijk[0]), int(mapped.min_ijk[1]),
                        int(mapped.max_ijk[0]), int(mapped.max_ijk[1])).check(self.orientation_shape(), where)

    def orientation_shape(self):
        return tuple(self.orientation.canonical_size[::-1])

    def to_input_slice(self, z):
        """The file's slice (third axis) of canonical slice ``z``."""
        return int(self.labels.shape[0] - 1 - z) if self.orientation.flips[2] else int(z)


def backend_options(report, overrides=None, where=None):
    """The SAM model report.json names (``backend``), with the user's ``overrides`` (device, encoder,
    checkpoint: ``ursam segment``'s SAM options), checked."""
    named = report.get("backend") or {}
    name = named.get("backend")
    if not name:
        raise URSAMError("report.json does not name the SAM backend that made the result", where)
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    checkpoint = overrides.get("checkpoint") or (named.get("checkpoint") if needs_checkpoint(name) else None)
    if checkpoint and needs_checkpoint(name) and not Path(checkpoint).is_file():
        raise URSAMError(f"the checkpoint of the {name} model that made the result is not there; give it with "
                         "--checkpoint", checkpoint)
    window = named.get("window")
    return BackendOptions(name=name, checkpoint=checkpoint, device=overrides.get("device", "auto"),
                          window=tuple(window) if window else None,
                          encoder=overrides.get("encoder", "auto")).check()


def read_canonical_scan(folder, image=None):
    """The input CT of a result on SAM's canonical grid ([z, y, x], HU), checked against the result's grid;
    and whether the run normalized it by percentiles."""
    path = folder.image_path(image)
    scan = read_scan(path, "auto")
    check_same_grid(scan.reference, folder.reference, path, "input image")
    return folder.orientation.to_canonical(scan.volume), scan.percentile


def correct_result(result_dir, organ, k, box=None, remove=False, options=None, backend=None, image=None,
                   model=None, progress=None):
    """Correct one organ of a result folder from a box on slice ``k`` (or remove it from that slice): the
    :class:`CorrectionRecord` added to report.json.

    ``k``, ``box`` [x0, y0, x1, y1]: the input file's voxel indices. ``backend``: a SAM backend already
    loaded (else the one report.json names is loaded, with ``model`` overrides: device, encoder,
    checkpoint). ``image``: the input CT where it is no longer where report.json says.
    Bad input raises URSAMError naming the file; nothing is written before the correction is whole.
    """
    t0 = time.perf_counter()
    options = (options or CorrectionOptions()).check()
    folder = ResultFolder.read(result_dir)
    label, name = folder.organ(organ)
    if not remove and box is None:
        raise URSAMError("a correction needs a box (--box X0,Y0,X1,Y1) or --remove")
    target = folder.to_canonical_box(k, box)
    labels = folder.orientation.to_canonical(folder.labels)
    calls = 0
    if remove:
        outcome = remove_organ_slice(labels, label, target.z)
    else:
        volume, percentile = read_canonical_scan(folder, image)
        if backend is None:
            if progress is not None:
                progress.stage(f"loading model {folder.report['backend'].get('backend')}")
            backend = backend_options(folder.report, model, folder.path / "report.json").make(percentile)
        sam = SliceSam(backend, volume, zoom=options.zoom)
        outcome = correct_organ(sam, labels, label, target, options)
        calls = outcome.encoder_calls
    record = CorrectionRecord(
        "remove" if remove else "box", name, label, int(k), None if remove else [int(v) for v in box],
        options.propagate and not remove, int(options.max_slices), [folder.to_input_slice(z) for z in outcome.changed],
        outcome.voxels_added, outcome.voxels_removed,
        {d: {"last_slice": None if s.last is None else folder.to_input_slice(s.last), "why": s.why}
         for d, s in outcome.stops.items()}, 0.0, round(outcome.seconds, 3), calls)
    record.slices_changed.sort()
    record.seconds = round(time.perf_counter() - t0, 3)
    write_correction(folder, outcome, record)
    return record


def corrected_components(components, label, slices, folder):
    """Mark the flagged components (report.json's) of organ ``label`` that lie on corrected canonical
    ``slices``: ``"status": "corrected"``."""
    changed = set(slices)
    for c in components:
        if int(c.get("label", -1)) != label or "box_ijk" not in c:
            continue
        i0, i1, j0, j1, k0, k1 = c["box_ijk"]
        box = folder.orientation.box_to_canonical(OrganBox(label, "", [i0, j0, k0], [i1, j1, k1]))
        if any(box.min_ijk[2] <= z <= box.max_ijk[2] for z in changed):
            c["status"] = "corrected"
    return components


def _link_tree(src, dst):
    """``src``'s files in ``dst`` as hard links (copies where the file system has none)."""
    def link(a, b):
        try:
            os.link(a, b)
        except OSError:
            shutil.copy2(a, b)
    shutil.copytree(src, dst, copy_function=link, dirs_exist_ok=True)


def _stage(folder_path):
    folder_path = Path(folder_path).absolute()
    _remove_stale_stages(folder_path)
    return staged_dir(folder_path, prefix=f".{folder_path.name}.partial-{os.getpid()}-", replace=True)


def _undo_numbers(path):
    undo = Path(path) / UNDO_DIR
    if not undo.is_dir():
        return []
    return sorted(int(p.name) for p in undo.iterdir() if p.is_dir() and p.name.isdigit())


def write_correction(folder, outcome: Correction, record: CorrectionRecord):
    """Write a correction into its result folder, atomically, keeping the files it replaces for undo."""
    label = outcome.label
    labels = folder.orientation.to_input(outcome.labels).astype(folder.labels.dtype, copy=False)
    flagged = folder.orientation.to_input(
        clear_flags(folder.orientation.to_canonical(folder.flagged), label, outcome.changed))
    report = json.loads(json.dumps(folder.report))
    report.setdefault("corrections", []).append(record.to_json())
    voxel_ml = float(np.prod(folder.reference.GetSpacing())) / 1000.0
    for o in report["organs"]:
        if int(o["label"]) == label:
            n = int(np.count_nonzero(labels == label))
            o["rectified_voxels"], o["rectified_ml"] = n, round(n * voxel_ml, 3)
    corrected_components(report.get("flagged_components", []), label, outcome.changed, folder)
    number = (_undo_numbers(folder.path) or [0])[-1] + 1
    with _stage(folder.path) as stage:
        _link_tree(folder.path, stage)
        keep = stage / UNDO_DIR / f"{number:03d}"
        keep.mkdir(parents=True)
        for name in CORRECTED_FILES:
            if (stage / name).exists():
                os.replace(stage / name, keep / name)  # the hard link to the previous file
        write_json(record.to_json(), keep / UNDO_RECORD)
        write_image(labels, folder.reference, stage / "rectified.nii.gz")
        write_image(flagged.astype(folder.flagged.dtype, copy=False), folder.reference, stage / "uncertain.nii.gz")
        write_seg_nrrd(labels, folder.reference, folder.organs(), stage / "rectified.seg.nrrd")
        write_json(report, stage / "report.json")
    return folder.path


def undo_last(result_dir):
    """Undo the last correction of a result folder: its files as they were before it, byte for byte. Returns
    the undone correction's report.json entry."""
    path = Path(result_dir)
    if not (path / "report.json").is_file():
        raise URSAMError("the result folder has no report.json", path)
    numbers = _undo_numbers(path)
    if not numbers:
        raise URSAMError("this result has no correction to undo", path)
    keep_name = f"{numbers[-1]:03d}"
    try:
        record = json.loads((path / UNDO_DIR / keep_name / UNDO_RECORD).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raise URSAMError("the undo record is unreadable", path / UNDO_DIR / keep_name / UNDO_RECORD) from None
    with _stage(path) as stage:
        _link_tree(path, stage)
        keep = stage / UNDO_DIR / keep_name
        for name in CORRECTED_FILES:
            if (keep / name).exists():
                os.replace(keep / name, stage / name)
        shutil.rmtree(keep)
        if not any((stage / UNDO_DIR).iterdir()):
            (stage / UNDO_DIR).rmdir()
    return record
