"""A run's options in the Slicer panel's names (no Qt, no scene): RunOptions.

Every default is the engine's (URSAMLib.settings) and every check is too;
this module imports only what Slicer bundles (numpy, SimpleITK), so the panel
can build its parameter node before any package is installed.
"""
from __future__ import annotations

from dataclasses import dataclass

from URSAMLib.errors import URSAMError
from URSAMLib.localization import DEFAULT_MARGIN
from URSAMLib.pipeline import Params
from URSAMLib.prompt_modes import PromptOptions
from URSAMLib.rectification import RectifyOptions
from URSAMLib.registration.deformable import DeformableOptions
from URSAMLib.sam import DEFAULT_BACKEND, DEFAULT_DEVICE, check_backend
from URSAMLib.settings import Settings


def _engineDefaults():
    """The engine's option classes, whose defaults RunOptions takes (URSAMLib.settings)."""

    return Params(), PromptOptions(), DeformableOptions()


_PARAMS, _PROMPTS, _DEFORMABLE = _engineDefaults()


@dataclass
class RunOptions:
    """Model and method parameters of a run, in the panel's names; every default is the engine's."""
    backend: str = DEFAULT_BACKEND
    checkpoint: str = ""
    device: str = DEFAULT_DEVICE
    nAug: int = _PARAMS.n_aug
    ratio: float = _PARAMS.ratio
    seed: int = _PARAMS.seed
    #: margin added around localized boxes: slices in z, pixels of SAM's 1024 grid in-plane (METHOD.md §1)
    marginZ: int = DEFAULT_MARGIN[0]
    marginXY: float = DEFAULT_MARGIN[1]
    thresholdScope: str = _PARAMS.rectify.scope
    lowerBound: str = _PARAMS.rectify.lower
    alphaH: float = _PARAMS.rectify.alpha_h
    #: None: the class-specific threshold of eq. 4
    fixedThreshold: float = _PARAMS.rectify.fixed_threshold
    #: flagged regions smaller than this are left out of the review table
    minComponentVoxels: int = 1
    #: which 2D box each slice gets (URSAMLib.prompt_modes): box3d is the paper's; slice and propagate
    #: follow the support labels warped into the scan, so they need the organs localized from a library
    prompts: str = _PROMPTS.mode
    #: SAM sees a crop around the organs: auto (for slice and propagate), on or off
    zoom: str = _PROMPTS.zoom
    #: fraction of the supports whose warped label must cover a voxel for the organ to be there (slice,
    #: propagate)
    priorThreshold: float = _PROMPTS.prior_threshold
    #: deformable stage after the affine registration, before the support labels are warped
    deformable: str = _DEFORMABLE.method
    #: rectification also follows the warped support labels (needs a template library)
    atlasPrior: bool = _PARAMS.rectify.atlas_prior
    #: with the atlas prior: uncertain voxels that at least this fraction of the supports label are added ...
    atlasAdd: float = _PARAMS.rectify.atlas_add
    #: ... and voxels that fewer than this fraction label are dropped
    atlasKeep: float = _PARAMS.rectify.atlas_keep

    def check(self):
        check_backend(self.backend, self.checkpoint, self.device)
        if int(self.minComponentVoxels) < 1:
            raise URSAMError(f"the smallest review region must be at least 1 voxel, got {self.minComponentVoxels}")
        self.settings()  # the engine's own checks
        return self

    def rectifyOptions(self):
        return RectifyOptions(scope=self.thresholdScope, lower=self.lowerBound, alpha_h=float(self.alphaH),
                              fixed_threshold=None if self.fixedThreshold is None else float(self.fixedThreshold),
                              atlas_prior=bool(self.atlasPrior) if self.atlasPrior in (True, False)
                              else self.atlasPrior, atlas_add=float(self.atlasAdd),
                              atlas_keep=float(self.atlasKeep))

    def settings(self, fromRois=False):
        """The engine's :class:`URSAMLib.settings.Settings` of these options, checked. ``fromRois``: the
        organs are the user's ROIs, which run as box3d prompts with no margin (:func:`URSAMMRML.worker.roiPromptNote`)."""

        try:
            params = Params(n_aug=int(self.nAug), ratio=float(self.ratio), seed=int(self.seed),
                            rectify=self.rectifyOptions())
            prompts = PromptOptions(mode="box3d" if fromRois else self.prompts, zoom=self.zoom,
                                    prior_threshold=float(self.priorThreshold))
        except (TypeError, ValueError) as err:
            raise URSAMError(f"n, ratio, seed and the thresholds must be numbers: {err}") from None
        return Settings(params=params, prompts=prompts,
                        deformable=DeformableOptions(method=self.deformable),
                        margin=None if fromRois else (self.marginZ, self.marginXY)).check()

    def backendKey(self):
        return (self.backend, self.checkpoint or None, self.device)
