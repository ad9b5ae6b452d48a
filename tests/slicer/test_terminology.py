"""Every organ's terminology entry names codes that the context it names really lists.

Slicer 5.6 looks a segment's category and type up in the context its entry
names and logs "Failed to get terminology type" where they are not there
(5.8 and later look them up when the entry's colour is wanted). The codes of
Slicer's two segmentation contexts are kept in tests/fixtures (the codes
only, of the organs URSAM names, extracted from Slicer's terminology files at
v5.6.2, which are the same at 5.8.1, 5.10.0 and main); the test builds
context files of them and looks each entry up with Slicer's own
terminologies logic.
"""
import json
from pathlib import Path

import pytest
import slicer

from URSAMLib import terminology
from URSAMMRML import segmentations

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "slicer_terminology_codes.json"
#: the schema Slicer's context files name (and LoadTerminologyFromFile requires)
SCHEMA = "https://raw.githubusercontent.com/qiicr/dcmqi/master/doc/segment-context-schema.json#"
#: every organ name of the shared datasets, and the spellings the name matching accepts
NAMES = ["liver", "kidney_right", "kidney_left", "spleen", "pancreas", "aorta", "inferior_vena_cava",
         "adrenal_gland_right", "adrenal_gland_left", "gallbladder", "esophagus", "stomach", "duodenum",
         "Brainstem", "SpinalCord", "Parotid_R", "Parotid_L", "Esophagus", "Larynx", "Mandible", "parotid gland",
         "right kidney", "brain stem"]


def _code(c):
    return {"CodingSchemeDesignator": c["scheme"], "CodeValue": c["code"], "CodeMeaning": c["meaning"]}


@pytest.fixture(scope="module")
def logic(tmp_path_factory):
    """Slicer's terminologies logic with the two contexts, built from the fixture's codes."""
    folder = tmp_path_factory.mktemp("terminologies")
    contexts = json.loads(FIXTURE.read_text(encoding="utf-8"))["contexts"]
    logic = slicer.vtkSlicerTerminologiesModuleLogic()
    for i, (name, context) in enumerate(contexts.items()):
        categories = {}
        for entry in context["types"]:
            category = categories.setdefault(entry["category"]["code"], dict(_code(entry["category"]), Type=[]))
            item = _code(entry["type"])
            if entry["modifiers"]:
                item["Modifier"] = [_code(m) for m in entry["modifiers"]]
            category["Type"].append(item)
        path = folder / f"context{i}.json"
        path.write_text(json.dumps({"SegmentationCategoryTypeContextName": name, "@schema": SCHEMA,
                                    "SegmentationCodes": {"Category": list(categories.values())}}), encoding="utf-8")
        assert logic.LoadTerminologyFromFile(str(path)) == name
    return logic


def find_type(logic, context, category_code, type_code):
    """(category, type) objects of a context, as Slicer 5.6's lookup finds them, or None."""
    for i in range(logic.GetNumberOfCategoriesInTerminology(context)):
        category = slicer.vtkSlicerTerminologyCategory()
        assert logic.GetNthCategoryInTerminology(context, i, category)
        if category.GetCodeValue() != category_code:
            continue
        for j in range(logic.GetNumberOfTypesInTerminologyCategory(context, category)):
            type_ = slicer.vtkSlicerTerminologyType()
            assert logic.GetNthTypeInTerminologyCategory(context, category, j, type_)
            if type_.GetCodeValue() == type_code:
                return category, type_
    return None


def modifiers(logic, context, category, type_):
    out = []
    for k in range(logic.GetNumberOfTypeModifiersInTerminologyType(context, category, type_)):
        modifier = slicer.vtkSlicerTerminologyType()
        assert logic.GetNthTypeModifierInTerminologyType(context, category, type_, k, modifier)
        out.append(modifier.GetCodeValue())
    return out


def test_every_shared_dataset_organ_is_named(data_dir):
    names = set()
    for dataset in ("hn-openkbp", "abdomen-ts"):
        names |= set(json.loads((data_dir / dataset / "dataset.json").read_text())["labels"].values())
    assert names <= set(NAMES), "a shared organ the lookup test below does not check"
    missing = sorted(n for n in names if terminology.lookup(n)[2] is None)
    assert not missing, f"organs of the shared data with no terminology entry: {missing}"


@pytest.mark.parametrize("name", NAMES)
def test_each_entry_is_in_the_context_it_names(logic, name):
    display, colour, term = terminology.lookup(name)
    assert term is not None, name
    context = term["contextName"]
    assert context in (terminology.GENERAL_ANATOMY, terminology.DICOM_MASTER)
    found = find_type(logic, context, term["category"][1], term["type"][1])
    assert found is not None, f"{name}: SCT {term['type'][1]} is not in '{context}'"
    category, type_ = found
    assert type_.GetCodeMeaning() == term["type"][2] and category.GetCodeMeaning() == term["category"][2]
    if "typeModifier" in term:
        assert term["typeModifier"][1] in modifiers(logic, context, category, type_), name
    # where the context recommends a colour, the segment gets it
    fixture = json.loads(FIXTURE.read_text(encoding="utf-8"))["contexts"][context]["types"]
    rgb = next(t.get("rgb") for t in fixture if t["type"]["code"] == term["type"][1])
    if rgb:
        assert [round(c * 255) for c in colour] == list(rgb), name


@pytest.mark.parametrize("name", ["inferior_vena_cava", "Parotid_L", "Brainstem", "kidney_right"])
def test_the_segment_tag_reads_back_as_slicer_serializes_it(logic, name):
    display, colour, term = terminology.lookup(name)
    text = segmentations.terminologyString(term)
    entry = slicer.vtkSlicerTerminologyEntry()
    assert logic.DeserializeTerminologyEntry(text, entry)
    assert entry.GetTerminologyContextName() == term["contextName"]
    assert entry.GetTypeObject().GetCodeValue() == term["type"][1]
    assert entry.GetCategoryObject().GetCodeValue() == term["category"][1]
    assert logic.SerializeTerminologyEntry(entry) == text
