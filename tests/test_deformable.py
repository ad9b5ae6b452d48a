"""The deformable stage on real CT: it undoes a known smooth deformation of a head-and-neck scan."""
import numpy as np
import pytest
import SimpleITK as sitk
from shared_data import HN, case

from URSAMLib.errors import URSAMError
from URSAMLib.metrics import dice
from URSAMLib.registration import deformable


@pytest.fixture(scope="module")
def pair():
    """pt_4's neck (40 slices) and the same scan bent by a smooth displacement of up to ~9 mm."""
    image_path, labels_path = case(HN, "pt_4")
    image = sitk.Cast(sitk.ReadImage(str(image_path)), sitk.sitkFloat32)[:, :, 40:80]
    labels = sitk.ReadImage(str(labels_path))[:, :, 40:80]
    size = np.array(image.GetSize())
    z, y, x = np.meshgrid(*[np.linspace(0, 1, n) for n in size[::-1]], indexing="ij")
    field = np.zeros(tuple(size[::-1]) + (3,), np.float64)
    field[..., 0] = 9.0 * np.sin(np.pi * z) * np.sin(np.pi * y)   # x shift, mm: a sideways bend of the neck
    field[..., 1] = 6.0 * np.sin(np.pi * x) * np.cos(np.pi * z)   # y shift, mm
    disp = sitk.GetImageFromArray(field, isVector=True)
    disp.CopyInformation(image)
    bend = sitk.DisplacementFieldTransform(disp)
    # The "query" is the bent scan: query point q shows the support at bend(q).
    query = sitk.Resample(image, image, bend, sitk.sitkLinear, -1000.0, sitk.sitkFloat32)
    query_labels = sitk.Resample(labels, image, bend, sitk.sitkNearestNeighbor, 0)
    return image, labels, query, sitk.GetArrayFromImage(query_labels)


def _warped_dice(labels, query, transform, truth):
    warped = sitk.GetArrayFromImage(sitk.Resample(labels, query, transform, sitk.sitkNearestNeighbor, 0))
    values = [v for v in (1, 2, 3, 4, 5, 6, 7) if (truth == v).sum() > 50]
    return np.mean([dice(warped == v, truth == v) for v in values])


def test_demons_recovers_a_smooth_bend(pair):
    support, labels, query, truth = pair
    identity = sitk.AffineTransform(3)
    before = _warped_dice(labels, query, identity, truth)
    # Two coarse levels (12 and 6 mm) keep the test short; the default adds the 3 mm level.
    opts = deformable.DeformableOptions(method="demons", demons_iterations=(40, 30), demons_shrink=(4, 2))
    transform, seconds = deformable.refine(query, support, identity, opts)
    after = _warped_dice(labels, query, transform, truth)
    assert seconds > 0 and isinstance(transform, sitk.CompositeTransform)
    assert before < 0.8 and after > before + 0.05, (before, after)
    # The composite keeps the affine part: a translation of the support carries through.
    shift = sitk.TranslationTransform(3, (6.0, 0.0, 0.0))
    moved = sitk.Resample(support, support, shift.GetInverse(), sitk.sitkLinear, -1000.0)
    affine = sitk.AffineTransform(3)
    affine.SetTranslation((6.0, 0.0, 0.0))
    t2, _ = deformable.refine(support, moved, affine, deformable.DeformableOptions(method="demons",
                                                                                   demons_iterations=(10,),
                                                                                   demons_shrink=(2,)))
    p = np.array([0.0, 0.0, 0.0]) + np.array(support.TransformContinuousIndexToPhysicalPoint((64, 64, 20)))
    assert np.allclose(t2.TransformPoint(p.tolist()), p + [6.0, 0, 0], atol=2.0)


def test_none_keeps_the_affine_and_bad_methods_are_named(pair):
    support, _, query, _ = pair
    affine = sitk.AffineTransform(3)
    t, s = deformable.refine(query, support, affine, deformable.DeformableOptions(method="none"))
    assert t is affine and s == 0.0
    with pytest.raises(URSAMError, match="unknown deformable method 'thinplate'"):
        deformable.check_method("thinplate")
    if not deformable.elastix_available():
        with pytest.raises(URSAMError, match=r"pip install 'ursam\[elastix\]'"):
            deformable.check_method("elastix")


def test_demons_on_a_thin_slab_keeps_the_labels(pair):
    """A query of 7 slices (a slab): the coarse levels shrink only the axes that have room
    (deformable.MIN_LEVEL_VOXELS), and the warped labels are no worse than the affine ones."""
    support, labels, query, truth = pair
    thin = query[:, :, 16:23]
    thin_truth = truth[16:23]
    identity = sitk.AffineTransform(3)
    before = _warped_dice(labels, thin, identity, thin_truth)
    transform, _ = deformable.refine(thin, support, identity, deformable.DeformableOptions(method="demons"))
    after = _warped_dice(labels, thin, transform, thin_truth)
    assert before > 0.3 and after >= before - 0.02, (before, after)
