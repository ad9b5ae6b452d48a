"""Atomic writes: every file and folder URSAM writes appears whole or not at all.

A writer fills a temporary name beside the target (same folder, so the final
rename never crosses a file system); only when it has finished is the
temporary renamed onto the target. A crash, a kill or a full disk leaves the
old file or none, never half of a new one, and a second process reading the
target never sees a partial write.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

#: suffixes that writers (SimpleITK, slicerio) read as one format, kept whole on the temporary name
_DOUBLE_SUFFIXES = (".nii.gz", ".seg.nrrd")


def _suffix(path):
    name = path.name
    for s in _DOUBLE_SUFFIXES:
        if name.endswith(s):
            return s
    return path.suffix


@contextmanager
def atomic_path(path):
    """Yield a temporary path to write ``path`` through; on success it replaces ``path``.

    The temporary name keeps the target's suffix, because writers such as
    SimpleITK and matplotlib choose the format from it. On any error or
    interrupt the temporary file is removed and ``path`` is left as it was.
    """
    path = Path(path)
    parent = path.parent if str(path.parent) else Path(".")
    parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part" + _suffix(path), dir=str(parent))
    os.close(fd)
    tmp = Path(tmp)
    # mkstemp makes the file private (0600); a written result is as readable as any other file.
    os.chmod(tmp, 0o644)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_bytes(path, data):
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
    return Path(path)


def atomic_write_text(path, text):
    return atomic_write_bytes(path, text.encode("utf-8"))


@contextmanager
def staged_dir(target, prefix=None, replace=False):
    """Yield a new temporary folder beside ``target``; on success it is renamed to ``target``.

    ``replace``: an existing ``target`` is moved aside at the last moment and
    removed once the new folder is in place, so the old contents stay until
    the new ones are whole. On failure the temporary folder is removed.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=prefix or f".{target.name}.partial-{os.getpid()}-",
                                  dir=str(target.parent)))
    try:
        yield stage
        old = None
        if replace and target.exists():
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            os.replace(target, old)
        try:
            os.replace(stage, target)
        except BaseException:
            if old is not None:
                os.replace(old, target)
            raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def cache_dir():
    """URSAM's folder in the user's cache (``URSAM_CACHE``, else ``$XDG_CACHE_HOME/ursam``, else
    ``~/.cache/ursam``): converted encoders and a calibration's leave-one-out runs, never beside the user's
    data. Not created here."""
    root = os.environ.get("URSAM_CACHE")
    if not root:
        xdg = os.environ.get("XDG_CACHE_HOME")
        root = Path(xdg) / "ursam" if xdg else Path.home() / ".cache" / "ursam"
    return Path(root)
