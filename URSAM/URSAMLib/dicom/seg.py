"""The DICOM Segmentation (SEG) of a label map on a checked DICOM CT series, written with highdicom.

One segment per organ, labelled by :mod:`URSAMLib.dicom.names`, with the SNOMED
CT category, type and side that :mod:`URSAMLib.terminology` gives Slicer's
terminology (a generic "Anatomical structure" where it has none), the
.seg.nrrd's colour as the recommended display colour, and URSAM as the
automatic algorithm. Frames are binary, one per slice and segment that holds
voxels, each referencing its source CT slice.
"""
from __future__ import annotations

import highdicom as hd
import numpy as np
from pydicom import dcmread
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.uid import generate_uid

from .. import __version__, terminology
from ..atomic import atomic_path
from ..errors import URSAMError
from .names import structure_names

SERIES_NUMBER = 902
MANUFACTURER = "URSAM"
#: for organs the terminology does not know: SNOMED CT "Anatomical structure"
GENERIC_TYPE = ("SCT", "91723000", "Anatomical structure")
_CATEGORY = ("SCT", "123037004", "Anatomical Structure")


def _code(triple):
    scheme, value, meaning = triple
    return Code(value, scheme, meaning)


def dicom_lab(rgb):
    """A colour (sRGB, 0..1) as DICOM's Recommended Display CIELab Value (PS3.3 C.10.7.1.1: CIELab, D65 white,
    L* 0..100 and a*, b* -128..127 scaled to 0..65535)."""
    c = np.asarray(rgb, float)
    linear = np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
    xyz = np.array([[0.4124564, 0.3575761, 0.1804375],
                    [0.2126729, 0.7151522, 0.0721750],
                    [0.0193339, 0.1191920, 0.9503041]]) @ linear
    t = xyz / np.array([0.95047, 1.0, 1.08883])
    f = np.where(t > (6 / 29) ** 3, np.cbrt(t), t / (3 * (6 / 29) ** 2) + 4 / 29)
    lab = np.array([116 * f[1] - 16, 500 * (f[0] - f[1]), 200 * (f[1] - f[2])])
    scaled = [lab[0] * 65535 / 100, (lab[1] + 128) * 65535 / 255, (lab[2] + 128) * 65535 / 255]
    return [int(round(min(max(v, 0), 65535))) for v in scaled]


def segment_description(number, label, name, segment_label):
    """The highdicom SegmentDescription of one organ."""
    _, color, term = terminology.lookup(name, label)
    category = _code(term["category"]) if term else _code(_CATEGORY)
    kind = _code(term["type"]) if term else _code(GENERIC_TYPE)
    algorithm = hd.AlgorithmIdentificationSequence(name=MANUFACTURER, family=codes.cid7162.ArtificialIntelligence,
                                                   version=__version__)
    description = hd.seg.SegmentDescription(
        segment_number=number, segment_label=segment_label, segmented_property_category=category,
        segmented_property_type=kind, algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=algorithm)
    if term and term.get("typeModifier"):
        scheme, value, meaning = term["typeModifier"]
        description.SegmentedPropertyTypeModifierCodeSequence = [
            hd.sr.CodedConcept(value=value, scheme_designator=scheme, meaning=meaning)]
    description.RecommendedDisplayCIELabValue = dicom_lab(color)
    return description


def build_seg(labels_zyx, organs, series, description="URSAM organs at risk"):
    """The SEG (a highdicom Segmentation) of a label map on ``series``' grid."""
    labels = np.asarray(labels_zyx)
    expected = (len(series.slices), series.rows, series.columns)
    if labels.shape != expected:
        raise URSAMError(f"label map of shape {labels.shape} is not on the DICOM series' grid {expected}",
                         series.folder)
    if not series.frame_of_reference_uid:
        raise URSAMError("the DICOM series has no Frame of Reference UID, which a segmentation must reference",
                         series.folder)
    numbers = np.zeros(labels.shape, np.uint8 if len(organs) < 256 else np.uint16)
    for number, (label, _) in enumerate(organs, start=1):
        numbers[labels == label] = number
    sources = [dcmread(s.path, stop_before_pixels=True) for s in series.slices]
    return hd.seg.Segmentation(
        source_images=sources, pixel_array=numbers, segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[segment_description(n, label, name, text) for n, ((label, name), text)
                              in enumerate(zip(organs, structure_names(organs)), start=1)],
        series_instance_uid=generate_uid(), series_number=SERIES_NUMBER, sop_instance_uid=generate_uid(),
        instance_number=1, manufacturer=MANUFACTURER, manufacturer_model_name=MANUFACTURER,
        software_versions=__version__, device_serial_number="0", series_description=description,
        # a result with no voxel at all still makes a valid object: every slice, empty
        omit_empty_frames=bool(numbers.any()))


def write_seg(labels_zyx, organs, series, path, description="URSAM organs at risk"):
    """Write the SEG of a label map on ``series``' grid to ``path``, atomically."""
    seg = build_seg(labels_zyx, organs, series, description)
    with atomic_path(path) as tmp:
        seg.save_as(str(tmp))
    return path
