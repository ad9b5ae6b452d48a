"""The settings of one run of the method, gathered.

Each step owns its options, their defaults and their ``check()``:
:class:`URSAMLib.pipeline.Params` (n, ratio, seed, with
:class:`URSAMLib.rectification.RectifyOptions`),
:class:`URSAMLib.prompt_modes.PromptOptions`,
:class:`URSAMLib.registration.deformable.DeformableOptions`, the box margin of
:mod:`URSAMLib.localize`. :class:`Settings` holds one of each for a run; the
``ursam`` options, the Slicer logic's ``RunOptions`` and the Slicer panel's
parameter node take their defaults from these classes and nowhere else.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from .localization import DEFAULT_MARGIN, check_margin
from .localize import DEFAULT_LOCALIZER, LOCALIZERS
from .errors import URSAMError
from .pipeline import Params
from .prompt_modes import PromptOptions
from .registration.deformable import DeformableOptions


@dataclass
class Settings:
    """Everything the method's result depends on, besides the scan, the model and the boxes."""
    params: Params = field(default_factory=Params)
    prompts: PromptOptions = field(default_factory=PromptOptions)
    deformable: DeformableOptions = field(default_factory=DeformableOptions)
    #: margin added to localized boxes: (slices in z, px of SAM's 1024 grid in-plane)
    margin: tuple = DEFAULT_MARGIN
    localizer: str = DEFAULT_LOCALIZER

    def check(self):
        self.params.check()
        self.prompts.check()
        self.deformable.check()
        self.margin = check_margin(self.margin)
        if self.localizer not in LOCALIZERS:
            raise URSAMError(f"unknown localizer {self.localizer!r}; choose one of {', '.join(sorted(LOCALIZERS))}")
        return self

    def warps_labels(self, localization=None):
        """Whether this run warps the support labels into the query: the slice-adaptive prompts and the
        atlas prior need them, and only the registration localizer of a template library has them.

        Without ``localization``: whether it would, for a localization by this run's localizer.
        """
        wanted = self.prompts.mode != "box3d" or bool(self.params.rectify.atlas_prior)
        if localization is None:
            return wanted and self.localizer == "registration"
        return wanted and localization.warps_labels

    def to_json(self):
        return {"params": self.params.to_json(), "prompts": self.prompts.to_json(),
                "deformable": self.deformable.to_json(), "margin_z_xy": list(self.margin),
                "localizer": self.localizer}
