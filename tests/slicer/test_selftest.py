"""The self-test's runner for "Reload and Test" (URSAMMRML.selftest): a skip is reported and the next test runs."""
import unittest

import pytest

from URSAMMRML.selftest import runEach


class Case(unittest.TestCase):
    """Tests as URSAMTest has them: the first needs shared data, the demo needs none."""

    __test__ = False  # driven by the tests below, not collected itself

    def __init__(self):
        super().__init__("runTest")
        self.ran = []

    def runTest(self):
        pass

    def setUp(self):
        self.ran.append("setUp")

    def test_needs_data(self):
        self.ran.append("data")
        self.skipTest("URSAM test data not found")

    def test_demo(self):
        self.ran.append("demo")

    def test_broken(self):
        self.ran.append("broken")
        self.assertEqual(1, 2)


def test_a_skipped_test_is_reported_and_the_next_one_runs():
    case, reported = Case(), []
    skipped = runEach([case.test_needs_data, case.test_demo], setUp=case.setUp, report=reported.append)
    assert case.ran == ["setUp", "data", "setUp", "demo"]
    assert skipped == [("test_needs_data", "URSAM test data not found")]
    assert reported == ["test_needs_data skipped: URSAM test data not found"]


def test_a_failure_still_fails():
    case, reported = Case(), []
    with pytest.raises(AssertionError, match="1 != 2"):
        runEach([case.test_needs_data, case.test_broken, case.test_demo], setUp=case.setUp, report=reported.append)
    assert case.ran == ["setUp", "data", "setUp", "broken"]
    assert reported == ["test_needs_data skipped: URSAM test data not found"]


def test_nothing_skipped_reports_nothing():
    case, reported = Case(), []
    assert runEach([case.test_demo, case.test_demo], report=reported.append) == []
    assert case.ran == ["demo", "demo"] and reported == []
