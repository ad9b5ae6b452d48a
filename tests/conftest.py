"""Shared test fixtures: the real data in ../shared/data (see shared_data.py)."""
import pytest
from shared_data import DATA


@pytest.fixture(scope="session")
def data_dir():
    if not DATA.is_dir():
        pytest.fail(f"the shared data folder is missing: {DATA}")
    return DATA


@pytest.fixture(scope="session")
def litemedsam():
    """One LiteMedSAM backend for the whole session (loading it costs seconds)."""
    from URSAMLib.sam.backends import make_backend  # noqa: PLC0415 (imports torch: loads only where a model runs)

    return make_backend("litemedsam", device="cpu")
