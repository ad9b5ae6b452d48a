"""Slicer volume nodes and ROIs <-> the engine's grid.

Slicer places voxels with IJKToRAS; the engine uses SimpleITK images (LPS:
LPS = diag(-1, -1, 1) RAS) and arrays [z, y, x]. Slicer's voxel array is
[k, j, i], which is the same [z, y, x], so arrays pass unchanged and only the
physical frame is converted. Box corners are voxel indices [i, j, k] of the
input volume, inclusive (``URSAMLib.boxes.OrganBox``).

A volume under a linear parent transform is handled in its own (local)
frame: outputs are placed under the same transform, and ROIs are mapped from
world coordinates into that frame.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import SimpleITK as sitk
import slicer
import vtk

from URSAMLib.boxes import OrganBox, clip_box
from URSAMLib.errors import URSAMError
from URSAMLib.outputs import ijk_to_lps

RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])


def matrixToArray(matrix):
    return np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)], dtype=float)


def arrayToMatrix(array):
    matrix = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            matrix.SetElement(r, c, float(array[r][c]))
    return matrix


def ijkToRas(volumeNode):
    matrix = vtk.vtkMatrix4x4()
    volumeNode.GetIJKToRASMatrix(matrix)
    return matrixToArray(matrix)


def lpsGeometry(ijkToRasArray):
    """(spacing, origin, direction) of SimpleITK for a Slicer IJKToRAS matrix."""
    ijkToLps = RAS_TO_LPS @ np.asarray(ijkToRasArray, dtype=float)
    spacing = np.linalg.norm(ijkToLps[:3, :3], axis=0)
    direction = ijkToLps[:3, :3] / spacing
    return tuple(float(s) for s in spacing), tuple(float(o) for o in ijkToLps[:3, 3]), \
        tuple(float(d) for d in direction.ravel())


def ijkToRasFromImage(image):
    """The IJKToRAS matrix of a SimpleITK image (inverse of :func:`lpsGeometry`)."""
    return RAS_TO_LPS @ ijk_to_lps(image)  # the flip is its own inverse


def sitkImage(arrayZyx, ijkToRasArray):
    """A SimpleITK image of ``arrayZyx`` on the volume's grid (the array is copied)."""
    image = sitk.GetImageFromArray(arrayZyx)
    spacing, origin, direction = lpsGeometry(ijkToRasArray)
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    image.SetDirection(direction)
    return image


def worldToLocal(node):
    """4x4 array from world RAS to the node's own frame (identity without a parent transform)."""
    parent = node.GetParentTransformNode()
    if parent is None:
        return np.eye(4)
    matrix = vtk.vtkMatrix4x4()
    if not slicer.vtkMRMLTransformNode.GetMatrixTransformBetweenNodes(None, parent, matrix):
        raise URSAMError(f"'{node.GetName()}' is under a non-linear transform ({parent.GetName()}); "
                         "harden the transform first (Data module, right-click, Harden transform)")
    return matrixToArray(matrix)


def ijkToFrameOf(ijkToRasArray, volumeWorldToLocal, node):
    """The IJKToRAS of a volume's grid in ``node``'s own frame.

    ``ijkToRasArray`` and ``volumeWorldToLocal`` are the volume's (its local
    frame); the two nodes may sit under different linear transforms, e.g. a
    segmentation drawn in world space over a transformed CT.
    """
    return worldToLocal(node) @ np.linalg.inv(volumeWorldToLocal) @ np.asarray(ijkToRasArray, dtype=float)


@dataclass
class VolumeSnapshot:
    """What the engine needs of an input volume, copied on the main thread.

    The compute step reads only this, never the node, and the input node is
    never written to: ``array`` is a float32 copy.
    """
    nodeID: str
    name: str
    array: np.ndarray
    ijkToRas: np.ndarray
    worldToLocal: np.ndarray
    transformNodeID: str = None
    #: the scene, to find the input again when the results are written (never used off the main thread)
    scene: object = field(default=None, repr=False)

    @property
    def sizeXyz(self):
        return tuple(int(s) for s in self.array.shape[::-1])

    @property
    def rasToIjk(self):
        return np.linalg.inv(self.ijkToRas)

    def reference(self):
        """The engine's reference image: the grid as an empty UInt8 image (as ``imageio.read_ct``)."""
        ref = sitk.Image([int(s) for s in self.sizeXyz], sitk.sitkUInt8)
        spacing, origin, direction = lpsGeometry(self.ijkToRas)
        ref.SetSpacing(spacing)
        ref.SetOrigin(origin)
        ref.SetDirection(direction)
        return ref

    def image(self):
        """The CT as a float32 SimpleITK image in HU (what the localizer reads)."""
        return sitkImage(self.array, self.ijkToRas)


def snapshotVolume(volumeNode):
    """Check the input volume and copy what a run needs. Raises URSAMError naming the volume."""
    if volumeNode is None:
        raise URSAMError("no input volume is selected")
    name = volumeNode.GetName()
    if not volumeNode.IsA("vtkMRMLScalarVolumeNode") or volumeNode.IsA("vtkMRMLLabelMapVolumeNode"):
        raise URSAMError(f"input '{name}' is not a scalar CT volume (label maps and vector volumes cannot be segmented)")
    imageData = volumeNode.GetImageData()
    if imageData is None:
        raise URSAMError(f"input volume '{name}' has no voxels")
    if imageData.GetNumberOfScalarComponents() != 1:
        raise URSAMError(f"input volume '{name}' has {imageData.GetNumberOfScalarComponents()} components per voxel; "
                         "a scalar 3D CT is needed")
    dims = imageData.GetDimensions()
    if min(dims) < 2:
        raise URSAMError(f"input volume '{name}' has size {tuple(dims)}; "
                         "at least 2 voxels along every axis are needed (a 3D CT)")
    array = slicer.util.arrayFromVolume(volumeNode)
    data = np.array(array, dtype=np.float32, copy=True)
    if not np.isfinite(data).all():
        raise URSAMError(f"input volume '{name}' has NaN or infinite voxels")
    if float(data.max()) == float(data.min()):
        raise URSAMError(f"input volume '{name}' is constant (every voxel has the same value)")
    return VolumeSnapshot(volumeNode.GetID(), name, data, ijkToRas(volumeNode), worldToLocal(volumeNode),
                          volumeNode.GetTransformNodeID(), volumeNode.GetScene())


def roiCornersWorld(roiNode):
    """The 8 corners of an ROI in world RAS, as a (8, 4) array of homogeneous points."""
    radius = [0.0, 0.0, 0.0]
    roiNode.GetRadiusXYZ(radius)
    signs = np.array([[sx, sy, sz] for sx in (-1, 1) for sy in (-1, 1) for sz in (-1, 1)], dtype=float)
    corners = np.hstack([signs * np.array(radius), np.ones((8, 1))])
    objectToWorld = matrixToArray(roiNode.GetObjectToWorldMatrix())
    return corners @ objectToWorld.T


def boxFromRoi(roiNode, snapshot, label, name=None, warn=None):
    """The voxel box of the input volume whose voxel centres lie in the ROI's bounding box.

    A rotated ROI gives its axis-aligned hull in voxel space. Raises URSAMError if
    the ROI lies outside the volume; clips (with a warning) if partly outside.
    """
    name = name or roiNode.GetName()
    if roiNode.GetNumberOfControlPoints() < 1:
        raise URSAMError(f"ROI '{roiNode.GetName()}' is not placed yet (it has no centre)")
    corners = roiCornersWorld(roiNode)
    ijk = corners @ (snapshot.rasToIjk @ snapshot.worldToLocal).T
    lo_c, hi_c = ijk[:, :3].min(axis=0), ijk[:, :3].max(axis=0)
    lo = np.ceil(lo_c - 1e-3).astype(int)
    hi = np.floor(hi_c + 1e-3).astype(int)
    # An ROI thinner than a voxel still selects the voxel it sits in.
    thin = lo > hi
    centre = np.round((lo_c + hi_c) / 2.0).astype(int)
    lo[thin] = centre[thin]
    hi[thin] = centre[thin]
    box = OrganBox(int(label), name, [int(v) for v in lo], [int(v) for v in hi],
                   [f"from ROI '{roiNode.GetName()}'"])
    try:
        return clip_box(box, snapshot.sizeXyz, warn=warn)
    except URSAMError:
        raise URSAMError(f"ROI '{roiNode.GetName()}' lies outside the input volume '{snapshot.name}'") from None


def roiPlacement(box, ijkToRasArray):
    """(objectToNode 4x4 array, radius in mm) of the ROI that covers ``box`` voxel edge to edge.

    The ROI's axes follow the volume's voxel axes, so a box read back with
    :func:`boxFromRoi` is the same box, also for oblique volumes.
    """
    m = np.asarray(ijkToRasArray, dtype=float)
    lo, hi = np.array(box.min_ijk, float), np.array(box.max_ijk, float)
    centre = m @ np.append((lo + hi) / 2.0, 1.0)
    spacing = np.linalg.norm(m[:3, :3], axis=0)
    axes = m[:3, :3] / spacing
    if np.linalg.det(axes) < 0:
        axes[:, 2] = -axes[:, 2]  # a rotation, not a reflection; the box is symmetric
    objectToNode = np.eye(4)
    objectToNode[:3, :3] = axes
    objectToNode[:3, 3] = centre[:3]
    radius = (hi - lo + 1.0) * spacing / 2.0
    return objectToNode, radius


def placeRoi(roi, box, ijkToRasArray):
    """``roi`` (a ``vtkMRMLMarkupsROINode``) set to cover ``box`` (:func:`roiPlacement`), in one modification."""
    objectToNode, radius = roiPlacement(box, ijkToRasArray)
    wasModified = roi.StartModify()
    roi.SetAndObserveObjectToNodeMatrix(arrayToMatrix(objectToNode))
    roi.SetRadiusXYZ(*[float(r) for r in radius])
    roi.EndModify(wasModified)
    return roi
