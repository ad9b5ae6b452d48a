"""DICOM in and out: the CT series a scan comes from, and the RT Structure Set and Segmentation of its result.

- ``series``: the one reader of a DICOM CT series folder (which series, CT or
  not, gaps between slices, one orientation) and the geometry of its slices;
  :func:`URSAMLib.imageio.read_ct` reads DICOM folders through it.
- ``contours``: a 2D mask as closed polygons on the voxel edges, one per
  connected piece, holes joined by keyhole channels.
- ``names``: structure names (AAPM TG-263 where the organ is known).
- ``rtstruct`` (pydicom) and ``seg`` (highdicom): the two writers.
- ``export``: ``--dicom-out``: which objects a run writes, and their writers.
"""
from __future__ import annotations
