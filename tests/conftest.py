"""Shared test fixtures: the real data in ../shared/data, and small crops of it."""
import json
import os
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("URSAM_DATA", ROOT.parent / "shared" / "data"))
ABD = DATA / "abdomen-ts"
HN = DATA / "hn-openkbp"


def case(dataset, case_id):
    folder = dataset / "cases" / case_id
    return folder / "image.nii.gz", folder / "labels.nii.gz"


def names(dataset):
    return {int(k): v for k, v in json.loads((dataset / "dataset.json").read_text())["labels"].items()}


@pytest.fixture(scope="session")
def data_dir():
    if not DATA.is_dir():
        pytest.fail(f"the shared data folder is missing: {DATA}")
    return DATA


@pytest.fixture(scope="session")
def litemedsam():
    """One LiteMedSAM backend for the whole session (loading it costs seconds)."""
    from URSAMLib.sam_backend import make_backend

    return make_backend("litemedsam", device="cpu")
