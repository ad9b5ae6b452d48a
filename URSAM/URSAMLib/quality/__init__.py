"""Which organs of a result are wrong, by how much, and on which slices.

For every segmented organ: a predicted Dice with an interval, fitted on the
template library's own leave-one-out runs (:mod:`.library`); a review decision
("check" below the organ's threshold); and the slices of its box ranked by
their expected wrong voxels (:mod:`.report`). Inputs are plain arrays over the
organ's region (:class:`OrganEvidence`); :func:`organ_quality` gives the
report's ``quality`` dict of one organ; :mod:`.metrics` scores an estimate
against the truth.
"""
from __future__ import annotations

from .features import FEATURES, VOXEL_FEATURES, OrganEvidence, base_error, expected_dice, organ_features
from .library import (
                      LibraryCase,
                      TrainingSet,
                      cross_validate,
                      cross_validated_pairs,
                      fit_from,
                      fit_quality,
                      held_out_cases,
                      nested_sets,
                      organ_stats,
                      training_set,
)
from .metrics import (
                      OrganOutcome,
                      PairPrediction,
                      QualityScores,
                      dice_prediction_scores,
                      quality_scores,
                      review_scores,
                      slice_share,
                      voxel_auroc,
)
from .model import DiceModel, OrganQuality, OrganStats, QualityModel, VoxelErrorModel
from .report import QUALITY_KEYS, input_slice_index, organ_quality, quality_dict, ranked_slices

__all__ = ["FEATURES", "VOXEL_FEATURES", "OrganEvidence", "base_error", "expected_dice", "organ_features",
           "LibraryCase", "TrainingSet", "cross_validate", "cross_validated_pairs", "fit_from", "fit_quality",
           "held_out_cases", "nested_sets", "organ_stats", "training_set", "OrganOutcome", "PairPrediction",
           "QualityScores", "dice_prediction_scores", "quality_scores", "review_scores", "slice_share",
           "voxel_auroc", "DiceModel", "OrganQuality", "OrganStats", "QualityModel", "VoxelErrorModel",
           "QUALITY_KEYS", "input_slice_index", "organ_quality", "quality_dict", "ranked_slices"]
