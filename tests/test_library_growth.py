"""Template libraries that grow: supports with partial labels, atlas selection, a calibration on a subset."""
import json

import numpy as np
import pytest
import SimpleITK as sitk
from shared_data import HN, SMALL_LIBRARY_CASES, make_small_library, organ_slab

from URSAMLib.atlas_prior import LocalWeighting
from URSAMLib.calibrate import choose_queries, support_cases
from URSAMLib.cli import main as ursam
from URSAMLib.localizers import LibrarySource, select_per_organ
from URSAMLib.progress import Progress
from URSAMLib.registration.affine import SupportRegistration
from URSAMLib.registration.deformable import DeformableOptions
from URSAMLib.runner import ScanJob, run_scan
from URSAMLib.settings import Settings
from URSAMLib.templates import Library

QUERY = "pt_31"
#: no deformable stage: these tests are about which supports are used, and it would only take time
FAST = Settings(deformable=DeformableOptions(method="none"))


@pytest.fixture(scope="module")
def query(tmp_path_factory):
    folder = tmp_path_factory.mktemp("query")
    image, labels = organ_slab(HN / "cases" / QUERY)
    sitk.WriteImage(image, str(folder / "image.nii.gz"))
    sitk.WriteImage(labels, str(folder / "labels.nii.gz"))
    return folder


def _warp(query, library, **options):
    job = ScanJob(str(query / "image.nii.gz"), LibrarySource(library, localizer_options=options), FAST,
                  use_calibration=False, stop_after="warp")
    return run_scan(job)


def test_a_support_without_an_organ_neither_votes_for_it_nor_fails_the_run(query, tmp_path):
    library = make_small_library(tmp_path / "lib")
    # pt_17 keeps its brainstem only: the left parotid is not contoured in that plan
    labels_path = library / "cases" / "pt_17" / "labels.nii.gz"
    labels = sitk.ReadImage(str(labels_path))
    arr = sitk.GetArrayFromImage(labels)
    arr[arr == 4] = 0
    partial = sitk.GetImageFromArray(arr)
    partial.CopyInformation(labels)
    sitk.WriteImage(partial, str(labels_path))
    assert ursam(["templates", "check", str(library)]) == 0
    # what the Slicer panel shows beside each organ
    assert Library(library).organ_counts() == {"Brainstem": 3, "Parotid_L": 2}

    outcome = _warp(query, library)
    selection = outcome.localization.info["selection"]
    assert sorted(selection["Brainstem"]) == sorted(SMALL_LIBRARY_CASES)
    assert sorted(selection["Parotid_L"]) == ["pt_13", "pt_4"]
    priors = outcome.warped.priors
    assert priors[1].n_supports == 3 and priors[4].n_supports == 2
    # the parotid's vote is a fraction of the two supports that label it: somewhere they both agree
    assert priors[4].frac.max() == 1.0


def test_an_organ_no_support_holds_is_reported_and_skipped(query, tmp_path):
    library = make_small_library(tmp_path / "lib")
    meta = json.loads((library / "dataset.json").read_text())
    meta["labels"]["6"] = "Larynx"  # named by the library, contoured in none of its scans
    (library / "dataset.json").write_text(json.dumps(meta))
    outcome = _warp(query, library)
    assert sorted(b.name for b in outcome.localization.boxes) == ["Brainstem", "Parotid_L"]
    assert outcome.localization.info["skipped"] == {"Larynx": "no support scan labels it"}


def test_atlas_selection_keeps_the_query_patients_own_scan(query, tmp_path):
    library = make_small_library(tmp_path / "lib")
    # the query's own patient among the supports, under another name
    copy = library / "cases" / "planted"
    copy.mkdir()
    for f in ("image.nii.gz", "labels.nii.gz"):
        (copy / f).write_bytes((query / f).read_bytes())
    meta = json.loads((library / "dataset.json").read_text())
    meta["support"].append("planted")
    (library / "dataset.json").write_text(json.dumps(meta))

    outcome = _warp(query, library, screen=2, per_organ=1)
    info = outcome.localization.info
    screening = info["screening"]
    assert len(screening["scores"]) == 4 and len(screening["kept"]) == 2
    assert screening["kept"][0] == "planted"
    assert min(screening["scores"], key=screening["scores"].get) == "planted"
    # the best-fitting support for every organ is the same patient's scan
    assert info["selection"] == {"Brainstem": ["planted"], "Parotid_L": ["planted"]}
    assert [r.case_id for r in outcome.warped.registrations] == ["planted"]


def test_per_organ_selection_keeps_the_best_fitting_supports():
    regs = [SupportRegistration(c, sitk.Transform(), 1.0, m, {1: np.zeros((6, 3)), 4: np.zeros((6, 3))})
            for c, m in (("a", -0.30), ("b", -0.10), ("c", -0.25))]
    regs[1].points.pop(4)
    kept, chosen = select_per_organ(regs, 2)
    assert chosen == {1: ["a", "c"], 4: ["a", "c"]}
    assert [r.case_id for r in kept] == ["a", "c"]
    kept, chosen = select_per_organ(regs, None)
    assert chosen == {1: ["a", "c", "b"], 4: ["a", "c"]} and len(kept) == 3
    assert set(kept[1].points) == {1}


def test_a_large_library_is_calibrated_on_a_subset_that_covers_every_organ(tmp_path):
    library = make_small_library(tmp_path / "lib")
    lib = Library(library)
    ids = lib.case_ids()
    assert choose_queries(lib, ids, max_queries=None) == ids
    assert choose_queries(lib, ids, max_queries=5) == ids
    two = choose_queries(lib, ids, max_queries=2, seed=3)
    assert len(two) == 2 and set(two) <= set(ids)
    assert two == choose_queries(lib, ids, max_queries=2, seed=3)
    for value in (1, 4):  # every organ in the subset, since each support labels both
        assert all(value in np.unique(lib.case(c).read_labels()[1]) for c in two)


def test_templates_add_takes_a_dataset_folder(tmp_path, capsys):
    library = tmp_path / "lib"
    assert ursam(["templates", "add", str(library), "--from", str(HN), "--cases", "pt_4,pt_13"]) == 0
    assert "added 2 scans" in capsys.readouterr().out
    lib = Library(library)
    assert lib.case_ids() == ["pt_4", "pt_13"] and set(lib.names.values()) == set(
        json.loads((HN / "dataset.json").read_text())["labels"].values())
    # the scans are copied voxel for voxel, with the labels' values matched by name
    for c in ("pt_4", "pt_13"):
        a = sitk.GetArrayFromImage(sitk.ReadImage(str(library / "cases" / c / "labels.nii.gz")))
        b = sitk.GetArrayFromImage(sitk.ReadImage(str(HN / "cases" / c / "labels.nii.gz")))
        assert np.array_equal(a, b)
    # each support's organs are kept as they are added (the panel counts them without reading every scan)
    assert json.loads((library / "dataset.json").read_text())["organs_of_supports"]["pt_4"] == [
        lib.names[v] for v in sorted(lib.names)]
    # a rerun adds what is new only; an unknown case is one error line
    assert ursam(["templates", "add", str(library), "--from", str(HN), "--cases", "pt_4,pt_17"]) == 0
    assert Library(library).case_ids() == ["pt_4", "pt_13", "pt_17"]
    capsys.readouterr()
    assert ursam(["templates", "add", str(library), "--from", str(HN), "--cases", "nope"]) == 2
    assert "has no case nope" in capsys.readouterr().err


@pytest.mark.slow
def test_the_calibrations_second_pass_votes_each_organ_with_its_chosen_supports(tmp_path, litemedsam):
    """A leave-one-out run given the calibration's per-organ choice (here: one support per organ) votes with
    that support alone: its majority vote is that support's warped organ, larger than where both agree (here,
    without the deformable stage, the two supports' brainstems barely meet)."""
    library = Library(make_small_library(tmp_path / "lib"))
    args = (library, SMALL_LIBRARY_CASES[0], litemedsam, FAST.resolved(), ("slice",), LocalWeighting(), Progress())
    everyone, _ = support_cases(*args)
    chosen, _ = support_cases(*args, per_organ={"Brainstem": 1, "Parotid_L": 1})
    for name in ("Brainstem", "Parotid_L"):
        both = int(everyone["slice"][name].reference["atlas vote"].sum())
        one = int(chosen["slice"][name].reference["atlas vote"].sum())
        assert one > both and one > 0, (name, one, both)
