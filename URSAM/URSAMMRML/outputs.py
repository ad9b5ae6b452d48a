"""The output nodes of one input volume, and the rules that keep the user's data safe.

Every node URSAM creates carries the attributes ``URSAM.role`` and
``URSAM.inputVolumeID``; a rerun finds its own nodes by them and reuses them
(in place, so display settings and references survive). It never touches a
node without them. A segmentation whose content changed since URSAM wrote it
(``URSAM.contentHash``) was edited by the user: a rerun leaves it alone,
marks it as kept, and writes a new node beside it.

The nodes of one input live in a subject-hierarchy folder named after it,
placed beside the input volume.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import vtk

from . import segmentations

ROLE = "URSAM.role"
INPUT = "URSAM.inputVolumeID"
HASH = "URSAM.contentHash"
KEPT_SUFFIX = "-kept"

#: role -> (node class, node name)
NODES = {
    "ensemble": ("vtkMRMLSegmentationNode", "UR-SAM ensemble"),
    "rectified": ("vtkMRMLSegmentationNode", "UR-SAM rectified"),
    "uncertainty": ("vtkMRMLScalarVolumeNode", "UR-SAM uncertainty"),
    "flagged": ("vtkMRMLSegmentationNode", "UR-SAM flagged"),
    "review": ("vtkMRMLTableNode", "UR-SAM review"),
    "statistics": ("vtkMRMLTableNode", "UR-SAM statistics"),
}
ROI_ROLE = "roi"
ORGAN_NAME = "URSAM.organName"
ORGAN_LABEL = "URSAM.organLabel"


@dataclass
class Outputs:
    """What a run wrote: the nodes by role, the folder item, and notes for the user."""
    folderItemID: int = 0
    nodes: dict = field(default_factory=dict)
    rois: list = field(default_factory=list)
    notes: list = field(default_factory=list)

    def __getattr__(self, role):
        nodes = self.__dict__.get("nodes", {})
        if role in nodes:
            return nodes[role]
        raise AttributeError(role)


def folderName(volumeName):
    return f"UR-SAM {volumeName}"


def outputFolder(scene, inputVolumeNode, create=True):
    """The subject-hierarchy folder of this input's outputs (created beside the input if missing)."""
    sh = scene.GetSubjectHierarchyNode()
    inputID = inputVolumeNode.GetID()
    children = vtk.vtkIdList()
    sh.GetItemChildren(sh.GetSceneItemID(), children, True)
    for item in (children.GetId(i) for i in range(children.GetNumberOfIds())):
        if sh.GetItemAttribute(item, INPUT) == inputID and sh.GetItemAttribute(item, ROLE) == "folder":
            return item
    if not create:
        return 0
    volumeItem = sh.GetItemByDataNode(inputVolumeNode)
    parent = sh.GetItemParent(volumeItem) if volumeItem else sh.GetSceneItemID()
    item = sh.CreateFolderItem(parent or sh.GetSceneItemID(), folderName(inputVolumeNode.GetName()))
    sh.SetItemAttribute(item, INPUT, inputID)
    sh.SetItemAttribute(item, ROLE, "folder")
    return item


def ownNodes(scene, inputID, role=None):
    """URSAM's nodes for this input (of one role, if given), in scene order."""
    found = []
    for i in range(scene.GetNumberOfNodes()):
        node = scene.GetNthNode(i)
        if node.GetAttribute(INPUT) != inputID:
            continue
        if role is None or node.GetAttribute(ROLE) == role:
            found.append(node)
    return found


def findOutput(scene, inputID, role):
    nodes = ownNodes(scene, inputID, role)
    return nodes[-1] if nodes else None


def wasEdited(node):
    """True if a segmentation's content differs from what URSAM last wrote (or was never recorded)."""
    stored = node.GetAttribute(HASH)
    return stored is None or stored != segmentations.contentHash(node)


def markWritten(node):
    node.SetAttribute(HASH, segmentations.contentHash(node))


def _placeInFolder(scene, node, folderItem, transformNodeID):
    sh = scene.GetSubjectHierarchyNode()
    item = sh.GetItemByDataNode(node)
    if not item:
        # Slicer's GUI makes the item when the node is added; without it (scripts, tests) make it here.
        item = sh.CreateItem(folderItem or sh.GetSceneItemID(), node)
    if item and folderItem:
        sh.SetItemParent(item, folderItem)
    if transformNodeID and node.IsA("vtkMRMLTransformableNode"):  # tables have no place in space
        node.SetAndObserveTransformNodeID(transformNodeID)


def obtainOutput(scene, inputVolumeNode, role, folderItem, created, notes):
    """The node to write ``role`` into: URSAM's current one, or a new one.

    A segmentation the user edited is kept: it is marked ``<role>-kept`` and a
    new node is made. New nodes are appended to ``created`` (so a failed write
    can remove them again).
    """
    inputID = inputVolumeNode.GetID()
    className, name = NODES[role]
    node = findOutput(scene, inputID, role)
    if node is not None and className == "vtkMRMLSegmentationNode" and wasEdited(node):
        node.SetAttribute(ROLE, role + KEPT_SUFFIX)
        notes.append(f"'{node.GetName()}' was edited since URSAM wrote it: it is kept as it is, "
                     f"and the new result is in a new node")
        node = None
    if node is not None:
        return node
    if scene.GetFirstNodeByName(name) is not None and ownNodes(scene, inputID, role + KEPT_SUFFIX):
        name = scene.GenerateUniqueName(name)
    node = scene.AddNewNodeByClass(className, name)
    node.SetAttribute(ROLE, role)
    node.SetAttribute(INPUT, inputID)
    created.append(node)
    _placeInFolder(scene, node, folderItem, inputVolumeNode.GetTransformNodeID())
    return node


def findRois(scene, inputID):
    """URSAM's ROIs of this input by organ name."""
    return {node.GetAttribute(ORGAN_NAME) or node.GetName(): node for node in ownNodes(scene, inputID, ROI_ROLE)}


def obtainRoi(scene, inputVolumeNode, organName, label, folderItem, created):
    """The ROI of one organ for this input: URSAM's existing one (moved by the caller) or a new one."""
    node = findRois(scene, inputVolumeNode.GetID()).get(organName)
    if node is None:
        node = scene.AddNewNodeByClass("vtkMRMLMarkupsROINode", organName)
        node.SetAttribute(ROLE, ROI_ROLE)
        node.SetAttribute(INPUT, inputVolumeNode.GetID())
        created.append(node)
        _placeInFolder(scene, node, folderItem, inputVolumeNode.GetTransformNodeID())
    node.SetAttribute(ORGAN_NAME, organName)
    node.SetAttribute(ORGAN_LABEL, str(int(label)))
    return node


def removeNodes(scene, nodes):
    """Remove nodes with their display and storage nodes (used to undo a failed write)."""
    for node in nodes:
        if node is None or node.GetScene() is not scene:
            continue
        extra = []
        for getCount, getNth in (("GetNumberOfDisplayNodes", "GetNthDisplayNode"),
                                 ("GetNumberOfStorageNodes", "GetNthStorageNode")):
            if hasattr(node, getCount):
                extra += [getattr(node, getNth)(i) for i in range(getattr(node, getCount)())]
        scene.RemoveNode(node)
        for other in extra:
            if other is not None and other.GetScene() is scene:
                scene.RemoveNode(other)
