"""Export RT structure set from Slicer: without SlicerRT one clear message and no change; names as the engine's."""
import pytest
import SimpleITK as sitk
import slicer
import vtk

from URSAMMRML import dicomexport, geometry, segmentations

ORGANS = [(1, "liver"), (2, "kidney_right"), (13, "kidney_left"), (7, "adrenal_gland_right")]


@pytest.fixture
def scene_with_result(app, crop_paths):
    image_path, labels_path = crop_paths
    volume = app.loadVolume(image_path, "CT")
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(labels_path)))
    node = app.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "URSAM result")
    segmentations.setSegmentsFromLabelmap(node, labels, ORGANS, geometry.ijkToRas(volume), volume)
    return app, volume, node


def _hierarchy(scene):
    shNode = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    children = vtk.vtkIdList()
    shNode.GetItemChildren(shNode.GetSceneItemID(), children, True)
    return [(children.GetId(i), shNode.GetItemParent(children.GetId(i))) for i in range(children.GetNumberOfIds())]


def test_without_slicerrt_one_message_says_how_to_get_it_and_nothing_changes(scene_with_result, tmp_path):
    app, volume, node = scene_with_result
    before = _hierarchy(app.scene)
    with pytest.raises(dicomexport.SlicerRtMissingError) as err:
        dicomexport.exportRtStructureSet(node, volume, tmp_path / "rt")
    message = str(err.value)
    assert "SlicerRT" in message and "Extensions Manager" in message and "\n" not in message
    assert _hierarchy(app.scene) == before
    assert not (tmp_path / "rt").exists()


def test_segments_carry_the_structure_names_while_exporting_and_their_own_after(scene_with_result):
    _, _, node = scene_with_result
    segmentation = node.GetSegmentation()
    own = [segmentation.GetNthSegment(i).GetName() for i in range(segmentation.GetNumberOfSegments())]
    with dicomexport.structureNames(node) as names:
        assert names == ["Liver", "Kidney_R", "Kidney_L", "Glnd_Adrenal_R"]
        assert [segmentation.GetNthSegment(i).GetName() for i in range(len(own))] == names
    assert [segmentation.GetNthSegment(i).GetName() for i in range(len(own))] == own


def test_the_export_tags_come_from_the_subject_hierarchy(scene_with_result):
    app, volume, _ = scene_with_result
    shNode = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(app.scene)
    patient = shNode.CreateSubjectItem(shNode.GetSceneItemID(), "Anonymous")
    study = shNode.CreateStudyItem(patient, "CT study")
    shNode.SetItemAttribute(patient, "DICOM.PatientID", "P-123")
    shNode.SetItemAttribute(study, "DICOM.StudyInstanceUID", "1.2.3.4")
    shNode.SetItemParent(shNode.GetItemByDataNode(volume), study)
    tags = dicomexport.dicomTags(shNode, study)
    assert tags["PatientID"] == "P-123" and tags["StudyInstanceUID"] == "1.2.3.4"
    assert tags["PatientName"] == "Anonymous" and tags["StudyID"] == "CT study"
    assert sorted(tags) == sorted(["PatientName", "PatientID", "PatientSex", "PatientBirthDate", "PatientComments",
                                   "StudyInstanceUID", "StudyID", "StudyDescription", "StudyDate", "StudyTime"])
