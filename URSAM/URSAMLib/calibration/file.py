"""A library's calibration of the fusion, as a file: :class:`Calibration` (``calibration.json``).

What the calibration chose per organ (its :class:`URSAMLib.fusion.OrganFusion`
and ablations), the leave-one-out Dice of every source and of the fused
result, the review budget its flag thresholds were fitted for, and how it was
made. :func:`find_calibration` is the one rule for which calibration a run
uses. Making one: :func:`URSAMLib.calibrate.calibrate`.
"""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from .. import __version__
from ..atlas_prior import LocalWeighting
from ..atomic import atomic_write_text
from ..errors import URSAMError
from ..fusion import DEFAULT_REVIEW_BUDGET, OrganFusion
from ..quality.model import QualityModel

CALIBRATION_FILE = "calibration.json"
#: with fewer supports a leave-one-out fit says little: the defaults apply
MIN_SUPPORTS = 3
#: the prompt modes a calibration compares by default (their SAM maps share one view of each scan)
CANDIDATE_MODES = ("slice", "box3d")


@dataclass
class Calibration:
    """A library's calibration: per organ the fusion model, its ablations, and the leave-one-out Dice."""
    #: organ name -> its fusion
    organs: Dict[str, OrganFusion]
    #: ablation name (``no_sam``, ``no_rectify``) -> {organ name -> OrganFusion}
    ablations: Dict[str, Dict[str, OrganFusion]] = field(default_factory=dict)
    #: organ name -> {source or model -> mean leave-one-out Dice}
    loo_dice: Dict[str, dict] = field(default_factory=dict)
    supports: List[str] = field(default_factory=list)
    #: the Settings of the leave-one-out runs (JSON)
    settings: dict = field(default_factory=dict)
    candidate_modes: Tuple[str, ...] = CANDIDATE_MODES
    local: LocalWeighting = LocalWeighting()
    #: the flag thresholds put at most this fraction of an organ's volume into the flags; a query is capped at it
    budget: float = DEFAULT_REVIEW_BUDGET
    seconds: float = 0.0
    #: which supports were segmented with the others as their templates (a large library: a subset)
    queries: dict = field(default_factory=dict)
    #: organ name -> how many of its best-fitting supports localize and vote for it (None: every one)
    per_organ: dict = field(default_factory=dict)
    #: the quality estimate fitted on the same leave-one-out runs (None: a run's estimate is uncalibrated)
    quality: Optional[QualityModel] = None
    path: Optional[str] = None
    sha256: Optional[str] = None

    def modes(self, default_mode, organs=None):
        """The prompt modes a query run needs for these organs (names), ``default_mode`` first."""
        chosen = [m.sam_mode or default_mode for n, m in self.organs.items() if organs is None or n in organs]
        return list(dict.fromkeys([default_mode] + [m for m in chosen if m != default_mode]))

    def variant(self, name):
        """The same calibration with an ablation's models (``no_sam``, ``no_rectify``) in place of the fit."""
        return replace(self, organs={**self.organs, **self.ablations[name]})

    def describe(self, used=True):
        return {"used": bool(used), "path": self.path, "sha256": self.sha256, "supports": list(self.supports),
                "organs": sorted(self.organs), "budget": self.budget}

    def to_json(self):
        return {"ursam_version": __version__, "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
                "supports": list(self.supports), "settings": self.settings,
                "candidate_modes": list(self.candidate_modes), "local_weighting": self.local.to_json(),
                "budget": self.budget, "seconds": round(self.seconds, 1), "queries": self.queries,
                "per_organ": self.per_organ,
                "quality": self.quality.to_json() if self.quality is not None else None,
                "organs": {n: m.to_json() for n, m in self.organs.items()},
                "ablations": {a: {n: m.to_json() for n, m in ms.items()} for a, ms in self.ablations.items()},
                "loo_dice": self.loo_dice}

    @classmethod
    def from_json(cls, data, path=None, sha256=None):
        try:
            local = LocalWeighting.from_json(data.get("local_weighting"))
            return cls(organs={n: OrganFusion.from_json(m) for n, m in data["organs"].items()},
                       ablations={a: {n: OrganFusion.from_json(m) for n, m in ms.items()}
                                  for a, ms in data.get("ablations", {}).items()},
                       loo_dice=data.get("loo_dice", {}), supports=list(data.get("supports", [])),
                       settings=data.get("settings", {}),
                       candidate_modes=tuple(data.get("candidate_modes", CANDIDATE_MODES)), local=local,
                       budget=float(data.get("budget", DEFAULT_REVIEW_BUDGET)), seconds=float(data.get("seconds", 0.0)),
                       queries=dict(data.get("queries", {})), per_organ=dict(data.get("per_organ", {})),
                       quality=QualityModel.from_json(data["quality"]) if data.get("quality") else None,
                       path=str(path) if path else None, sha256=sha256)
        except (KeyError, TypeError, ValueError) as err:
            raise URSAMError(f"calibration file is not one URSAM wrote ({type(err).__name__}: {err})", path) from None

    @classmethod
    def load(cls, path):
        path = Path(path)
        if not path.is_file():
            raise URSAMError("calibration file not found", path)
        raw = path.read_bytes()
        try:
            data = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise URSAMError(f"calibration file is not valid JSON ({getattr(err, 'msg', err)})", path) from None
        if not isinstance(data, dict):
            raise URSAMError("calibration file is not one URSAM wrote", path)
        return cls.from_json(data, path, hashlib.sha256(raw).hexdigest())

    def save(self, path):
        atomic_write_text(path, json.dumps(self.to_json(), indent=1))
        return Calibration.load(path)


def find_calibration(library, path=None, progress=None, use=True, fuses=True):
    """The calibration a run on this library uses: ``path`` if given (a file, or a :class:`Calibration`
    already read), else the library's own ``calibration.json``; None (with a warning) where there is none,
    or too few supports for one.

    ``use``: False for an uncalibrated run (--no-calibration, the paper's
    pipeline); ``fuses``: whether the run warps the support labels the fusion
    needs (:meth:`URSAMLib.settings.Settings.warps_labels`). A file given is
    read either way, before any registration, so that a bad one fails at once.
    """
    given = (path if isinstance(path, Calibration) else Calibration.load(path)) if path is not None and use \
        else None
    if not use or not fuses:
        return None
    if given is not None:
        return given
    if library is None:
        return None
    own = Path(library.path) / CALIBRATION_FILE
    if own.is_file():
        calibration = Calibration.load(own)
        stale = sorted(set(calibration.supports) ^ set(library.case_ids()))
        if stale and progress is not None:
            progress.warn(f"the library's calibration was fitted on other support scans (differs in "
                          f"{', '.join(stale)}): calibrate it again (ursam templates calibrate)")
        return calibration
    if progress is not None:
        n = len(library.case_ids())
        why = (f"it has {n} support scan(s); calibration needs at least {MIN_SUPPORTS}" if n < MIN_SUPPORTS
               else "run `ursam templates calibrate` on it")
        progress.warn(f"the template library has no calibration ({why}): the uncalibrated default is used "
                      "(UR-SAM with the atlas prior)")
    return None
