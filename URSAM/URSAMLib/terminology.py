"""Standard names and colours for organs (DICOM / SNOMED CT codes, as Slicer's terminologies use).

Slicer shows a segment's terminology entry and colour in the Segment Editor;
organs not listed here get a colour from a fixed palette and no entry.
"""
from __future__ import annotations

import re

_CATEGORY = ["SCT", "123037004", "Anatomical Structure"]
_RIGHT = ["SCT", "24028007", "Right"]
_LEFT = ["SCT", "7771000", "Left"]

#: the two segmentation contexts Slicer ships (Modules/Loadable/Terminologies/Resources, the same at 5.6 to 5.10)
GENERAL_ANATOMY = "Segmentation category and type - 3D Slicer General Anatomy list"
DICOM_MASTER = "Segmentation category and type - DICOM master list"
ANATOMIC_CONTEXT = "Anatomic codes - DICOM master list"

# name key -> (SCT code, meaning, context that lists the code, colour in 0..255). Slicer 5.6 looks an
# entry's type up in the context it names and logs "Failed to get terminology type" where it is not
# there, so each code names a context that has it: the General Anatomy list where it does (with its
# colour), else the DICOM master list (which has no colour for these; ours are kept).
_TABLE = {
    "liver": ("10200004", "Liver", GENERAL_ANATOMY, (221, 130, 101)),
    "kidney": ("64033007", "Kidney", GENERAL_ANATOMY, (185, 102, 83)),
    "spleen": ("78961009", "Spleen", GENERAL_ANATOMY, (157, 108, 162)),
    "pancreas": ("15776009", "Pancreas", GENERAL_ANATOMY, (249, 180, 111)),
    "aorta": ("15825003", "Aorta", GENERAL_ANATOMY, (224, 97, 76)),
    "inferiorvenacava": ("64131007", "Inferior vena cava", DICOM_MASTER, (0, 151, 206)),
    "adrenalgland": ("23451007", "Adrenal gland", GENERAL_ANATOMY, (249, 186, 150)),
    "gallbladder": ("28231008", "Gallbladder", GENERAL_ANATOMY, (139, 150, 98)),
    "esophagus": ("32849002", "Esophagus", GENERAL_ANATOMY, (211, 171, 143)),
    "stomach": ("69695003", "Stomach", GENERAL_ANATOMY, (216, 132, 105)),
    "duodenum": ("38848004", "Duodenum", GENERAL_ANATOMY, (255, 253, 229)),
    "brainstem": ("119238007", "Brain stem", DICOM_MASTER, (250, 250, 225)),
    "spinalcord": ("2748008", "Spinal cord", GENERAL_ANATOMY, (244, 214, 49)),
    "parotidgland": ("45289007", "Parotid gland", DICOM_MASTER, (251, 181, 137)),
    "parotid": ("45289007", "Parotid gland", DICOM_MASTER, (251, 181, 137)),
    "larynx": ("4596009", "Larynx", GENERAL_ANATOMY, (150, 208, 243)),
    "mandible": ("91609006", "Mandible", GENERAL_ANATOMY, (222, 198, 101)),
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
    code, meaning, context, rgb = entry
    term = {"contextName": context, "category": _CATEGORY, "type": ["SCT", code, meaning],
            "anatomicContextName": ANATOMIC_CONTEXT}
    display = meaning
    if side:
        term["typeModifier"] = _RIGHT if side == "R" else _LEFT
        display = f"{'Right' if side == 'R' else 'Left'} {meaning.lower()}"
    return display, [c / 255.0 for c in rgb], term
