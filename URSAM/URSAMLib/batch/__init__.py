"""Cohorts on Dask distributed: ``ursam batch`` (one task per scan) and the executor ``ursam evaluate
--workers`` shares.

- :mod:`.executor`: the Dask ``LocalCluster`` or an existing cluster, the
  per-worker SAM model and thread settings;
- :mod:`.scans`: a cohort's scans (a folder, a CSV manifest) and the digests
  that make a run resumable;
- :mod:`.run`: the batch itself; :mod:`.summary`: summary.csv, failed.csv, summary.md.

Nothing here imports Dask until a run starts.
"""
from __future__ import annotations
