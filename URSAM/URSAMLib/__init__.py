"""URSAMLib: the UR-SAM engine (no Slicer, no Qt).

:func:`URSAMLib.runner.run_scan` runs one scan job through the method's
steps (METHOD.md §0), each a module of its own, data flowing one way as
named objects:

- ``imageio`` reads the scan (a ``Scan``);
- ``localizers`` localize its organs (§1) from the ``templates`` library (the
  registration localizer on ``registration``, or ``medlam``) or take given
  boxes (a ``Localization``);
- ``orientation`` puts the scan in the one canonical orientation;
- ``atlas_prior`` warps the supports into it (the deformable stage, the
  priors: ``WarpedSupports``);
- ``segment`` builds each prompt mode's prompts (``prompt_modes``,
  ``propagation``, ``boxes``), chooses SAM's view (``sam``) and runs
  ``pipeline`` per slice: ``prompt_augmentation`` and ``uncertainty`` (§3),
  ``rectification`` (§4), ``baselines`` (§5), ``fusion`` (the calibrated
  fusion; its file and fit in ``calibration``, made by ``calibrate``); the
  ``result`` is a ``SegmentationResult``;
- ``metrics`` scores it, ``review`` finds the flagged regions, ``outputs``
  writes the files (through ``atomic``; DICOM objects through ``dicom``).

``correction`` corrects one organ of a finished result from a box on one slice (SAM on that slice and
the slices around it; ``correction_files`` applies it to a result folder, with its undo record);
``batch`` runs cohorts on Dask distributed; ``evaluation`` scores and
measures the method (evaluate, bench, the demo and its phantom); ``cli`` is
the ``ursam`` command, one module per command in ``commands``.
"""
from __future__ import annotations

__version__ = "0.1.0"
