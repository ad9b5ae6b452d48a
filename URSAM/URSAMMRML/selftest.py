"""Running the module's self-test from "Reload and Test" (no Qt).

"Reload and Test" calls the test case's ``runTest`` directly
(ScriptedLoadableModule.py: ``ScriptedLoadableModule.runTest``, lines 70-83 at
v5.6.2 and 72-85 at v5.8.1 to v5.12.3), outside unittest's runner, so a
``skipTest`` there is an exception like any other: it ends the run and shows
an error. :func:`runEach` gives each test unittest's meaning of a skip: reported,
and the next test runs. (ctest runs the test methods through unittest itself.)
"""
from __future__ import annotations

import logging
import unittest

log = logging.getLogger(__name__)


def runEach(tests, setUp=None, report=None):
    """Run each test in turn, ``setUp()`` before each; returns ``[(name, reason)]`` of the skipped ones.

    A test that raises :class:`unittest.SkipTest` is reported (``report(text)``,
    and the log) and the next one runs; any other exception ends the run as it is.
    """
    skipped = []
    for test in tests:
        name = getattr(test, "__name__", repr(test))
        if setUp is not None:
            setUp()
        try:
            test()
        except unittest.SkipTest as skip:
            skipped.append((name, str(skip)))
            text = f"{name} skipped: {skip}"
            log.info(text)
            if report is not None:
                report(text)
    return skipped
