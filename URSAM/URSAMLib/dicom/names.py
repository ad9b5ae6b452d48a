"""Structure names for planning systems: AAPM TG-263 where the organ is known, the library's own name elsewhere.

This is the one mapping table of the DICOM outputs (ROI Name of the structure
set, Segment Label of the SEG). TG-263 (AAPM Report 263, *Standardizing
Nomenclatures in Radiation Oncology*, 2018) names a sided organ by its base
name and ``_L`` / ``_R``; its spellings are copied here as the report writes
them. A library name is matched on its words, whatever their case and
separators (``kidney_right``, ``Kidney R``, ``RightKidney``, ``Parotid_R``).
"""
from __future__ import annotations

import re

#: base organ (its words run together, lower case) -> TG-263 name; sided organs get ``_L`` / ``_R`` appended
TG263 = {
    # head and neck
    "brainstem": "Brainstem",
    "spinalcord": "SpinalCord",
    "parotid": "Parotid",
    "parotidgland": "Parotid",
    "esophagus": "Esophagus",
    "oesophagus": "Esophagus",
    "larynx": "Larynx",
    "mandible": "Bone_Mandible",
    "brain": "Brain",
    "eye": "Eye",
    "lens": "Lens",
    "opticchiasm": "OpticChiasm",
    "opticnerve": "OpticNrv",
    "cochlea": "Cochlea",
    "submandibulargland": "Glnd_Submand",
    "thyroid": "Glnd_Thyroid",
    "thyroidgland": "Glnd_Thyroid",
    "trachea": "Trachea",
    # abdomen and pelvis
    "liver": "Liver",
    "kidney": "Kidney",
    "spleen": "Spleen",
    "pancreas": "Pancreas",
    "aorta": "A_Aorta",
    "inferiorvenacava": "V_Venacava_I",
    "adrenalgland": "Glnd_Adrenal",
    "gallbladder": "Gallbladder",
    "stomach": "Stomach",
    "duodenum": "Duodenum",
    "smallbowel": "Bowel_Small",
    "colon": "Colon",
    "urinarybladder": "Bladder",
    "bladder": "Bladder",
    "rectum": "Rectum",
    "prostate": "Prostate",
    # thorax
    "heart": "Heart",
    "lung": "Lung",
}

#: TG-263 base names of paired organs: they need a side, and without one the library's own name is kept
SIDED = {"Parotid", "Eye", "Lens", "OpticNrv", "Cochlea", "Glnd_Submand", "Kidney", "Glnd_Adrenal", "Lung"}

_SIDE_WORDS = {"l": "L", "left": "L", "lt": "L", "r": "R", "right": "R", "rt": "R"}


def _words(name):
    spaced = re.sub(r"([a-z])([A-Z])", r"\1 \2", str(name))  # SpinalCord, RightKidney
    return [w for w in re.split(r"[^a-z0-9]+", spaced.lower()) if w]


def structure_name(name):
    """The name a structure of organ ``name`` gets in the DICOM outputs."""
    words = _words(name)
    side = None
    if len(words) > 1 and words[-1] in _SIDE_WORDS:
        side, words = _SIDE_WORDS[words[-1]], words[:-1]
    elif len(words) > 1 and words[0] in _SIDE_WORDS:
        side, words = _SIDE_WORDS[words[0]], words[1:]
    base = TG263.get("".join(words))
    if base is None:
        return str(name)
    if base in SIDED:
        return f"{base}_{side}" if side else str(name)
    return base if side is None else str(name)  # a side on an unpaired organ: not a name TG-263 knows


def structure_names(organs):
    """The structure name of each ``(label, name)`` organ, unique: where two organs would share a TG-263 name
    (``mandible`` and ``Bone_Mandible``), both keep their library names, which the library keeps unique."""
    names = [structure_name(name) for _, name in organs]
    taken = {}
    for n in names:
        taken[n.lower()] = taken.get(n.lower(), 0) + 1
    return [n if taken[n.lower()] == 1 else str(name) for n, (_, name) in zip(names, organs)]
