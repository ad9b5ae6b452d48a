"""The fusion's calibration: the file a library's calibration is kept in (:mod:`.file`) and the statistical fit of
each organ (:mod:`.fit`). Making one: :mod:`URSAMLib.calibrate`."""
from __future__ import annotations
