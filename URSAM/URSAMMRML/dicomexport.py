"""Export a segmentation as a DICOM RT Structure Set from Slicer, through SlicerRT's exporter (no Qt).

Slicer writes RT Structure Sets only with the SlicerRT extension: its DICOM
plugin ``DicomRtImportExportPlugin`` hands the reference volume and the
segmentation to ``vtkSlicerDicomRtImportExportModuleLogic.ExportDicomRTStudy``,
which writes the CT series and a structure set that references it (the
scripted use of Slicer's DICOM export: ``examineForExport`` on each subject
hierarchy item, the output folder and the patient and study tags on each
exportable, then ``export``). Both must sit under one study in the subject
hierarchy; a volume that has none (loaded from a NIfTI file) gets a patient and
a study named after it. While the exporter runs, each URSAM segment carries its
structure name (AAPM TG-263, :mod:`URSAMLib.dicom.names`, the names ``ursam
segment --dicom-out`` writes), and its own name again afterwards.

Without SlicerRT, :func:`exportRtStructureSet` raises
:class:`SlicerRtMissingError` saying how to get it, before it changes anything.
"""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import slicer

from URSAMLib.dicom.names import structure_names

from .segmentations import ORGAN_LABEL_TAG, organNameOfSegment, segmentTag

SLICERRT_MISSING = ("Exporting an RT structure set needs the SlicerRT extension, which is not installed: install it "
                    "from View > Extensions Manager (search for SlicerRT), then restart Slicer.")
DEFAULT_DESCRIPTION = "URSAM organs at risk"


class SlicerRtMissingError(RuntimeError):
    """SlicerRT is not installed; the message says how to install it."""


def slicerRtExporter():
    """SlicerRT's DICOM RT export plugin, or :class:`SlicerRtMissingError`."""
    modules = getattr(slicer, "modules", None)
    if modules is None or not hasattr(modules, "dicomrtimportexport"):
        raise SlicerRtMissingError(SLICERRT_MISSING)
    try:
        import DicomRtImportExportPlugin  # noqa: PLC0415 (optional package; SlicerRT's scripted module, on sys.path where the extension is loaded)
    except ImportError:
        raise SlicerRtMissingError(SLICERRT_MISSING) from None
    return DicomRtImportExportPlugin.DicomRtImportExportPluginClass()


def _studyItem(shNode, volumeItem, name):
    """The study the volume sits under; one (and a patient) is made where it has none."""
    constants = slicer.vtkMRMLSubjectHierarchyConstants
    studyItem = shNode.GetItemAncestorAtLevel(volumeItem, constants.GetDICOMLevelStudy())
    if studyItem:
        return studyItem
    patientItem = shNode.CreateSubjectItem(shNode.GetSceneItemID(), name)
    studyItem = shNode.CreateStudyItem(patientItem, name)
    shNode.SetItemParent(volumeItem, studyItem)
    return studyItem


def dicomTags(shNode, studyItem):
    """The patient and study tags of an export, from the subject hierarchy's DICOM attributes (as Slicer's DICOM
    export dialog fills them); an item without them gives its own name as PatientName, PatientID and StudyID."""
    constants = slicer.vtkMRMLSubjectHierarchyConstants
    prefix = constants.GetDICOMAttributePrefix()
    patientItem = shNode.GetItemParent(studyItem)
    tags = {}
    for item, names in ((patientItem, constants.GetDICOMPatientTagNames()),
                        (studyItem, constants.GetDICOMStudyTagNames())):
        for tag in names:
            tags[tag] = shNode.GetItemAttribute(item, prefix + tag) or ""
    for tag, item in (("PatientName", patientItem), ("PatientID", patientItem), ("StudyID", studyItem)):
        tags[tag] = tags[tag] or shNode.GetItemName(item)
    return tags


@contextmanager
def structureNames(segmentationNode):
    """Segments named as structures for the time of the export: URSAM's organ segments (those tagged with a
    label) by the TG-263 table, the others as they are."""
    segmentation = segmentationNode.GetSegmentation()
    segments = [segmentation.GetSegment(segmentation.GetNthSegmentID(i))
                for i in range(segmentation.GetNumberOfSegments())]
    own = [s.GetName() for s in segments]
    tagged = [i for i, s in enumerate(segments) if segmentTag(s, ORGAN_LABEL_TAG)]
    organs = [(int(segmentTag(segments[i], ORGAN_LABEL_TAG)), organNameOfSegment(segments[i], own[i]))
              for i in tagged]
    try:
        for i, name in zip(tagged, structure_names(organs)):
            segments[i].SetName(name)
        yield [s.GetName() for s in segments]
    finally:
        for segment, name in zip(segments, own):
            segment.SetName(name)


def exportRtStructureSet(segmentationNode, referenceVolumeNode, outputFolder, description=DEFAULT_DESCRIPTION):
    """Write the reference CT and ``segmentationNode`` as a DICOM CT series and RT Structure Set into
    ``outputFolder`` with SlicerRT's exporter. Returns the folder; raises :class:`SlicerRtMissingError` without
    SlicerRT and RuntimeError with the exporter's message where it fails."""
    exporter = slicerRtExporter()
    scene = segmentationNode.GetScene()
    shNode = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    volumeItem = shNode.GetItemByDataNode(referenceVolumeNode)
    segmentationItem = shNode.GetItemByDataNode(segmentationNode)
    studyItem = _studyItem(shNode, volumeItem, referenceVolumeNode.GetName())
    shNode.SetItemParent(segmentationItem, studyItem)
    # the segmentation's geometry is the volume's: the exporter resamples segments onto the volume it writes
    segmentationNode.SetReferenceImageGeometryParameterFromVolumeNode(referenceVolumeNode)
    folder = Path(outputFolder)
    folder.mkdir(parents=True, exist_ok=True)
    tags = dicomTags(shNode, studyItem)
    with structureNames(segmentationNode):
        exportables = list(exporter.examineForExport(volumeItem)) + list(exporter.examineForExport(segmentationItem))
        for exportable in exportables:
            exportable.directory = str(folder)
            for tag, value in tags.items():
                exportable.setTag(tag, value)
            if exportable.subjectHierarchyItemID == segmentationItem:
                exportable.setTag("SeriesDescription", description)
        message = exporter.export(exportables)
    if message:
        raise RuntimeError(f"SlicerRT could not export the RT structure set: {message}")
    return folder
