"""URSAMMRML: the MRML side of the URSAM Slicer module (Slicer's scene, no Qt).

It turns Slicer nodes into the engine's inputs and the engine's results into
nodes; every computation is delegated to URSAMLib. Modules:

- ``geometry``: volume nodes and ROIs <-> the engine's grid (SimpleITK LPS, arrays [z, y, x]).
- ``segmentations``: label maps <-> segmentation nodes, segment edits, content hashes.
- ``outputs``: the subject-hierarchy folder and the output nodes of one input volume.
- ``display``: the uncertainty overlay and its colour legend, slice-view jumps.
- ``review``: the review and statistics tables (the flagged regions come from URSAMLib.review).
- ``logic``: the headless ``process(...)``, split into prepare / compute / apply; the panel's
  runs compute in a worker process (``startJob``).
- ``worker``: the worker process (``python -m URSAMMRML.worker JOBDIR``), which imports only the engine;
  ``jobs``: starting, polling and killing it.
- ``correction``: SAM-assisted correction of "UR-SAM rectified" from a box (a Markups ROI), its undo;
  ``sessionworker``: the worker's persistent mode that serves the corrections (``--serve``).
- ``demo``: the synthetic demo data in a scene.
- ``dependencies``: which Python packages a run needs, which are missing, and installing them
  (nothing in Slicer's testing mode).
- ``guiconnection``: the panel's one connection to its parameter node, alike on Slicer 5.6 to 5.12.
- ``selftest``: running the self-test's tests one by one, so that a skipped one does not stop the others.
- ``dicomexport``: a segmentation as a DICOM RT Structure Set, through SlicerRT's exporter.

Nothing here imports Qt, so scripts, Slicer's Python console and the pytest
suite (PyPI ``slicer-core``) use it as the module's widget does.
"""
from __future__ import annotations
