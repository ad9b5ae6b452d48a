"""A real MRML scene set up as Slicer sets it up at start-up (PyPI slicer-core; nothing mocked).

An application logic; the Colors, Subject Hierarchy and Segmentations module
logics attached to the scene and to the application logic (segmentation
conversions need the latter); the three slice views' slice and composite nodes.
"""
import hashlib

import numpy as np
import slicer

from URSAMMRML import geometry, segmentations


class SlicerApp:
    """A headless stand-in for Slicer's start-up: the logics real Slicer creates, on a real scene."""

    def __init__(self):
        self.scene = slicer.vtkMRMLScene()
        self.appLogic = slicer.vtkSlicerApplicationLogic()
        self.appLogic.SetMRMLScene(self.scene)
        self.logics = {}
        for name, cls in (("Colors", slicer.vtkSlicerColorLogic),
                          ("SubjectHierarchy", slicer.vtkSlicerSubjectHierarchyModuleLogic),
                          ("Segmentations", slicer.vtkSlicerSegmentationsModuleLogic)):
            logic = cls()
            logic.SetMRMLApplicationLogic(self.appLogic)
            logic.SetMRMLScene(self.scene)
            self.appLogic.SetModuleLogic(name, logic)
            self.logics[name] = logic
        for view in ("Red", "Yellow", "Green"):
            sliceNode = slicer.vtkMRMLSliceNode()
            sliceNode.SetName(view)
            sliceNode.SetLayoutName(view)
            sliceNode.SetSingletonTag(view)
            self.scene.AddNode(sliceNode)
            composite = slicer.vtkMRMLSliceCompositeNode()
            composite.SetLayoutName(view)
            composite.SetSingletonTag(view)
            self.scene.AddNode(composite)

    def loadVolume(self, path, name):
        """Read a file into a scalar volume node with Slicer's own reader (vtkMRMLVolumeArchetypeStorageNode)."""
        volume = self.scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
        storage = self.scene.AddNewNodeByClass("vtkMRMLVolumeArchetypeStorageNode")
        storage.SetFileName(str(path))
        if not storage.ReadData(volume):
            raise RuntimeError(f"could not read {path}")
        volume.SetAndObserveStorageNodeID(storage.GetID())
        volume.CreateDefaultDisplayNodes()
        return volume

    def nodeIDs(self):
        return sorted(self.scene.GetNthNode(i).GetID() for i in range(self.scene.GetNumberOfNodes()))


def voxel_hash(volumeNode):
    array = slicer.util.arrayFromVolume(volumeNode)
    return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()


def full_mask(node, organ, volume):
    """An organ's segment as a boolean array over the whole volume's grid (whatever transforms they sit under)."""
    shape = slicer.util.arrayFromVolume(volume).shape
    segment_id = segmentations.findOrganSegment(node, organ)
    assert segment_id is not None, f"{node.GetName()} has no segment of {organ}"
    grid = geometry.ijkToFrameOf(geometry.ijkToRas(volume), geometry.worldToLocal(volume), node)
    return segmentations.segmentMask(node, segment_id, grid, tuple(slice(0, s) for s in shape))
