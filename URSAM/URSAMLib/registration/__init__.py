"""The SimpleITK boundary: rigid/affine registration of supports to a query, resampling, warping points
and labels, and the deformable stage."""
from __future__ import annotations
