"""The Slicer panel's settings (its parameter node): names, types, defaults and bounds. No Qt.

``URSAM.py`` builds its ``@parameterNodeWrapper`` class from :func:`panelParameters`,
whose defaults are :class:`URSAMMRML.options.RunOptions`' and so the engine's;
:func:`runOptions` turns the node's values back into RunOptions. The widgets
bind to these names through their ``SlicerParameterName`` property.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from URSAMLib.prompt_modes import MODES, ZOOMS
from URSAMLib.rectification import LOG2, LOWER_BOUNDS, SCOPES
from URSAMLib.registration.deformable import METHODS
from URSAMLib.sam import BACKEND_NAMES, DEVICES

from .options import RunOptions


@dataclass(frozen=True)
class PanelParameter:
    name: str
    type: type
    default: object
    #: the allowed values (a combo box), or None
    choices: Optional[tuple] = None
    #: (lowest, highest) of a number, or None
    range: Optional[tuple] = None


#: the fixed threshold the panel offers when its checkbox is ticked (the engine's default is none: eq. 4)
PANEL_FIXED_THRESHOLD = 0.2


def panelParameters():
    """The panel's scalar settings (the node references, input volume and template segmentation, are
    declared by the module itself)."""

    d = RunOptions()
    P = PanelParameter
    return [
        P("libraryPath", str, ""),
        P("organs", str, ""),
        P("backend", str, d.backend, choices=tuple(BACKEND_NAMES)),
        P("checkpoint", str, d.checkpoint),
        P("device", str, d.device, choices=tuple(DEVICES)),
        P("nAug", int, d.nAug, range=(1, 50)),
        P("ratio", float, d.ratio, range=(0.0, 0.49)),
        P("seed", int, d.seed, range=(0, 2147483647)),
        P("marginZ", int, d.marginZ, range=(0, 50)),
        P("marginXY", float, d.marginXY, range=(0.0, 200.0)),
        P("prompts", str, d.prompts, choices=tuple(MODES)),
        P("zoom", str, d.zoom, choices=tuple(ZOOMS)),
        P("priorThreshold", float, d.priorThreshold, range=(0.0, 1.0)),
        P("deformable", str, d.deformable, choices=tuple(METHODS)),
        P("atlasPrior", bool, d.atlasPrior),
        P("atlasAdd", float, d.atlasAdd, range=(0.0, 1.0)),
        P("atlasKeep", float, d.atlasKeep, range=(0.0, 1.0)),
        P("thresholdScope", str, d.thresholdScope, choices=tuple(SCOPES)),
        P("lowerBound", str, d.lowerBound, choices=tuple(LOWER_BOUNDS)),
        P("alphaH", float, d.alphaH, range=(0.1, 10.0)),
        P("useFixedThreshold", bool, d.fixedThreshold is not None),
        P("fixedThreshold", float, d.fixedThreshold if d.fixedThreshold is not None else PANEL_FIXED_THRESHOLD,
          range=(0.0, round(LOG2, 3))),
        P("minComponentVoxels", int, d.minComponentVoxels, range=(1, 100000)),
    ]


#: panel settings that are no RunOptions field
_PANEL_ONLY = ("libraryPath", "organs", "useFixedThreshold")


def runOptions(values):
    """:class:`URSAMMRML.options.RunOptions` from the panel's values (a mapping of parameter names)."""

    kw = {p.name: values[p.name] for p in panelParameters() if p.name not in _PANEL_ONLY and p.name in values}
    kw["checkpoint"] = str(kw.get("checkpoint") or "").strip()
    if not values.get("useFixedThreshold", False):
        kw["fixedThreshold"] = None
    return RunOptions(**kw)


def pathToShow(nodePath, widgetPath):
    """``(path, source)``: which of a path parameter and its ctkPathLineEdit wins when the panel syncs them.

    The line edit selects its most recent history entry when its history is
    read (CTK's ``ctkPathLineEdit::retrieveHistory``) while the parameter node
    of a new scene holds no path: that pre-selection is kept and goes into the
    node ("widget"). Otherwise the node's path is shown ("node"), e.g. from a
    loaded scene.
    """
    nodePath, widgetPath = str(nodePath or "").strip(), str(widgetPath or "").strip()
    if not nodePath and widgetPath:
        return widgetPath, "widget"
    return nodePath, "node"
