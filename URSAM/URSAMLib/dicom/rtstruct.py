"""The RT Structure Set of a label map on a checked DICOM CT series, written with pydicom.

Each organ is one ROI named by :mod:`URSAMLib.dicom.names`, coloured as in
the .seg.nrrd, an ORGAN made by an AUTOMATIC algorithm. On every slice where it
has voxels, each 4-connected piece is one CLOSED_PLANAR contour on the voxel
edges, holes joined by keyholes (:mod:`URSAMLib.dicom.contours`), placed with
that slice's own ImagePositionPatient, ImageOrientationPatient and
PixelSpacing and referencing that slice's SOP Instance UID. The geometry never
passes through an image library's axis conventions, so the patient position
(HFS, FFS, HFP, FFP) and the order the slices are stored in cannot turn or flip
a contour.

The file is written in Implicit VR Little Endian, the transfer syntax every
DICOM reader has: in Explicit VR a Contour Data value longer than 65534 bytes
(a long contour) cannot be encoded (PS3.3 C.8.8.6).
"""
from __future__ import annotations

import datetime
from dataclasses import dataclass, field
from typing import List

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, ImplicitVRLittleEndian, generate_uid

from .. import __version__, terminology
from ..atomic import atomic_path
from ..errors import URSAMError
from .contours import mask_polygons
from .names import structure_names

RT_STRUCTURE_SET_STORAGE = "1.2.840.10008.5.1.4.1.1.481.3"
#: what RT Referenced Study Sequence items reference (PS3.3 C.8.8.5: the Detached Study Management SOP Class)
DETACHED_STUDY_MANAGEMENT = "1.2.840.10008.3.1.2.3.1"
MANUFACTURER = "URSAM"
SERIES_NUMBER = 901

#: what the structure set copies from the CT, so that it joins the same patient and study
_PATIENT_AND_STUDY = ("SpecificCharacterSet", "PatientName", "PatientID", "PatientBirthDate", "PatientSex",
                      "PatientAge", "StudyInstanceUID", "StudyDate", "StudyTime", "StudyID", "AccessionNumber",
                      "ReferringPhysicianName", "StudyDescription", "PositionReferenceIndicator")
#: type 2 attributes: present, empty where the CT has no value
_TYPE2 = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime", "StudyID",
          "AccessionNumber", "ReferringPhysicianName")


@dataclass
class Structure:
    """One ROI: its number, name, colour and contours (each an ``N x 3`` array, mm) with their slice index."""
    number: int
    name: str
    color: tuple
    contours: List[tuple] = field(default_factory=list)  # (slice index, points N x 3)


def _ds(value):
    """A decimal string of at most 16 characters (DS), to 0.1 micrometre."""
    text = f"{value:.4f}".rstrip("0").rstrip(".")
    return "0" if text in ("-0", "") else text


def structures(labels_zyx, organs, series):
    """The :class:`Structure` of each ``(label, name)`` organ of a label map on ``series``' grid."""
    labels = np.asarray(labels_zyx)
    expected = (len(series.slices), series.rows, series.columns)
    if labels.shape != expected:
        raise URSAMError(f"label map of shape {labels.shape} is not on the DICOM series' grid {expected}",
                         series.folder)
    out = []
    for number, ((label, name), roi_name) in enumerate(zip(organs, structure_names(organs)), start=1):
        rgb = terminology.lookup(name, label)[1]
        structure = Structure(number, roi_name, tuple(int(round(255 * c)) for c in rgb))
        mask = labels == label
        for k in np.flatnonzero(mask.reshape(mask.shape[0], -1).any(axis=1)):
            for polygon in mask_polygons(mask[k]):
                structure.contours.append((int(k), series.to_patient(int(k), polygon)))
        out.append(structure)
    return out


def _copy_source(ds, series):
    source = pydicom.dcmread(series.slices[0].path, stop_before_pixels=True)
    for keyword in _PATIENT_AND_STUDY:
        if keyword in source:
            setattr(ds, keyword, source.data_element(keyword).value)
    for keyword in _TYPE2:
        if keyword not in ds:
            setattr(ds, keyword, "")


def _image_item(slice_):
    item = Dataset()
    item.ReferencedSOPClassUID = slice_.sop_class_uid
    item.ReferencedSOPInstanceUID = slice_.sop_instance_uid
    return item


def build_rtstruct(labels_zyx, organs, series, description="URSAM organs at risk"):
    """The RT Structure Set (a pydicom Dataset with its file meta) of a label map on ``series``' grid."""
    if not series.frame_of_reference_uid:
        raise URSAMError("the DICOM series has no Frame of Reference UID, which a structure set must reference",
                         series.folder)
    now = datetime.datetime.now()
    ds = Dataset()
    _copy_source(ds, series)
    ds.SOPClassUID = RT_STRUCTURE_SET_STORAGE
    ds.SOPInstanceUID = generate_uid()
    ds.InstanceCreationDate = now.strftime("%Y%m%d")
    ds.InstanceCreationTime = now.strftime("%H%M%S")
    ds.Modality = "RTSTRUCT"
    ds.SeriesInstanceUID = generate_uid()
    ds.SeriesNumber = SERIES_NUMBER
    ds.SeriesDescription = description
    ds.OperatorsName = ""
    ds.Manufacturer = MANUFACTURER
    ds.ManufacturerModelName = MANUFACTURER
    ds.SoftwareVersions = __version__
    ds.InstanceNumber = 1
    ds.FrameOfReferenceUID = series.frame_of_reference_uid
    ds.StructureSetLabel = "URSAM"
    ds.StructureSetName = description[:64]
    ds.StructureSetDate = ds.InstanceCreationDate
    ds.StructureSetTime = ds.InstanceCreationTime

    referenced_series = Dataset()
    referenced_series.SeriesInstanceUID = series.series_instance_uid
    referenced_series.ContourImageSequence = Sequence([_image_item(s) for s in series.slices])
    referenced_study = Dataset()
    referenced_study.ReferencedSOPClassUID = DETACHED_STUDY_MANAGEMENT
    referenced_study.ReferencedSOPInstanceUID = series.study_instance_uid
    referenced_study.RTReferencedSeriesSequence = Sequence([referenced_series])
    frame = Dataset()
    frame.FrameOfReferenceUID = series.frame_of_reference_uid
    frame.RTReferencedStudySequence = Sequence([referenced_study])
    ds.ReferencedFrameOfReferenceSequence = Sequence([frame])

    rois, roi_contours, observations = [], [], []
    for structure in structures(labels_zyx, organs, series):
        roi = Dataset()
        roi.ROINumber = structure.number
        roi.ReferencedFrameOfReferenceUID = series.frame_of_reference_uid
        roi.ROIName = structure.name
        roi.ROIGenerationAlgorithm = "AUTOMATIC"
        roi.ROIGenerationDescription = f"URSAM {__version__}"
        rois.append(roi)
        item = Dataset()
        item.ROIDisplayColor = list(structure.color)
        item.ReferencedROINumber = structure.number
        contours = []
        for number, (k, points) in enumerate(structure.contours, start=1):
            contour = Dataset()
            contour.ContourImageSequence = Sequence([_image_item(series.slices[k])])
            contour.ContourGeometricType = "CLOSED_PLANAR"
            contour.NumberOfContourPoints = len(points)
            contour.ContourNumber = number
            contour.ContourData = [_ds(v) for v in points.ravel()]
            contours.append(contour)
        if contours:
            item.ContourSequence = Sequence(contours)
        roi_contours.append(item)
        observation = Dataset()
        observation.ObservationNumber = structure.number
        observation.ReferencedROINumber = structure.number
        observation.RTROIInterpretedType = "ORGAN"
        observation.ROIInterpreter = ""
        observations.append(observation)
    ds.StructureSetROISequence = Sequence(rois)
    ds.ROIContourSequence = Sequence(roi_contours)
    ds.RTROIObservationsSequence = Sequence(observations)

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ImplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    meta.ImplementationVersionName = f"URSAM_{__version__}"[:16]
    ds.file_meta = meta
    return ds


def save_dataset(ds, path):
    """Write a dataset as a DICOM file (preamble, file meta, its transfer syntax), atomically."""
    with atomic_path(path) as tmp:
        if int(pydicom.__version__.split(".")[0]) >= 3:
            pydicom.dcmwrite(str(tmp), ds, enforce_file_format=True)
        else:  # pydicom 2 (Python 3.9) takes the encoding from the dataset
            ds.is_little_endian = True
            ds.is_implicit_VR = ds.file_meta.TransferSyntaxUID == ImplicitVRLittleEndian
            pydicom.dcmwrite(str(tmp), ds, write_like_original=False)
    return path


def write_rtstruct(labels_zyx, organs, series, path, description="URSAM organs at risk"):
    """Write the RT Structure Set of a label map on ``series``' grid to ``path``."""
    return save_dataset(build_rtstruct(labels_zyx, organs, series, description), path)
