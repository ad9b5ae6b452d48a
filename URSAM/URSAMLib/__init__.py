"""URSAMLib: the UR-SAM engine (no Slicer, no Qt).

The method's steps, in the order data flows through them (METHOD.md §0):

- ``templates`` (the support library) and ``localize`` (§1: a
  :class:`~URSAMLib.localization.Localization` of the organs; the learned
  localizer is ``medlam``), on the SimpleITK boundary ``registration``;
- ``atlas_prior`` (the support labels warped into the query) and
  ``prompt_modes`` with ``propagation`` (which 2D box each slice gets), from
  ``boxes``;
- ``prompt_augmentation`` (§3), on the torch boundary ``sam`` (backends,
  fast encoder and decoder, SAM's views of a scan, §2);
- ``uncertainty`` (§3), ``rectification`` (§4, with the atlas prior) and
  ``baselines`` (§5);
- ``pipeline`` runs them per slice, ``segment`` per scan with the run's
  ``settings``, in the one canonical orientation of ``orientation`` (results
  back on the input's grid); ``review`` finds the flagged regions, ``outputs``
  writes the files (through ``atomic``).

``scan`` takes one scan from files to files (what ``ursam segment`` and each
``ursam batch`` task run); ``batch`` runs cohorts on Dask distributed;
``dicom`` reads DICOM CT series and writes RT Structure Sets and SEGs.
``evaluation`` scores and measures the method (evaluate, metrics, bench, the
demo and its phantom); ``cli`` is the ``ursam`` command, one module per
command in ``commands``.
"""
from __future__ import annotations

__version__ = "0.1.0"
