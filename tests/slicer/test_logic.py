"""The headless Slicer logic on a real MRML scene (slicer-core) with a real CT and LiteMedSAM.

One LiteMedSAM run (2 organs, 2 slices of tsA_slab) is shared by the module;
tests that change nodes write that run into a fresh scene of their own.
"""
import math
import warnings
from dataclasses import replace

import numpy as np
import pytest
import slicer
from scipy import ndimage
from slicer_scene import SlicerApp, full_mask, voxel_hash

from URSAMLib.boxes import boxes_from_labels
from URSAMLib.errors import Cancelled, URSAMError
from URSAMLib.templates import Library
from URSAMMRML import geometry, outputs, review, segmentations
from URSAMMRML.logic import RunOptions, URSAMProcessLogic

ORGANS = {2: "kidney_right", 3: "spleen"}
SLICES = (12, 13)
ROLES = ("ensemble", "rectified", "uncertainty", "flagged", "review", "statistics")


def make_rois(scene, volume, label_volume):
    """One ROI per organ, named after it, around the organ's voxels on SLICES only (the small crop)."""
    labels = slicer.util.arrayFromVolume(label_volume)
    boxes = boxes_from_labels(labels, ORGANS)
    snapshot = geometry.snapshotVolume(volume)
    rois = []
    for box in boxes:
        box.min_ijk[2], box.max_ijk[2] = SLICES
        roi = scene.AddNewNodeByClass("vtkMRMLMarkupsROINode", box.name)
        geometry.placeRoi(roi, box, snapshot.ijkToRas)
        rois.append(roi)
    return boxes, rois


class Run:
    pass


@pytest.fixture(scope="module")
def run(slab_paths, litemedsam):
    r = Run()
    r.app = SlicerApp()
    r.volume = r.app.loadVolume(slab_paths[0], "tsA_slab")
    r.labels = r.app.loadVolume(slab_paths[1], "tsA_slab labels")
    r.hash_before = voxel_hash(r.volume)
    r.boxes, r.rois = make_rois(r.app.scene, r.volume, r.labels)
    r.logic = URSAMProcessLogic(r.app.appLogic)
    r.stages = []
    # Boxes from ROIs are the paper's box3d prompt (slice and propagate follow a template library).
    r.outputs = r.logic.process(r.volume, rois=r.rois, backend=litemedsam, prompts="box3d",
                                progress=lambda stage, i, n: r.stages.append((stage, i, n)))
    r.computed = r.logic._cache[r.volume.GetID()]
    return r


def fresh_outputs(run, parentTransform=None):
    """The module's computation written into a new scene (same CT file), for tests that change nodes.

    ``parentTransform``: a 4x4 array; the CT is put under a linear transform node of it first.
    """
    app = SlicerApp()
    volume = app.loadVolume(run.volume.GetStorageNode().GetFileName(), "tsA_slab")
    if parentTransform is not None:
        transform = app.scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "moved")
        transform.SetMatrixTransformToParent(geometry.arrayToMatrix(parentTransform))
        volume.SetAndObserveTransformNodeID(transform.GetID())
    snapshot = replace(run.computed.job.snapshot, scene=app.scene, nodeID=volume.GetID())
    computed = replace(run.computed, job=replace(run.computed.job, snapshot=snapshot))
    logic = URSAMProcessLogic(app.appLogic)
    return app, volume, logic, logic.applySegmentation(computed)


def test_rois_give_the_boxes_they_were_made_from(run):
    got = {b.name: (b.min_ijk, b.max_ijk) for b in run.computed.result.boxes}
    assert got == {b.name: (b.min_ijk, b.max_ijk) for b in run.boxes}
    assert run.computed.result.timings["distinct_slices"] == len(SLICES)


def test_progress_names_the_stages(run):
    stages = [s for s, _, _ in run.stages]
    assert "embedding slices" in stages and "rectifying" in stages and "writing results" in stages
    embed = [(i, n) for s, i, n in run.stages if s == "embedding slices"]
    assert embed[-1] == (len(SLICES), len(SLICES))


def test_outputs_are_in_a_folder_named_after_the_input(run):
    scene = run.app.scene
    sh = scene.GetSubjectHierarchyNode()
    assert sh.GetItemName(run.outputs.folderItemID) == "UR-SAM tsA_slab"
    for role in ROLES:
        node = run.outputs.nodes[role]
        assert node.GetName() == outputs.NODES[role][1]
        assert node.GetAttribute(outputs.INPUT) == run.volume.GetID()
        assert sh.GetItemParent(sh.GetItemByDataNode(node)) == run.outputs.folderItemID


def test_segments_are_nonempty_named_and_equal_to_the_engine(run):
    result = run.computed.result
    # without a library, ROIs get label values in order
    assert sorted((b.label, b.name) for b in result.boxes) == [(1, "kidney_right"), (2, "spleen")]
    for role, method in (("ensemble", "ensemble"), ("rectified", "ursam")):
        node = run.outputs.nodes[role]
        expected = result.label_map(method)
        seg = node.GetSegmentation()
        assert sorted(seg.GetNthSegmentID(i) for i in range(seg.GetNumberOfSegments())) == sorted(ORGANS.values())
        for label, organ in ((b.label, b.name) for b in result.boxes):
            mask = full_mask(node, organ, run.volume)
            assert mask.sum() > 20, f"{role} {organ} is (nearly) empty"
            assert np.array_equal(mask, expected == label), f"{role} {organ} differs from the engine's label map"
            assert mask[[z for z in range(mask.shape[0]) if z not in SLICES]].sum() == 0
    rectified = run.outputs.rectified.GetSegmentation()
    spleen = rectified.GetSegment("spleen")
    assert spleen.GetName() == "Spleen"
    assert "SCT^78961009^Spleen" in segmentations.segmentTag(spleen, slicer.vtkSegment.GetTerminologyEntryTagName())
    assert rectified.GetSegment("kidney_right").GetName() == "Right kidney"
    assert np.allclose(spleen.GetColor(), np.array([157, 108, 162]) / 255.0, atol=1e-3)


def test_geometry_equals_the_input(run):
    m_in = geometry.ijkToRas(run.volume)
    unc = run.outputs.uncertainty
    assert np.allclose(geometry.ijkToRas(unc), m_in)
    assert unc.GetImageData().GetDimensions() == run.volume.GetImageData().GetDimensions()
    for role in ("ensemble", "rectified", "flagged"):
        node = run.outputs.nodes[role]
        labelmap = run.app.scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", f"export {role}")
        ok = slicer.vtkSlicerSegmentationsModuleLogic.ExportAllSegmentsToLabelmapNode(
            node, labelmap, slicer.vtkSegmentation.EXTENT_REFERENCE_GEOMETRY)
        assert ok
        assert labelmap.GetImageData().GetDimensions() == run.volume.GetImageData().GetDimensions()
        assert np.allclose(geometry.ijkToRas(labelmap), m_in)
        run.app.scene.RemoveNode(labelmap)


def test_uncertainty_is_the_entropy_map_within_0_and_log2(run):
    u = slicer.util.arrayFromVolume(run.outputs.uncertainty)
    assert u.dtype == np.float32
    assert u.min() >= 0.0 and u.max() <= math.log(2) + 1e-6
    assert u.max() > 0.3  # SAM is unsure somewhere along organ borders
    expected, _ = run.computed.result.uncertainty_maps()
    assert np.array_equal(u, expected)
    display = run.outputs.uncertainty.GetDisplayNode()
    assert display.GetColorNodeID() == "vtkMRMLPETProceduralColorNodePET-Heat"
    assert display.GetApplyThreshold()
    legends = run.app.logics["Colors"].GetNumberOfColorLegendDisplayNodes(run.outputs.uncertainty)
    assert legends == 1
    for i in range(run.app.scene.GetNumberOfNodesByClass("vtkMRMLSliceCompositeNode")):
        composite = run.app.scene.GetNthNodeByClass(i, "vtkMRMLSliceCompositeNode")
        assert composite.GetForegroundVolumeID() == run.outputs.uncertainty.GetID()
        assert composite.GetBackgroundVolumeID() == run.volume.GetID()


def test_review_rows_are_the_connected_components_of_the_flagged_segments(run):
    table = run.outputs.review.GetTable()
    rows = [{table.GetColumnName(c): table.GetValue(r, c).ToString() for c in range(table.GetNumberOfColumns())}
            for r in range(table.GetNumberOfRows())]
    assert rows, "no flagged region at all"
    spacing = np.prod(run.volume.GetSpacing()) / 1000.0
    u = slicer.util.arrayFromVolume(run.outputs.uncertainty)
    for organ in ORGANS.values():
        flagged = full_mask(run.outputs.flagged, organ, run.volume)
        components, n = ndimage.label(flagged, np.ones((3, 3, 3)))
        sizes = sorted((np.bincount(components.ravel())[1:] * spacing).round(3).tolist(), reverse=True)
        organ_rows = [row for row in rows if row["Organ"] == organ]
        assert len(organ_rows) == n
        assert [round(float(row["Volume"]), 3) for row in organ_rows] == sizes
        for row in organ_rows:
            i, j, k = (int(v) for v in row["Seed IJK"].split(","))
            assert flagged[k, j, i]
            assert 0 < float(row["Mean uncertainty"]) <= float(row["Max uncertainty"]) <= math.log(2) + 1e-6
            comp = components == components[k, j, i]
            assert float(row["Mean uncertainty"]) == pytest.approx(float(u[comp].mean()), abs=1e-4)
            assert row["Status"] == "pending"
    assert [int(row["ID"]) for row in rows] == list(range(1, len(rows) + 1))


def test_statistics_table_has_one_row_per_organ(run):
    table = run.outputs.statistics.GetTable()
    assert table.GetNumberOfRows() == len(ORGANS)
    col = {table.GetColumnName(c): c for c in range(table.GetNumberOfColumns())}
    spacing = np.prod(run.volume.GetSpacing()) / 1000.0
    for r in range(table.GetNumberOfRows()):
        organ = table.GetValue(r, col["Organ"]).ToString()
        rect = full_mask(run.outputs.rectified, organ, run.volume)
        assert table.GetValue(r, col["Volume"]).ToDouble() == pytest.approx(rect.sum() * spacing)
        assert 0.0 <= table.GetValue(r, col["Flagged fraction"]).ToDouble() <= 1.0
        assert 0.0 < table.GetValue(r, col["Mean uncertainty"]).ToDouble() <= math.log(2)


def test_input_voxels_are_unchanged(run):
    assert voxel_hash(run.volume) == run.hash_before
    assert run.volume.GetImageData().GetScalarType() == 4  # still the int16 it was read as


def test_rectified_saves_to_seg_nrrd_and_reads_back_equal(run, tmp_path):
    scene = run.app.scene
    path = tmp_path / "rectified.seg.nrrd"
    storage = scene.AddNewNodeByClass("vtkMRMLSegmentationStorageNode")
    storage.SetFileName(str(path))
    assert storage.WriteData(run.outputs.rectified)
    back = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "read back")
    reader = scene.AddNewNodeByClass("vtkMRMLSegmentationStorageNode")
    reader.SetFileName(str(path))
    assert reader.ReadData(back)
    a, b = run.outputs.rectified.GetSegmentation(), back.GetSegmentation()
    assert [a.GetNthSegmentID(i) for i in range(a.GetNumberOfSegments())] == \
        [b.GetNthSegmentID(i) for i in range(b.GetNumberOfSegments())]
    for organ in ORGANS.values():
        sa, sb = a.GetSegment(organ), b.GetSegment(organ)
        assert sa.GetName() == sb.GetName()
        assert np.allclose(sa.GetColor(), sb.GetColor())
        tag = slicer.vtkSegment.GetTerminologyEntryTagName()
        assert segmentations.segmentTag(sa, tag) == segmentations.segmentTag(sb, tag)
        assert np.array_equal(full_mask(run.outputs.rectified, organ, run.volume), full_mask(back, organ, run.volume))
    assert segmentations.contentHash(back) == segmentations.contentHash(run.outputs.rectified)
    for node in (back, storage, reader):
        scene.RemoveNode(node)


def test_rerun_replaces_only_its_own_nodes(run):
    app, volume, logic, first = fresh_outputs(run)
    scene = app.scene
    # a user's node with the same name as an output, and an unrelated segmentation
    decoy = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "UR-SAM rectified")
    decoy.GetSegmentation().AddEmptySegment("mine")
    decoy_hash = segmentations.contentHash(decoy)
    ids_before = app.nodeIDs()
    second = logic.applySegmentation(logic._cache[volume.GetID()])
    assert {r: n.GetID() for r, n in second.nodes.items()} == {r: n.GetID() for r, n in first.nodes.items()}
    assert app.nodeIDs() == ids_before
    assert second.notes == []
    assert segmentations.contentHash(decoy) == decoy_hash and decoy.GetAttribute(outputs.ROLE) is None


def test_edited_rectified_segmentation_is_kept_and_a_new_node_made(run):
    app, volume, logic, first = fresh_outputs(run)
    edited = first.rectified
    mask = np.ones((1, 3, 3), bool)
    shape = slicer.util.arrayFromVolume(volume).shape
    segmentations.modifySegmentRegion(edited, "spleen", mask, (SLICES[0], 5, 5), geometry.ijkToRas(volume), shape,
                                      add=True)
    edited_hash = segmentations.contentHash(edited)
    again = logic.rectify(volume)  # a rerun of rectification: writes the rectified segmentation again
    assert again.rectified is not edited
    assert again.rectified.GetName() != edited.GetName()
    assert segmentations.contentHash(edited) == edited_hash
    assert edited.GetAttribute(outputs.ROLE) == "rectified-kept"
    assert again.notes and "edited" in again.notes[0]
    assert full_mask(edited, "spleen", volume)[SLICES[0], 5:8, 5:8].all()
    assert not full_mask(again.rectified, "spleen", volume)[SLICES[0], 5:8, 5:8].any()
    # the next rerun writes into the new node, not into the kept one
    third = logic.rectify(volume)
    assert third.rectified is again.rectified and third.notes == []


def largest_flagged_region(out, volume):
    """The review table's largest region: (table, its columns, the row, the organ, the region's voxels)."""
    table = out.review
    col = {table.GetTable().GetColumnName(c): c for c in range(table.GetTable().GetNumberOfColumns())}
    row = max(range(table.GetTable().GetNumberOfRows()),
              key=lambda r: table.GetTable().GetValue(r, col["Volume"]).ToDouble())
    organ = table.GetTable().GetValue(row, col["Organ"]).ToString()
    component = review.componentFromTable(table, row)
    labels, _ = ndimage.label(full_mask(out.flagged, organ, volume), np.ones((3, 3, 3)))
    i, j, k = component.seed_ijk
    return table, col, row, organ, labels == labels[k, j, i]


def test_accept_and_reject_change_only_that_region_of_that_organ(run):
    app, volume, logic, out = fresh_outputs(run)
    table, col, row, organ, region = largest_flagged_region(out, volume)
    other = next(o for o in ORGANS.values() if o != organ)
    before = full_mask(out.rectified, organ, volume)
    before_other = full_mask(out.rectified, other, volume)

    n = logic.reviewComponent(table, row, accept=True)
    after = full_mask(out.rectified, organ, volume)
    assert n == region.sum()
    assert np.array_equal(after, before | region)
    assert table.GetTable().GetValue(row, col["Status"]).ToString() == "accepted"

    logic.reviewComponent(table, row, accept=False)
    after = full_mask(out.rectified, organ, volume)
    assert np.array_equal(after, before & ~region)
    assert table.GetTable().GetValue(row, col["Status"]).ToString() == "rejected"
    assert np.array_equal(full_mask(out.rectified, other, volume), before_other & ~region)


def moved():
    """A rotation about the S axis and a shift: far enough that world and local voxels never coincide."""
    a = np.radians(25.0)
    m = np.eye(4)
    m[:2, :2] = [[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]]
    m[:3, 3] = [40.0, -25.0, 12.0]
    return m


def test_a_transformed_input_gets_its_own_voxels_back_through_review_and_the_library(run, tmp_path):
    app, volume, logic, out = fresh_outputs(run, parentTransform=moved())
    transformID = volume.GetTransformNodeID()
    assert out.rectified.GetTransformNodeID() == transformID  # the outputs sit where the input does
    rectified = run.computed.maps["rectified"]
    for label, organ in run.computed.maps["organs"]:
        assert np.array_equal(full_mask(out.rectified, organ, volume), rectified == label), organ

    # Accept adds exactly the flagged region, in the input's voxels
    table, col, row, organ, region = largest_flagged_region(out, volume)
    before = full_mask(out.rectified, organ, volume)
    assert logic.reviewComponent(table, row, accept=True) == region.sum()
    assert np.array_equal(full_mask(out.rectified, organ, volume), before | region)

    # Add to library: the reviewed output (under the transform) and a copy drawn in world space
    world = app.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "drawn in world space")
    segmentations.setSegmentsFromLabelmap(world, rectified, run.computed.maps["organs"],
                                          moved() @ geometry.ijkToRas(volume))
    assert world.GetTransformNodeID() is None
    for i, node in enumerate((out.rectified, world)):
        lib_path = tmp_path / f"lib{i}"
        logic.addToLibrary(lib_path, volume, node)

        lib = Library(lib_path)
        _, back = lib.templates()[0].read_labels()
        by_name = {v: k for k, v in lib.names.items()}
        expected = rectified.copy()
        if node is out.rectified:
            expected[region] = [b.label for b in run.computed.result.boxes if b.name == organ][0]
        for label, name in run.computed.maps["organs"]:
            assert np.array_equal(back == by_name[name], expected == label), (node.GetName(), name)


def test_selecting_a_row_jumps_the_slice_views_to_it(run):
    app, volume, logic, out = fresh_outputs(run)
    centre = review.rowCentre(out.review, 0)
    logic.jumpToComponent(out.review, 0)
    red = app.scene.GetSingletonNode("Red", "vtkMRMLSliceNode")
    sliceToRas = geometry.matrixToArray(red.GetSliceToRAS())
    # the axial view's plane passes through the region's centre
    assert sliceToRas[2, 3] == pytest.approx(centre[2], abs=1e-3)


def test_rectify_reruns_only_the_rectification(run, litemedsam):
    app, volume, logic, out = fresh_outputs(run)
    calls = litemedsam.encoder_calls
    ensemble_hash = segmentations.contentHash(out.ensemble)
    fixed = logic.rectify(volume, fixedThreshold=0.05, nAug=7)  # n needs SAM: ignored by Rectify
    assert litemedsam.encoder_calls == calls
    assert logic._cache[volume.GetID()].job.options.nAug == 3
    assert logic._cache[volume.GetID()].job.options.fixedThreshold == 0.05
    assert fixed.rectified is out.rectified  # not edited, so rewritten in place
    assert "ensemble" not in fixed.nodes and segmentations.contentHash(out.ensemble) == ensemble_hash
    # a low fixed threshold flags more than the class-specific one
    loose = sum(full_mask(fixed.flagged, o, volume).sum() for o in ORGANS.values())
    logic.rectify(volume, fixedThreshold=None)
    strict = sum(full_mask(out.flagged, o, volume).sum() for o in ORGANS.values())
    assert loose > strict


def test_cancel_in_mid_run_leaves_the_scene_unchanged(run, litemedsam):
    app = SlicerApp()
    volume = app.loadVolume(run.volume.GetStorageNode().GetFileName(), "tsA_slab")
    labels = app.loadVolume(run.labels.GetStorageNode().GetFileName(), "labels")
    _, rois = make_rois(app.scene, volume, labels)
    ids_before = app.nodeIDs()
    sh = app.scene.GetSubjectHierarchyNode()
    items = vtk_ids(sh)
    seen = []

    def cancel():
        # stop once the first slice has been embedded: a cancel in the middle of the SAM loop
        return any(s == "embedding slices" and i >= 1 for s, i, _ in seen)

    logic = URSAMProcessLogic(app.appLogic)
    with pytest.raises(Cancelled):
        logic.process(volume, rois=rois, backend=litemedsam, cancel=cancel,
                      progress=lambda s, i, n: seen.append((s, i, n)))
    assert app.nodeIDs() == ids_before
    assert vtk_ids(sh) == items
    assert not logic.hasCachedResult(volume)
    assert max(i for s, i, _ in seen if s == "embedding slices") == 1


def vtk_ids(sh):
    import vtk  # noqa: PLC0415 (Slicer's own modules exist only inside Slicer)

    ids = vtk.vtkIdList()
    sh.GetItemChildren(sh.GetSceneItemID(), ids, True)
    return sorted(ids.GetId(i) for i in range(ids.GetNumberOfIds()))


def test_bad_inputs_get_one_line_messages(run):
    logic = URSAMProcessLogic()
    with pytest.raises(URSAMError, match="ROIs or a template library"):
        logic.prepareSegmentation(run.volume)
    with pytest.raises(URSAMError, match="not a scalar CT volume"):
        label_map = run.app.scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "a label map")
        logic.prepareSegmentation(label_map, rois=run.rois)
    far = run.app.scene.AddNewNodeByClass("vtkMRMLMarkupsROINode", "liver")
    far.SetCenter(5000.0, 5000.0, 5000.0)
    far.SetRadiusXYZ(10.0, 10.0, 10.0)
    with pytest.raises(URSAMError, match="ROI 'liver' lies outside the input volume 'tsA_slab'"):
        logic.prepareSegmentation(run.volume, rois=[far])
    with pytest.raises(URSAMError, match="needs a checkpoint"):
        logic.process(run.volume, rois=run.rois, backend="sam-vit-b")
    with pytest.raises(URSAMError, match="checkpoint not found"):
        logic.process(run.volume, rois=run.rois, backend="medsam", checkpoint="/nonexistent/medsam.pth")
    with pytest.raises(URSAMError, match="ratio"):
        logic.prepareSegmentation(run.volume, rois=run.rois, options=RunOptions(ratio=0.7))
    for node in (label_map, far):
        run.app.scene.RemoveNode(node)


def test_an_roi_partly_outside_is_clipped_and_the_user_told(run):
    logic = URSAMProcessLogic()
    snapshot = geometry.snapshotVolume(run.volume)
    roi = run.app.scene.AddNewNodeByClass("vtkMRMLMarkupsROINode", "liver")
    box = boxes_from_labels(slicer.util.arrayFromVolume(run.labels), {1: "liver"})[0]
    box.min_ijk[0] = -10  # beyond the image's first column
    geometry.placeRoi(roi, box, snapshot.ijkToRas)
    job = logic.prepareSegmentation(run.volume, rois=[roi], prompts="box3d")
    assert job.boxes[0].min_ijk[0] == 0
    assert len(job.warnings) == 1 and "liver" in job.warnings[0] and "clipped" in job.warnings[0]
    run.app.scene.RemoveNode(roi)


def shown_header(table_node, name):
    """The header Slicer's table view shows (qMRMLTableModel::updateModelFromMRML, 5.6.1 to main): the column's
    title, else its name, and " [unit]" where it has a unit; None where headers are letters."""
    if not table_node.GetUseColumnTitleAsColumnHeader():
        return None
    text = table_node.GetColumnTitle(name) or name
    unit = table_node.GetColumnUnitLabel(name)
    return f"{text} [{unit}]" if unit else text


def test_table_headers_show_each_unit_once(run):
    for node, columns in ((run.outputs.review, review.REVIEW_COLUMNS), (run.outputs.statistics,
                                                                        review.STATISTICS_COLUMNS)):
        headers = {name: shown_header(node, name) for name, _, _, _ in columns}
        for name, kind, unit, description in columns:
            assert headers[name] == (f"{name} [{unit}]" if unit else name)
            assert node.GetColumnDescription(name) == description
    assert shown_header(run.outputs.review, "Volume") == "Volume [ml]"
    assert shown_header(run.outputs.statistics, "Flagged volume") == "Flagged volume [ml]"


def test_the_in_process_run_collects_warnings_without_touching_python_warnings(run, litemedsam):
    """Python's warning filters are process-wide: a run must neither reset nor replace them."""

    logic = URSAMProcessLogic()
    box = boxes_from_labels(slicer.util.arrayFromVolume(run.labels), {3: "spleen"})[0]
    box.min_ijk[0] = -10  # partly outside: the logic warns that it clipped the box
    box.min_ijk[2] = box.max_ijk[2] = SLICES[0]
    roi = run.app.scene.AddNewNodeByClass("vtkMRMLMarkupsROINode", "spleen")
    geometry.placeRoi(roi, box, geometry.ijkToRas(run.volume))
    filters, show = list(warnings.filters), warnings.showwarning
    job = logic.prepareSegmentation(run.volume, rois=[roi], prompts="box3d", nAug=1)
    computed = logic.computeSegmentation(job, backend=litemedsam)
    assert warnings.filters == filters and warnings.showwarning is show
    assert any("clipped" in w for w in computed.result.warnings)
    run.app.scene.RemoveNode(roi)
