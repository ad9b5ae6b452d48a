"""The demo data in a scene: the synthetic template library and query CT of ``ursam demo``. No Qt.

Nothing is downloaded: the data come from :func:`URSAMLib.evaluation.demo.make_demo_data`
(a seeded phantom cohort), are made once per folder and reused while their
stamp (seed, engine version) matches.
"""
from __future__ import annotations

import json
from pathlib import Path

from URSAMLib import __version__
from URSAMLib.atomic import atomic_write_text, staged_dir
from URSAMLib.errors import URSAMError
from URSAMLib.templates import Library

DEMO_VOLUME_NAME = "URSAM demo CT"
STAMP = "ursam-demo.json"


def _paths(folder):
    cohort = Library(folder / "cohort", role="query")
    return Path(Library(folder / "templates").path), Path(cohort.case(cohort.case_ids("query")[0]).image_path)


def demoData(folder, seed=0, n_templates=3):
    """``(library folder, query CT path)`` of the demo data in ``folder`` (made if missing or stale)."""
    from URSAMLib.evaluation.demo import make_demo_data  # noqa: PLC0415 (imports torch: loads only where a model runs)

    folder = Path(folder)
    stamp = {"seed": int(seed), "templates": int(n_templates), "ursam_version": __version__}
    try:
        current = json.loads((folder / STAMP).read_text(encoding="utf-8")) == stamp
    except (OSError, ValueError):
        current = False
    if current:
        try:
            return _paths(folder)
        except URSAMError:
            pass  # damaged since: made again
    # made beside the folder and swapped in whole, so that nobody reads half of it
    with staged_dir(folder, replace=True) as stage:
        make_demo_data(stage, n_templates=n_templates, seed=seed)
        atomic_write_text(Path(stage) / STAMP, json.dumps(stamp))
    return _paths(folder)


def loadDemo(scene, folder, seed=0):
    """Make (or reuse) the demo data in ``folder`` and read its query CT into ``scene``.

    Returns ``(volume node, library folder)``. The CT is read with Slicer's own
    volume reader (``vtkMRMLVolumeArchetypeStorageNode``), as Add Data does;
    an earlier demo CT node of this folder is reused.
    """
    library, image = demoData(folder, seed)
    volume = None
    for i in range(scene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode")):
        node = scene.GetNthNodeByClass(i, "vtkMRMLScalarVolumeNode")
        storage = node.GetStorageNode()
        if storage is not None and Path(storage.GetFileName() or "") == Path(image):
            volume = node
    if volume is None:
        volume = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", DEMO_VOLUME_NAME)
        storage = scene.AddNewNodeByClass("vtkMRMLVolumeArchetypeStorageNode")
        storage.SetFileName(str(image))
        if not storage.ReadData(volume):
            scene.RemoveNode(volume)
            scene.RemoveNode(storage)
            raise URSAMError("Slicer could not read the demo CT", image)
        volume.SetAndObserveStorageNodeID(storage.GetID())
        volume.CreateDefaultDisplayNodes()
    return volume, Path(library)
