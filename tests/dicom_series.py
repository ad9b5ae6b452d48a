"""Real CT scans written as DICOM CT series, as scanners store them for each patient position.

A scanner stores the axial slices of a head-first supine patient with rows
running to the patient's left and columns to the back (ImageOrientationPatient
1,0,0,0,1,0); feet first, the image is seen from the other side, and prone,
upside down, so the same anatomy comes out mirrored or turned in the pixel
grid. :func:`write_series` puts a scan (any orientation) into that layout for
HFS, FFS, HFP or FFP by flipping its voxel axes with SimpleITK, which keeps
every voxel at its physical place: ImagePositionPatient, ImageOrientationPatient
and the pixels describe the same anatomy in every position. ``reverse`` stores
the slices (file names and InstanceNumber) in the opposite order.
"""
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
import SimpleITK as sitk
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

#: patient position -> flip of the canonical LPS axes (x, y): rows to the patient's left (x) and columns to the
#: back (y) head first supine, each reversed where the scanner sees the patient from the other side
POSITIONS = {"HFS": (False, False), "FFS": (True, False), "HFP": (True, True), "FFP": (False, True)}


@dataclass
class WrittenSeries:
    folder: Path
    image: sitk.Image  # the layout written: slice k of the array is file k in storage order (before reverse)
    series_uid: str
    frame_of_reference_uid: str
    study_uid: str


def layout(image, position):
    """``image`` with its voxel axes as a scanner stores them for ``position`` (the same physical voxels)."""
    canonical = sitk.DICOMOrient(image, "LPS")
    flip_x, flip_y = POSITIONS[position]
    return sitk.Flip(canonical, [flip_x, flip_y, False])


def write_series(image, folder, position="HFS", reverse=False, study_uid=None, series_uid=None,
                 frame_of_reference_uid=None, modality="CT", patient_id="URSAM-TEST", description="CT",
                 prefix="IM", with_frame_of_reference=True):
    """Write ``image`` (HU) as a single-frame DICOM series in ``folder`` (files ``<prefix>0001.dcm``, ...);
    returns a :class:`WrittenSeries`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    stored = layout(image, position)
    voxels = np.clip(np.round(sitk.GetArrayFromImage(stored)), -32768, 32767).astype(np.int16)
    direction = np.array(stored.GetDirection()).reshape(3, 3)
    spacing = stored.GetSpacing()
    study_uid = study_uid or generate_uid()
    series_uid = series_uid or generate_uid()
    frame_of_reference_uid = frame_of_reference_uid or generate_uid()
    order = list(range(voxels.shape[0]))
    if reverse:
        order.reverse()
    for number, k in enumerate(order, start=1):
        ds = Dataset()
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = generate_uid()
        ds.PatientName = "URSAM^Test"
        ds.PatientID = patient_id
        ds.PatientBirthDate = ""
        ds.PatientSex = "O"
        ds.StudyInstanceUID = study_uid
        ds.StudyDate = "20240101"
        ds.StudyTime = "120000"
        ds.StudyID = "1"
        ds.AccessionNumber = ""
        ds.ReferringPhysicianName = ""
        ds.Modality = modality
        ds.SeriesInstanceUID = series_uid
        ds.SeriesNumber = 1
        ds.SeriesDescription = description
        if with_frame_of_reference:
            ds.FrameOfReferenceUID = frame_of_reference_uid
            ds.PositionReferenceIndicator = ""
        ds.PatientPosition = position
        ds.Manufacturer = "test"
        ds.InstanceNumber = number
        ds.ImagePositionPatient = [f"{v:.6f}" for v in stored.TransformIndexToPhysicalPoint((0, 0, k))]
        ds.ImageOrientationPatient = [f"{v:.6f}" for v in (*direction[:, 0], *direction[:, 1])]
        ds.PixelSpacing = [f"{spacing[1]:.6f}", f"{spacing[0]:.6f}"]  # between rows, then between columns
        ds.SliceThickness = f"{spacing[2]:.6f}"
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows, ds.Columns = voxels.shape[1], voxels.shape[2]
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleIntercept, ds.RescaleSlope = "0", "1"
        ds.PixelData = voxels[k].tobytes()
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = ds.SOPClassUID
        meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta = meta
        pydicom.dcmwrite(str(folder / f"{prefix}{number:04d}.dcm"), ds, enforce_file_format=True)
    return WrittenSeries(folder, stored, series_uid, frame_of_reference_uid, study_uid)


def on_grid(labels, reference):
    """``labels`` (a SimpleITK label map) on ``reference``'s grid: the same physical voxels, reordered."""
    return sitk.GetArrayFromImage(sitk.Resample(labels, reference, sitk.Transform(), sitk.sitkNearestNeighbor, 0))
