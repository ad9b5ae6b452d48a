"""The fusion's calibration: the file (:mod:`.file`), the leave-one-out runs (:mod:`.runs`), the fit of each
organ (:mod:`.fit`), and making one (:func:`.calibrate.calibrate`, ``ursam templates calibrate``)."""
