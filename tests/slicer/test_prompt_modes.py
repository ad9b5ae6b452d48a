"""Prompt modes through the Slicer logic: slice prompts from the template library's warped labels.

The query is a 7-slice crop of tsA_slab (written to a temporary folder) so that one slice-mode run
costs about 7 LiteMedSAM encoder calls; the library is abdomen-ts, whose support tsA is another scan of
the same patient, so the localization is reliable and the check is of the wiring, not of accuracy.
The deformable stage is off here: on a query only 21 mm thick, demons (3 mm grid, shrink 4) sometimes
moves every support label out of the scan (2 of 6 runs), and the organs then fall back to box3d.
"""
import numpy as np
import pytest
import slicer
from slicer_scene import SlicerApp, full_mask, voxel_hash

from URSAMLib.boxes import boxes_from_labels
from URSAMLib.errors import URSAMError
from URSAMLib.metrics import dice
from URSAMLib.progress import STAGE_DEFORM
from URSAMLib.prompt_modes import PromptOptions, fallback_warnings, make_prompts
from URSAMMRML import geometry
from URSAMMRML.logic import RunOptions, URSAMProcessLogic

ORGANS = {2: "kidney_right", 3: "spleen"}


class Run:
    pass


@pytest.fixture(scope="module")
def sliced(slab_paths, crop_paths, litemedsam):
    r = Run()
    r.app = SlicerApp()
    r.volume = r.app.loadVolume(crop_paths[0], "tsA crop")
    r.labels = slicer.util.arrayFromVolume(r.app.loadVolume(crop_paths[1], "tsA crop labels")).copy()
    r.hash_before = voxel_hash(r.volume)
    r.library = slab_paths[0].parents[2]
    r.logic = URSAMProcessLogic(r.app.appLogic)
    r.stages = []
    r.outputs = r.logic.process(r.volume, library=r.library, organs=list(ORGANS.values()), backend=litemedsam,
                                prompts="slice", deformable="none",
                                progress=lambda s, i, n: r.stages.append(s))
    r.computed = r.logic._cache[r.volume.GetID()]
    return r


def statistics_column(node, name):
    table = node.GetTable()
    column = table.GetColumnByName(name)
    assert column is not None, f"'{node.GetName()}' has no column {name}"
    return [column.GetValue(r) for r in range(table.GetNumberOfRows())]


def test_slice_mode_segments_the_organs_from_per_slice_boxes(sliced):
    result = sliced.computed.result
    assert result.inputs["prompts"]["mode"] == "slice"
    assert result.report()["inputs"]["prompts"]["mode"] == "slice"
    assert result.inputs["prompts"]["prior_supports"] == {o: 1 for o in ORGANS.values()}
    # the deformable option reached the engine: no deformable stage ran
    assert "deformable" not in result.inputs["prompts"]
    assert not any(s.startswith(STAGE_DEFORM) for s in sliced.stages)
    assert not any("3D box" in w for w in result.warnings)
    # the result is Algorithm 1 with the atlas prior, the logic's default where the labels are warped
    assert result.rectified_method == "ursam+atlas"
    by_name = {b.name: b for b in result.boxes}
    assert sorted(by_name) == sorted(ORGANS.values())
    for value, organ in ORGANS.items():
        box = by_name[organ]
        assert box.slice_boxes, f"{organ} got no per-slice boxes in slice mode"
        assert any("slice prompts" in n for n in box.notes)
        mask = full_mask(sliced.outputs.rectified, organ, sliced.volume)
        assert mask.sum() > 100, f"{organ} is (nearly) empty"
        assert np.array_equal(mask, sliced.computed.maps["rectified"] == box.label)
        # another scan of the same patient as support: the organ is found, not some neighbour
        assert dice(mask, sliced.labels == value) > 0.7, organ
    assert statistics_column(sliced.outputs.statistics, "Prompts") == ["slice"] * len(ORGANS)


def test_slice_mode_leaves_the_input_unchanged(sliced):
    assert voxel_hash(sliced.volume) == sliced.hash_before


def test_rectify_keeps_the_slice_result_and_its_mode(sliced):
    before = {o: full_mask(sliced.outputs.ensemble, o, sliced.volume) for o in ORGANS.values()}
    assert sliced.computed.job.options.fixedThreshold is None
    out = sliced.logic.rectify(sliced.volume, fixedThreshold=0.05, prompts="box3d")
    cached = sliced.logic._cache[sliced.volume.GetID()]
    assert cached.job.options.prompts == "slice"  # a mode change needs a new SAM run
    assert cached.job.options.fixedThreshold == 0.05
    assert statistics_column(out.statistics, "Prompts") == ["slice"] * len(ORGANS)
    for organ, mask in before.items():
        assert np.array_equal(full_mask(sliced.outputs.ensemble, organ, sliced.volume), mask)
        assert full_mask(out.rectified, organ, sliced.volume).sum() > 100
    # back to the class-specific threshold: the slice run's own rectified masks again
    out = sliced.logic.rectify(sliced.volume, fixedThreshold=None)
    for value, organ in ORGANS.items():
        assert np.array_equal(full_mask(out.rectified, organ, sliced.volume),
                              sliced.computed.maps["rectified"] == value)


def test_rois_with_a_slice_mode_run_box3d_and_say_so(crop_paths, litemedsam):
    app = SlicerApp()
    volume = app.loadVolume(crop_paths[0], "tsA crop")
    labels = slicer.util.arrayFromVolume(app.loadVolume(crop_paths[1], "tsA crop labels"))
    snapshot = geometry.snapshotVolume(volume)
    rois = []
    for box in boxes_from_labels(labels, ORGANS):
        box.min_ijk[2], box.max_ijk[2] = 3, 4  # two slices keep the run short
        roi = app.scene.AddNewNodeByClass("vtkMRMLMarkupsROINode", box.name)
        geometry.placeRoi(roi, box, snapshot.ijkToRas)
        rois.append(roi)
    logic = URSAMProcessLogic(app.appLogic)
    out = logic.process(volume, rois=rois, backend=litemedsam, prompts="slice")
    notes = [n for n in out.notes if "prompt mode slice" in n]
    assert len(notes) == 1 and "template library" in notes[0] and "box3d" in notes[0]
    result = logic._cache[volume.GetID()].result
    assert result.inputs["prompts"]["mode"] == "box3d"
    assert all(not b.slice_boxes for b in result.boxes)
    assert statistics_column(out.statistics, "Prompts") == ["box3d"] * len(ORGANS)
    for organ in ORGANS.values():
        mask = full_mask(out.rectified, organ, volume)
        assert mask.sum() > 20 and not mask[[z for z in range(mask.shape[0]) if z not in (3, 4)]].any()


def test_organs_a_mode_prompts_with_the_3d_box_are_named_to_the_user(sliced):
    localized = sliced.computed.localized
    size = sliced.computed.result.reference.GetSize()
    # no warped prior for either organ: the engine's own fallback
    fallen, _ = make_prompts(localized, {}, PromptOptions(mode="propagate"), size)
    warnings = fallback_warnings(fallen, "propagate")
    assert len(warnings) == len(ORGANS)
    for organ, warning in zip((b.name for b in localized), warnings):
        assert warning.startswith(f"{organ}: ") and "propagate prompt used its 3D box" in warning
    assert fallback_warnings(sliced.computed.result.boxes, "slice") == []
    assert fallback_warnings(localized, "box3d") == []


def test_bad_prompt_options_get_one_line_errors_and_change_nothing(sliced):
    ids = sliced.app.nodeIDs()
    cases = [(dict(prompts="boxes"), "unknown prompt mode 'boxes'; choose one of box3d, slice, propagate"),
             (dict(zoom="maybe"), "zoom must be one of auto, on, off, got 'maybe'"),
             (dict(deformable="affine"), "unknown deformable method 'affine'"),
             (dict(atlasPrior="yes"), "atlas prior must be on")]
    for overrides, message in cases:
        with pytest.raises(URSAMError, match=message) as err:
            sliced.logic.process(sliced.volume, library=sliced.library, **overrides)
        assert "\n" not in str(err.value)
        with pytest.raises(URSAMError, match=message):
            RunOptions(**overrides).check()
    assert sliced.app.nodeIDs() == ids
    assert voxel_hash(sliced.volume) == sliced.hash_before
