"""Standard names and colours for organs (DICOM / SNOMED CT codes, as Slicer's terminologies use).

Slicer shows a segment's terminology entry and colour in the Segment Editor;
organs not listed here get a colour from a fixed palette and no entry.
"""
from __future__ import annotations

import re

_CATEGORY = ["SCT", "123037004", "Anatomical Structure"]
_RIGHT = ["SCT", "24028007", "Right"]
_LEFT = ["SCT", "7771000", "Left"]

# name key -> (SCT code, meaning, laterality, colour in 0..255 as in Slicer's General Anatomy list)
_TABLE = {
    "liver": ("10200004", "Liver", None, (221, 130, 101)),
    "kidney": ("64033007", "Kidney", None, (185, 102, 83)),
    "spleen": ("78961009", "Spleen", None, (157, 108, 162)),
    "pancreas": ("15776009", "Pancreas", None, (249, 180, 111)),
    "aorta": ("15825003", "Aorta", None, (224, 97, 76)),
    "inferiorvenacava": ("64131007", "Inferior vena cava", None, (0, 151, 206)),
    "adrenalgland": ("23451007", "Adrenal gland", None, (244, 214, 49)),
    "gallbladder": ("28231008", "Gallbladder", None, (139, 150, 98)),
    "esophagus": ("32849002", "Esophagus", None, (211, 171, 143)),
    "stomach": ("69695003", "Stomach", None, (216, 132, 105)),
    "duodenum": ("38848004", "Duodenum", None, (255, 253, 229)),
    "brainstem": ("15926001", "Brainstem", None, (250, 250, 225)),
    "spinalcord": ("2748008", "Spinal cord", None, (244, 214, 49)),
    "parotidgland": ("45289007", "Parotid gland", None, (251, 181, 137)),
    "parotid": ("45289007", "Parotid gland", None, (251, 181, 137)),
    "larynx": ("4596009", "Larynx", None, (229, 147, 118)),
    "mandible": ("91609006", "Mandible", None, (255, 250, 220)),
}

_PALETTE = [(230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
            (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128), (220, 190, 255),
            (170, 110, 40), (255, 250, 200), (128, 0, 0), (170, 255, 195), (128, 128, 0), (255, 215, 180)]


def _split(name):
    key = re.sub(r"[^a-z]", "", name.lower())
    side = None
    for suffix, s in (("right", "R"), ("left", "L"), ("r", "R"), ("l", "L")):
        if key.endswith(suffix) and key[: -len(suffix)] in _TABLE:
            return key[: -len(suffix)], s
    for prefix, s in (("right", "R"), ("left", "L")):
        if key.startswith(prefix) and key[len(prefix):] in _TABLE:
            return key[len(prefix):], s
    return key, side


def lookup(name, label=1):
    """``(display_name, colour 0..1, terminology dict or None)`` for an organ name."""
    key, side = _split(name)
    entry = _TABLE.get(key)
    if entry is None:
        rgb = _PALETTE[(int(label) - 1) % len(_PALETTE)]
        return name, [c / 255.0 for c in rgb], None
    code, meaning, _, rgb = entry
    term = {"contextName": "Segmentation category and type - 3D Slicer General Anatomy list",
            "category": _CATEGORY, "type": ["SCT", code, meaning],
            "anatomicContextName": "Anatomic codes - DICOM master list"}
    display = meaning
    if side:
        term["typeModifier"] = _RIGHT if side == "R" else _LEFT
        display = f"{'Right' if side == 'R' else 'Left'} {meaning.lower()}"
    return display, [c / 255.0 for c in rgb], term
