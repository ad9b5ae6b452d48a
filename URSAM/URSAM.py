"""3D Slicer module URSAM: automatic organ segmentation with SAM and uncertainty rectification.

The computing lives in URSAMLib (no Slicer, no Qt); this file only wires Slicer to it.
"""
import os

import slicer
from slicer.ScriptedLoadableModule import (ScriptedLoadableModule, ScriptedLoadableModuleWidget,
                                           ScriptedLoadableModuleLogic, ScriptedLoadableModuleTest)


class URSAM(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "URSAM"
        self.parent.categories = ["Segmentation"]
        self.parent.dependencies = []
        self.parent.contributors = ["URSAM developers"]
        self.parent.helpText = (
            "Segments the organs of a CT automatically with the Segment Anything Model (SAM), "
            "prompted with several slightly shifted boxes, and shows an uncertainty map and an "
            "uncertainty-rectified segmentation for review.")
        self.parent.acknowledgementText = (
            "Implements UR-SAM (Zhang et al., Segment Anything Model with Uncertainty Rectification for "
            "Auto-Prompting Medical Image Segmentation). Uses SAM (Kirillov et al., Meta AI), MedSAM and "
            "LiteMedSAM (Ma et al.).")


class URSAMWidget(ScriptedLoadableModuleWidget):
    pass


class URSAMLogic(ScriptedLoadableModuleLogic):
    pass


class URSAMTest(ScriptedLoadableModuleTest):
    def runTest(self):
        self.setUp()
