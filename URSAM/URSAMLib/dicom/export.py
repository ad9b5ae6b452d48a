"""``--dicom-out``: the DICOM objects a run writes beside its other outputs, for a DICOM CT series input.

:meth:`DicomExport.plan` checks, before any work, that the input is a DICOM
CT series a structure set can reference (the series reader's own checks, and a
Frame of Reference); :meth:`DicomExport.writers` gives ``write_results`` one
writer per object, so they are written into the staged output folder with the
rest and the folder appears whole or not at all.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Tuple

from ..errors import URSAMError
from .rtstruct import write_rtstruct
from .series import DicomSeries

#: object -> file in the output folder
FILES = {"rtstruct": "rtstruct.dcm", "seg": "seg.dcm"}


def parse_kinds(text):
    """``rtstruct``, ``seg`` or both (comma-separated, any order) as a tuple in :data:`FILES` order."""
    if not text:
        return ()
    kinds = [k.strip().lower() for k in str(text).split(",") if k.strip()]
    unknown = [k for k in kinds if k not in FILES]
    if unknown or not kinds:
        raise URSAMError(f"--dicom-out takes rtstruct, seg or rtstruct,seg, not {text!r}")
    return tuple(k for k in FILES if k in kinds)


def output_names(kinds):
    return tuple(FILES[k] for k in kinds)


def require_dicom_inputs(images):
    """``--dicom-out`` for a cohort: every scan must be a DICOM series folder (checked before any scan runs)."""
    files = [str(i) for i in images if not Path(i).is_dir()]
    if files:
        shown = ", ".join(files[:3]) + (f" and {len(files) - 3} more" if len(files) > 3 else "")
        raise URSAMError(f"--dicom-out needs DICOM CT series (folders) as inputs; not a DICOM series: {shown}")


@dataclass(frozen=True)
class DicomExport:
    series: DicomSeries
    kinds: Tuple[str, ...]

    @classmethod
    def plan(cls, scan, kinds):
        """The export of a run on ``scan`` (a :class:`URSAMLib.imageio.Scan`; None without ``kinds``); bad input
        raises URSAMError before any work."""
        if not kinds:
            return None
        image = scan.name
        if scan.dicom is None:
            raise URSAMError("--dicom-out needs a DICOM CT series folder as the input (the objects reference its "
                             "slices)", image)
        series = scan.dicom
        if not series.frame_of_reference_uid:
            raise URSAMError("--dicom-out: the DICOM series has no Frame of Reference UID, which a structure set "
                             "and a segmentation must reference", image)
        return cls(series, tuple(kinds))

    def writers(self, result):
        """``{file name: writer(path)}`` of the result's label map (``rectified.nii.gz``) and organs."""
        # Imported here: highdicom loads only where a SEG is written.

        organs = [(o.label, o.name) for o in result.main_organs()]
        labels = {}

        def label_map():
            if "map" not in labels:
                labels["map"] = result.label_map()
            return labels["map"]

        # highdicom loads only where a SEG is written: it is most of a second of every run's start-up
        from .seg import write_seg  # noqa: PLC0415

        write = {"rtstruct": write_rtstruct, "seg": write_seg}
        return {FILES[k]: (lambda path, w=write[k]: w(label_map(), organs, self.series, path)) for k in self.kinds}

    def info(self):
        """What report.json records of the export."""
        return {"files": list(output_names(self.kinds)), "series_instance_uid": self.series.series_instance_uid,
                "study_instance_uid": self.series.study_instance_uid,
                "frame_of_reference_uid": self.series.frame_of_reference_uid, "slices": len(self.series.slices)}
