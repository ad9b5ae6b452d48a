"""The settings of one run of the method, gathered.

Each step owns its options, their defaults and their ``check()``:
:class:`URSAMLib.pipeline.Params` (n, ratio, seed, with
:class:`URSAMLib.rectification.RectifyOptions`),
:class:`URSAMLib.prompt_modes.PromptOptions`,
:class:`URSAMLib.registration.deformable.DeformableOptions`, the box margin of
:mod:`URSAMLib.localizers`. :class:`Settings` holds one of each for a run; the
``ursam`` options, the Slicer logic's ``RunOptions`` and the Slicer panel's
parameter node take their defaults from these classes and nowhere else.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Optional

from .localization import DEFAULT_MARGIN, check_margin
from .localizers import DEFAULT_LOCALIZER, check_localizer
from .pipeline import Params
from .prompt_modes import AUTO, PromptOptions, default_mode
from .registration.deformable import DeformableOptions

#: Params fields that change how fast a run is, never its masks
SPEED_ONLY_PARAMS = ("decode_batch",)


@dataclass
class Settings:
    """Everything the method's result depends on, besides the scan, the model and the boxes."""
    params: Params = field(default_factory=Params)
    prompts: PromptOptions = field(default_factory=PromptOptions)
    deformable: DeformableOptions = field(default_factory=DeformableOptions)
    #: margin added to the boxes: (slices in z, px of SAM's 1024 grid in-plane); None: the source's
    #: default (METHOD.md §1's for localized boxes, none for a box file's or ROIs)
    margin: Optional[tuple] = DEFAULT_MARGIN
    localizer: str = DEFAULT_LOCALIZER

    def check(self):
        self.params.check()
        self.prompts.check()
        self.deformable.check()
        if self.margin is not None:
            self.margin = check_margin(self.margin)
        check_localizer(self.localizer)
        return self

    def resolved(self, localization=None):
        """These settings with the source's defaults in place of "auto" and None, checked: the prompt mode
        (:func:`URSAMLib.prompt_modes.default_mode`: a box file's own prompts) and the margin (the one the
        boxes carry). ``localization``: the run's :class:`URSAMLib.localization.Localization`; None: what a
        run with a template library would resolve to."""
        given = localization is not None and localization.given
        mode = self.prompts.mode
        if mode == AUTO:
            mode = default_mode(self.localizer, localization.boxes if given else None)
        margin = self.margin
        if margin is None:
            margin = localization.margin if localization is not None else DEFAULT_MARGIN
        return replace(self, prompts=replace(self.prompts, mode=mode), margin=margin).check()

    def with_mode(self, mode):
        """The same settings with another prompt mode."""
        return replace(self, prompts=replace(self.prompts, mode=mode))

    def warps_labels(self, localization=None):
        """Whether this run warps the support labels into the query: the slice-adaptive prompts and the
        atlas prior need them, and only the registration localizer of a template library has them.

        Without ``localization``: whether it would, for a localization by this run's localizer.
        """
        mode = default_mode(self.localizer) if self.prompts.mode == AUTO else self.prompts.mode
        wanted = mode != "box3d" or bool(self.params.rectify.atlas_prior)
        if localization is None:
            return wanted and self.localizer == "registration"
        return wanted and localization.warps_labels

    def result_json(self):
        """:meth:`to_json` without the fields that change only the speed: what a result depends on (the
        digests of batch resume and of an evaluation's cases)."""
        out = self.to_json()
        out["params"] = {k: v for k, v in out["params"].items() if k not in SPEED_ONLY_PARAMS}
        return out

    def to_json(self):
        return {"params": self.params.to_json(), "prompts": self.prompts.to_json(),
                "deformable": self.deformable.to_json(),
                "margin_z_xy": None if self.margin is None else list(self.margin),
                "localizer": self.localizer}
