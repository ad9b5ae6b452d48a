"""The real data in ../shared/data, for every test module (import it as ``shared_data``).

Kept apart from conftest.py: with conftest files in sub-folders, ``import conftest``
would find whichever was imported first.
"""
import json
import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("URSAM_DATA", ROOT.parent / "shared" / "data"))
ABD = DATA / "abdomen-ts"
HN = DATA / "hn-openkbp"


def case(dataset, case_id):
    folder = dataset / "cases" / case_id
    return folder / "image.nii.gz", folder / "labels.nii.gz"


def names(dataset):
    return {int(k): v for k, v in json.loads((dataset / "dataset.json").read_text(encoding="utf-8"))["labels"].items()}


def paper_settings(**params):
    """The run's settings with the paper's box3d prompt (boxes without per-slice boxes) and these Params."""
    from URSAMLib.pipeline import Params
    from URSAMLib.prompt_modes import PromptOptions
    from URSAMLib.settings import Settings

    return Settings(params=Params(**params), prompts=PromptOptions(mode="box3d"))
