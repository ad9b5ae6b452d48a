"""Label maps <-> segmentation nodes, segment edits, and the content hash that detects user edits.

Segments of one output share one binary labelmap layer (one label value per
organ), as Slicer's own importers make them, so the Segment Editor treats
them as non-overlapping organs. The segment ID is the organ's library name
(stable for scripts); the segment name and colour come from the standard
terminology where one exists (``URSAMLib.terminology``).
"""
from __future__ import annotations

import hashlib

import numpy as np
import slicer
import vtk
from vtk.util import numpy_support

from URSAMLib import terminology

from .geometry import arrayToMatrix, matrixToArray

BINARY_LABELMAP = "Binary labelmap"
#: segment tags that link a segment to its organ
ORGAN_NAME_TAG = "URSAM.organName"
ORGAN_LABEL_TAG = "URSAM.organLabel"

_VTK_TYPES = {np.dtype(np.uint8): vtk.VTK_UNSIGNED_CHAR, np.dtype(np.uint16): vtk.VTK_UNSIGNED_SHORT,
              np.dtype(np.int16): vtk.VTK_SHORT, np.dtype(np.int32): vtk.VTK_INT,
              np.dtype(np.float32): vtk.VTK_FLOAT}


def orientedImage(arrayZyx, ijkToRasArray, offsetZyx=(0, 0, 0)):
    """A vtkOrientedImageData holding a copy of ``arrayZyx``, placed at voxel ``offsetZyx`` of the grid."""
    array = np.ascontiguousarray(arrayZyx)
    image = slicer.vtkOrientedImageData()
    z0, y0, x0 = (int(v) for v in offsetZyx)
    nz, ny, nx = array.shape
    image.SetExtent(x0, x0 + nx - 1, y0, y0 + ny - 1, z0, z0 + nz - 1)
    image.AllocateScalars(_VTK_TYPES[array.dtype], 1)
    numpy_support.vtk_to_numpy(image.GetPointData().GetScalars())[:] = array.ravel()
    image.SetImageToWorldMatrix(arrayToMatrix(ijkToRasArray))
    return image


def orientedImageArray(image):
    """``(array [z, y, x] view, offset (z, y, x))`` of a vtkOrientedImageData (empty extents give None)."""
    x0, x1, y0, y1, z0, z1 = image.GetExtent()
    if x1 < x0 or y1 < y0 or z1 < z0 or image.GetPointData().GetScalars() is None:
        return None, (z0, y0, x0)
    flat = numpy_support.vtk_to_numpy(image.GetPointData().GetScalars())
    return flat.reshape(z1 - z0 + 1, y1 - y0 + 1, x1 - x0 + 1), (z0, y0, x0)


def imageToWorld(image):
    matrix = vtk.vtkMatrix4x4()
    image.GetImageToWorldMatrix(matrix)
    return matrixToArray(matrix)


def terminologyString(term):
    """Slicer's serialized terminology entry for a ``URSAMLib.terminology`` dict."""
    def code(triple):
        return "^".join(triple) if triple else "^^"

    return "~".join([term["contextName"], code(term["category"]), code(term["type"]),
                     code(term.get("typeModifier")), term["anatomicContextName"], "^^", "^^"])


def setSourceRepresentationToBinaryLabelmap(segmentationNode):
    # Slicer 5.4 renamed "master" to "source"; 5.6 has both, later versions may drop "master".
    if hasattr(segmentationNode, "SetSourceRepresentationToBinaryLabelmap"):
        segmentationNode.SetSourceRepresentationToBinaryLabelmap()
    else:
        segmentationNode.SetMasterRepresentationToBinaryLabelmap()


def _cropBounds(mask):
    """(z, y, x) slices of the non-zero part of ``mask``, or None."""
    if not mask.any():
        return None
    bounds = []
    for axis in range(3):
        other = tuple(a for a in range(3) if a != axis)
        nz = np.flatnonzero(mask.any(axis=other))
        bounds.append(slice(int(nz[0]), int(nz[-1]) + 1))
    return tuple(bounds)


def setSegmentsFromLabelmap(segmentationNode, labelsZyx, organs, ijkToRasArray, referenceVolumeNode=None):
    """Replace all segments of ``segmentationNode`` with one segment per ``(label, name)`` organ.

    Organs absent from ``labelsZyx`` still get an (empty) segment, so the user can
    draw them. The shared labelmap is cropped to the labelled voxels; the
    segmentation's reference geometry is the whole input grid.
    """
    labels = np.asarray(labelsZyx)
    dtype = np.uint8 if labels.max(initial=0) < 256 else np.uint16
    bounds = _cropBounds(labels)
    if bounds is None:
        crop, offset = np.zeros((1, 1, 1), dtype), (0, 0, 0)
    else:
        crop, offset = labels[bounds].astype(dtype), tuple(s.start for s in bounds)
    image = orientedImage(crop, ijkToRasArray, offset)
    wasModified = segmentationNode.StartModify()
    try:
        if referenceVolumeNode is not None:
            segmentationNode.SetReferenceImageGeometryParameterFromVolumeNode(referenceVolumeNode)
        setSourceRepresentationToBinaryLabelmap(segmentationNode)
        segmentation = segmentationNode.GetSegmentation()
        segmentation.RemoveAllSegments()
        for label, name in organs:
            display, color, term = terminology.lookup(name, label)
            segment = slicer.vtkSegment()
            segment.SetName(display)
            segment.SetColor(*color)
            segment.SetLabelValue(int(label))
            segment.AddRepresentation(BINARY_LABELMAP, image)
            segment.SetTag(ORGAN_NAME_TAG, str(name))
            segment.SetTag(ORGAN_LABEL_TAG, str(int(label)))
            if term:
                segment.SetTag(slicer.vtkSegment.GetTerminologyEntryTagName(), terminologyString(term))
            segmentation.AddSegment(segment, segmentIdForOrgan(name))
    finally:
        segmentationNode.EndModify(wasModified)
    if segmentationNode.GetDisplayNode() is None:
        segmentationNode.CreateDefaultDisplayNodes()
    return segmentationNode


def segmentIdForOrgan(name):
    return str(name)


def segmentTag(segment, tag):
    """A segment's tag value, or "" if it has none."""
    value = vtk.mutable("")
    return str(value) if segment.GetTag(tag, value) else ""


def organNameOfSegment(segment, segmentId):
    """The organ a segment stands for: URSAM's tag, else the segment's name."""
    return segmentTag(segment, ORGAN_NAME_TAG) or segment.GetName() or segmentId


def findOrganSegment(segmentationNode, organName):
    """The segment ID of an organ: by its tag, else by ID, else by name; None if absent."""
    segmentation = segmentationNode.GetSegmentation()
    for i in range(segmentation.GetNumberOfSegments()):
        segmentId = segmentation.GetNthSegmentID(i)
        if segmentTag(segmentation.GetSegment(segmentId), ORGAN_NAME_TAG) == organName:
            return segmentId
    if segmentation.GetSegment(segmentIdForOrgan(organName)) is not None:
        return segmentIdForOrgan(organName)
    found = segmentation.GetSegmentIdBySegmentName(organName)
    return found or None


def segmentMask(segmentationNode, segmentId, ijkToRasArray, region):
    """Boolean mask [z, y, x] of one segment over ``region`` ((z, y, x) slices) of the input grid.

    ``ijkToRasArray`` places the grid in the segmentation node's own frame
    (:func:`URSAMMRML.geometry.ijkToFrameOf`; the volume's IJKToRAS where both
    sit under the same transform). Works whatever geometry the segment's
    labelmap has now (the user may have edited it with another source
    volume): it is resampled (nearest voxel) onto the region.
    """
    shape = tuple(s.stop - s.start for s in region)
    offset = tuple(s.start for s in region)
    segment = segmentationNode.GetSegmentation().GetSegment(segmentId)
    if segment is None:
        return np.zeros(shape, bool)
    segmentImage = slicer.vtkOrientedImageData()
    # in the node's own frame, where the grid is given: the default (True) resamples it into world RAS
    ok = slicer.vtkSlicerSegmentationsModuleLogic.GetSegmentBinaryLabelmapRepresentation(
        segmentationNode, segmentId, segmentImage, False)
    if not ok:
        return np.zeros(shape, bool)
    reference = orientedImage(np.zeros(shape, np.uint8), ijkToRasArray, offset)
    resampled = slicer.vtkOrientedImageData()
    slicer.vtkOrientedImageDataResample.ResampleOrientedImageToReferenceOrientedImage(
        segmentImage, reference, resampled, False, True)
    array, got = orientedImageArray(resampled)
    out = np.zeros(shape, bool)
    if array is None:
        return out
    # The resampled image may cover only part of the region: paste it where it overlaps.
    src, dst = [], []
    for a in range(3):
        lo = max(got[a], offset[a])
        hi = min(got[a] + array.shape[a], offset[a] + shape[a])
        if hi <= lo:
            return out
        src.append(slice(lo - got[a], hi - got[a]))
        dst.append(slice(lo - offset[a], hi - offset[a]))
    # A shared layer holds every segment of the layer, each with its own label value.
    out[tuple(dst)] = array[tuple(src)] == segment.GetLabelValue()
    return out


def segmentBoundsInGrid(segmentationNode, segmentId, ijkToRasArray, shapeZyx):
    """(z, y, x) slices of the input grid that contain the segment's voxels, or None if it is empty."""
    segment = segmentationNode.GetSegmentation().GetSegment(segmentId)
    image = slicer.vtkOrientedImageData()
    if segment is None or not slicer.vtkSlicerSegmentationsModuleLogic.GetSegmentBinaryLabelmapRepresentation(
            segmentationNode, segmentId, image, False):
        return None
    array, offset = orientedImageArray(image)
    if array is None:
        return None
    bounds = _cropBounds(array == segment.GetLabelValue())
    if bounds is None:
        return None
    corners = np.array([[offset[2] + x, offset[1] + y, offset[0] + z, 1.0]
                        for z in (bounds[0].start - 0.5, bounds[0].stop - 0.5)
                        for y in (bounds[1].start - 0.5, bounds[1].stop - 0.5)
                        for x in (bounds[2].start - 0.5, bounds[2].stop - 0.5)])
    ijk = corners @ (np.linalg.inv(ijkToRasArray) @ imageToWorld(image)).T
    lo = np.floor(ijk[:, :3].min(axis=0)).astype(int)
    hi = np.ceil(ijk[:, :3].max(axis=0)).astype(int)
    out = []
    for axis_xyz in (2, 1, 0):
        size = shapeZyx[2 - axis_xyz]
        a, b = max(0, lo[axis_xyz]), min(size, hi[axis_xyz] + 1)
        if b <= a:
            return None
        out.append(slice(int(a), int(b)))
    return tuple(out)


def modifySegmentRegion(segmentationNode, segmentId, maskZyx, offsetZyx, ijkToRasArray, shapeZyx, add):
    """Add (``add=True``) or remove the voxels of ``maskZyx`` to/from one segment; the rest is unchanged.

    The segment is rewritten whole (Slicer's replace mode) over the union of its
    current bounds and the mask: merge modes write raw label values into a
    shared layer, which would paint another segment's label.
    """
    mask = np.asarray(maskZyx, bool)
    region = tuple(slice(int(o), int(o) + n) for o, n in zip(offsetZyx, mask.shape))
    current = segmentBoundsInGrid(segmentationNode, segmentId, ijkToRasArray, shapeZyx)
    if current is not None:
        region = tuple(slice(min(a.start, b.start), max(a.stop, b.stop)) for a, b in zip(region, current))
    values = segmentMask(segmentationNode, segmentId, ijkToRasArray, region)
    inner = tuple(slice(int(o) - r.start, int(o) - r.start + n) for o, r, n in zip(offsetZyx, region, mask.shape))
    if add:
        values[inner] |= mask
    else:
        values[inner] &= ~mask
    image = orientedImage(values.astype(np.uint8), ijkToRasArray, tuple(r.start for r in region))
    if not slicer.vtkSlicerSegmentationsModuleLogic.SetBinaryLabelmapToSegment(
            image, segmentationNode, segmentId, slicer.vtkSlicerSegmentationsModuleLogic.MODE_REPLACE,
            image.GetExtent()):
        raise RuntimeError(f"could not modify segment '{segmentId}' of '{segmentationNode.GetName()}'")


def contentHash(segmentationNode):
    """A digest of what the user sees and edits: segment IDs, names, colours, and each segment's voxels.

    It ignores how the voxels are stored (extent, layers, scalar type), so
    Slicer's internal re-packing does not count as an edit; any painted or
    erased voxel, renamed or recoloured segment does.
    """
    digest = hashlib.sha256()
    segmentation = segmentationNode.GetSegmentation()
    for i in range(segmentation.GetNumberOfSegments()):
        segmentId = segmentation.GetNthSegmentID(i)
        segment = segmentation.GetSegment(segmentId)
        color = ",".join(f"{c:.4f}" for c in segment.GetColor())
        digest.update(f"{segmentId}|{segment.GetName()}|{color}|".encode())
        representation = segment.GetRepresentation(BINARY_LABELMAP)
        if representation is None:
            digest.update(b"no binary labelmap")
            continue
        array, offset = orientedImageArray(representation)
        if array is None:
            digest.update(b"empty")
            continue
        mask = array == segment.GetLabelValue()
        bounds = _cropBounds(mask)
        if bounds is None:
            digest.update(b"empty")
            continue
        start = [offset[a] + bounds[a].start for a in range(3)]
        geometry = np.round(imageToWorld(representation), 6)
        digest.update(np.asarray(start, np.int64).tobytes())
        digest.update(np.asarray(mask[bounds].shape, np.int64).tobytes())
        digest.update(geometry.tobytes())
        digest.update(np.packbits(mask[bounds]).tobytes())
    return digest.hexdigest()
