"""Each formula of METHOD.md §3-§5 on small hand-made arrays with known answers."""
import numpy as np

from URSAMLib.baselines import FnpcOptions, fnc, fnpc_uncertain, fpc, fpnc
from URSAMLib.prompt_augmentation import augment_box, organ_rngs
from URSAMLib.rectification import RectifyOptions, class_threshold, rectify, uncertain_mask
from URSAMLib.uncertainty import LOG2, binary_entropy, ensemble


def test_entropy_is_zero_where_all_members_agree():
    members = np.array([[1.0, 0.0, 1.0], [1.0, 0.0, 1.0], [1.0, 0.0, 1.0]])
    p, mask = ensemble(members)
    assert np.array_equal(binary_entropy(p), np.zeros(3, np.float32))
    assert mask.tolist() == [True, False, True]


def test_entropy_is_log2_where_half_agree():
    members = np.array([[1.0, 0.0], [0.0, 1.0]])
    p, _ = ensemble(members)
    assert np.allclose(binary_entropy(p), [LOG2, LOG2])
    assert np.isclose(LOG2, np.log(2))


def test_entropy_known_value():
    # H(0.25) = -(0.25 ln 0.25 + 0.75 ln 0.75) = 0.5623351446
    assert np.isclose(binary_entropy(np.array([0.25]))[0], 0.5623351446, atol=1e-6)


def test_ensemble_mask_is_mean_above_half():
    members = np.array([[0.9, 0.2, 0.6], [0.3, 0.2, 0.6], [0.9, 0.9, 0.2]])
    p, mask = ensemble(members)
    assert np.allclose(p, [0.7, 1.3 / 3, 1.4 / 3])
    assert mask.tolist() == [True, False, False]


def test_class_threshold_formula():
    u = np.array([[0.0, 0.2], [0.4, 0.6]])
    mask = np.array([[1, 0], [0, 0]], bool)
    # T = 0 + (1 + 4) / (2 * 4) * (0.6 - 0) = 0.375
    assert np.isclose(class_threshold(u, mask), 0.375)
    m_unc, t = uncertain_mask(u, mask)
    assert np.isclose(t, 0.375)
    assert m_unc.tolist() == [[False, False], [True, True]]


def test_threshold_scope_slice_uses_each_slice():
    u = np.array([[[0.0, 1.0]], [[0.0, 0.5]]])
    mask = np.zeros_like(u, bool)
    m_unc, ts = uncertain_mask(u, mask, RectifyOptions(scope="slice"))
    # per slice T = min + (0 + 2)/(2*2) (max-min) = half the slice range
    assert np.allclose(ts, [0.5, 0.25])
    assert m_unc[:, 0, 1].tolist() == [True, True]


def test_rectification_rule():
    # Box region of 6 voxels: certain target at intensity 0.8, certain background at 0.2.
    mask = np.array([1, 1, 0, 0, 0, 0], bool)
    u = np.array([0.0, 0.0, 0.0, 0.6, 0.6, 0.6])
    x = np.array([0.8, 0.8, 0.2, 0.7, 0.2, 0.99])
    # T = 0 + (2 + 6) / 12 * 0.6 = 0.4: the last three voxels are uncertain.
    rect, m_unc, info = rectify(mask, u, x, RectifyOptions(lower="written", alpha_h=1.2))
    assert m_unc.tolist() == [False, False, False, True, True, True]
    assert np.isclose(info["I_t"], 0.8) and np.isclose(info["I_b"], 0.2)
    # bounds: (0.8 - 0.2) / 2 = 0.3 < x < 0.96: only the voxel at 0.7 joins
    assert np.isclose(info["lower"], 0.3) and np.isclose(info["upper"], 0.96)
    assert rect.tolist() == [True, True, False, True, False, False]


def test_rectification_midpoint_bound_and_uncertain_target_voxels():
    mask = np.array([1, 1, 1, 0, 0, 0], bool)
    u = np.array([0.0, 0.0, 0.6, 0.0, 0.6, 0.6])
    x = np.array([0.8, 0.8, 0.3, 0.2, 0.45, 0.6])
    rect, m_unc, info = rectify(mask, u, x, RectifyOptions(lower="midpoint", alpha_h=1.5))
    # T = (3 + 6) / 12 * 0.6 = 0.45 -> voxels 2, 4, 5 uncertain; midpoint = 0.5
    assert np.isclose(info["lower"], 0.5)
    # voxel 2 was in ŷ but uncertain and too dark: dropped; voxel 5 (0.6) joins; voxel 4 (0.45) does not.
    assert rect.tolist() == [True, True, False, False, False, True]


def test_fixed_threshold_option():
    u = np.array([0.1, 0.3, 0.5])
    m_unc, t = uncertain_mask(u, np.zeros(3, bool), RectifyOptions(fixed_threshold=0.2))
    assert t == 0.2 and m_unc.tolist() == [False, True, True]


def test_fnpc_threshold_is_a_fifth_of_the_range():
    u = np.array([0.0, 0.1, 0.3, 1.0])
    assert fnpc_uncertain(u, 0.2).tolist() == [False, False, True, True]


def test_fnc_adds_uncertain_background_in_range():
    mask = np.array([1, 1, 0, 0, 0], bool)
    u = np.array([0.0, 0.0, 1.0, 1.0, 1.0])
    x = np.array([1.0, 1.0, 0.6, 0.4, 0.8])  # μ = 1: range (0.5, 0.7)
    assert fnc(mask, u, x, FnpcOptions()).tolist() == [True, True, True, False, False]


def test_fpc_removes_uncertain_target_out_of_range():
    mask = np.array([1, 1, 1, 1, 0], bool)
    u = np.array([0.0, 1.0, 1.0, 1.0, 0.0])
    x = np.array([1.0, 0.6, 0.1, 1.0, 0.0])  # μ = 0.675: range (0.3375, 0.4725)
    out = fpc(mask, u, x, FnpcOptions())
    assert out.tolist() == [True, False, False, False, False]


def test_fpnc_is_fnc_then_fpc_with_one_mu():
    mask = np.array([1, 1, 0, 0], bool)
    u = np.array([0.0, 1.0, 1.0, 1.0])
    x = np.array([1.0, 0.6, 0.45, 0.9])  # μ = 0.8: FNC range (0.4, 0.56)
    after_fnc = fnc(mask, u, x)
    assert after_fnc.tolist() == [True, True, True, False]
    # FPC with the same μ keeps uncertain voxels inside (0.4, 0.56): voxel 1 (0.6) goes, voxel 2 stays
    assert fpnc(mask, u, x).tolist() == [True, False, True, False]


def test_augmented_boxes_are_seeded_and_bounded():
    a = augment_box([10, 20, 40, 60], 3, 0.01, (128, 128), organ_rngs(7, [1])[1])
    b = augment_box([10, 20, 40, 60], 3, 0.01, (128, 128), organ_rngs(7, [1])[1])
    assert np.array_equal(a, b)
    assert a.shape == (3, 4)
    assert np.all(np.abs(a - [10, 20, 40, 60]) <= 0.01 * 128 + 1e-9)
    c = augment_box([10, 20, 40, 60], 3, 0.01, (128, 128), organ_rngs(8, [1])[1])
    assert not np.array_equal(a, c)
