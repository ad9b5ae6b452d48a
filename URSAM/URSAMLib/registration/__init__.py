"""The SimpleITK boundary: rigid/affine registration of supports to a query, resampling, warping points, and
the deformable stage (the labels are warped by :mod:`URSAMLib.atlas_prior`)."""
from __future__ import annotations
