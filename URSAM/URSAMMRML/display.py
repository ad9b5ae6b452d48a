"""How the outputs look: the uncertainty heat overlay with its colour legend, segment display, slice jumps."""
from __future__ import annotations

import math

import numpy as np
import slicer

from .geometry import arrayToMatrix

#: heat colour maps, preferred first (PET-Heat comes with Slicer's Colors module)
HEAT_COLOR_NODE_IDS = ("vtkMRMLPETProceduralColorNodePET-Heat", "vtkMRMLColorTableNodeFileInferno.txt",
                       "vtkMRMLColorTableNodeRainbow")
#: uncertainty (entropy, nats) below this is shown transparent, so the CT stays readable
OVERLAY_FLOOR = 0.02
OVERLAY_OPACITY = 0.5
MAX_ENTROPY = math.log(2.0)


def setScalarVolume(volumeNode, arrayZyx, ijkToRasArray):
    """Fill a scalar volume node with a copy of ``arrayZyx`` on the input grid."""
    volumeNode.SetIJKToRASMatrix(arrayToMatrix(ijkToRasArray))
    slicer.util.updateVolumeFromArray(volumeNode, np.ascontiguousarray(arrayZyx))
    return volumeNode


def colorLogic(appLogic=None):
    if appLogic is not None:
        logic = appLogic.GetModuleLogic("Colors")
        if logic is not None:
            return logic
    return None


def showUncertainty(scene, uncertaintyNode, inputVolumeNode, appLogic=None, sliceViews=True):
    """Heat colours over [0, log 2], near-zero transparent, a colour legend; foreground in the slice views."""
    if uncertaintyNode.GetDisplayNode() is None:
        uncertaintyNode.CreateDefaultDisplayNodes()
    display = uncertaintyNode.GetDisplayNode()
    for colorID in HEAT_COLOR_NODE_IDS:
        if scene.GetNodeByID(colorID) is not None:
            display.SetAndObserveColorNodeID(colorID)
            break
    display.AutoWindowLevelOff()
    display.SetWindowLevelMinMax(0.0, MAX_ENTROPY)
    display.SetThreshold(OVERLAY_FLOOR, MAX_ENTROPY + 1.0)
    display.ApplyThresholdOn()
    logic = colorLogic(appLogic)
    addLegend = logic.AddDefaultColorLegendDisplayNode if logic is not None \
        else slicer.vtkSlicerColorLogic.AddDefaultColorLegendDisplayNode
    legend = addLegend(uncertaintyNode)
    if legend is not None:
        legend.SetTitleText("Uncertainty (entropy)")
        legend.SetLabelFormat("%.2f")
        legend.SetVisibility(True)
    if sliceViews:
        for i in range(scene.GetNumberOfNodesByClass("vtkMRMLSliceCompositeNode")):
            composite = scene.GetNthNodeByClass(i, "vtkMRMLSliceCompositeNode")
            if not composite.GetBackgroundVolumeID():
                composite.SetBackgroundVolumeID(inputVolumeNode.GetID())
            composite.SetForegroundVolumeID(uncertaintyNode.GetID())
            composite.SetForegroundOpacity(OVERLAY_OPACITY)
    return legend


def showSegmentation(segmentationNode, visible=True, fill=0.5, outlineOnly=False):
    if segmentationNode.GetDisplayNode() is None:
        segmentationNode.CreateDefaultDisplayNodes()
    display = segmentationNode.GetDisplayNode()
    display.SetVisibility(visible)
    display.SetOpacity2DFill(0.0 if outlineOnly else fill)
    display.SetOpacity2DOutline(1.0)


def jumpSlices(scene, rasWorld):
    """Centre every slice view on a point (world RAS)."""
    r, a, s = (float(v) for v in rasWorld[:3])
    slicer.vtkMRMLSliceNode.JumpAllSlices(scene, r, a, s, slicer.vtkMRMLSliceNode.CenteredJumpSlice)
