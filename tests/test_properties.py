"""Property tests of the array-level functions: shapes kept, no NaN, boxes inside, extremes survive."""
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from URSAMLib.baselines import FnpcOptions, fnc, fpc, fpnc
from URSAMLib.prompt_augmentation import augment_box
from URSAMLib.rectification import RectifyOptions, class_threshold, rectify
from URSAMLib.uncertainty import LOG2, binary_entropy, ensemble

shapes = st.tuples(st.integers(1, 4), st.integers(1, 6), st.integers(1, 6))
unit = st.floats(0.0, 1.0, allow_nan=False, width=32)


@st.composite
def region(draw):
    """A box region: ensemble probability, image intensity, and sometimes degenerate masks."""
    shape = draw(shapes)
    p = draw(arrays(np.float32, shape, elements=unit))
    kind = draw(st.sampled_from(["any", "empty", "full", "flat-u"]))
    if kind == "empty":
        p[:] = 0.0
    elif kind == "full":
        p[:] = 1.0
    elif kind == "flat-u":
        p[:] = 0.5
    x = draw(arrays(np.float32, shape, elements=unit))
    return p, x


@settings(max_examples=200, deadline=None)
@given(arrays(np.float32, st.tuples(st.integers(1, 5), st.integers(1, 20)), elements=unit))
def test_entropy_is_bounded_and_shaped(members):
    p, mask = ensemble(members)
    u = binary_entropy(p)
    assert u.shape == members.shape[1:] == mask.shape
    assert np.isfinite(u).all()
    assert (u >= 0).all() and (u <= LOG2 + 1e-6).all()


@settings(max_examples=200, deadline=None)
@given(region(), st.sampled_from(["box", "slice"]), st.sampled_from(["written", "midpoint"]),
       st.floats(0.5, 3.0))
def test_rectification_keeps_shape_and_certain_target(reg, scope, lower, alpha):
    p, x = reg
    mask = p > 0.5
    u = binary_entropy(p)
    opts = RectifyOptions(scope=scope, lower=lower, alpha_h=alpha)
    rect, m_unc, info = rectify(mask, u, x, opts)
    assert rect.shape == mask.shape == m_unc.shape and rect.dtype == bool
    # Certain target voxels stay; certain background voxels never join.
    assert not (mask & ~m_unc & ~rect).any()
    assert not (~mask & ~m_unc & rect).any()
    assert np.isfinite(info["T"])


@settings(max_examples=200, deadline=None)
@given(arrays(np.float32, shapes, elements=st.floats(0, 0.6875, width=32)), st.data())
def test_threshold_lies_in_the_uncertainty_range(u, data):
    mask = data.draw(arrays(bool, u.shape))
    t = class_threshold(u, mask)
    assert u.min() - 1e-6 <= t <= u.max() + 1e-6


@settings(max_examples=200, deadline=None)
@given(region(), st.floats(0.0, 1.0), st.floats(0.0, 1.0), st.floats(0.0, 2.0))
def test_fnpc_baselines_keep_shape(reg, frac, a, b):
    p, x = reg
    mask = p > 0.5
    u = binary_entropy(p)
    opts = FnpcOptions(frac=frac, a=a, b=b)
    for fn in (fnc, fpc, fpnc):
        out = fn(mask, u, x, opts)
        assert out.shape == mask.shape and out.dtype == bool
    # FNC only adds, FPC only removes.
    assert (fnc(mask, u, x, opts) >= mask).all()
    assert (fpc(mask, u, x, opts) <= mask).all()


@settings(max_examples=300, deadline=None)
@given(st.integers(2, 600), st.integers(2, 600), st.data(), st.integers(1, 9), st.floats(0.0, 0.2),
       st.integers(0, 2**31 - 1))
def test_augmented_boxes_stay_inside_the_slice(width, height, data, n, ratio, seed):
    x0 = data.draw(st.integers(0, width - 1)); x1 = data.draw(st.integers(x0, width - 1))
    y0 = data.draw(st.integers(0, height - 1)); y1 = data.draw(st.integers(y0, height - 1))
    boxes = augment_box([x0, y0, x1, y1], n, ratio, (width, height), np.random.default_rng(seed))
    assert boxes.shape == (n, 4) and np.isfinite(boxes).all()
    assert (boxes[:, 0] >= 0).all() and (boxes[:, 2] <= width - 1).all()
    assert (boxes[:, 1] >= 0).all() and (boxes[:, 3] <= height - 1).all()
    assert (boxes[:, 0] <= boxes[:, 2]).all() and (boxes[:, 1] <= boxes[:, 3]).all()
    reach = ratio * max(width, height) + 1e-9
    assert (np.abs(boxes - [x0, y0, x1, y1]).max(initial=0) <= reach + 1e-9) or ratio == 0
