"""Masks as contours: every voxel back under both fill rules, one polygon per piece, holes as keyholes; names."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from matplotlib.path import Path as MplPath
from scipy import ndimage
from skimage.draw import polygon2mask

from URSAMLib.dicom.contours import mask_polygons
from URSAMLib.dicom.names import structure_name, structure_names


def even_odd(polygons, shape):
    """What a planning system that combines the contours of a slice by XOR fills (scikit-image's crossing test
    for each polygon)."""
    out = np.zeros(shape, bool)
    for p in polygons:
        out ^= polygon2mask(shape, p[:, ::-1])
    return out


def union_of_nonzero(polygons, shape):
    """What a reader that fills each contour on its own (matplotlib's winding test) and takes the union fills."""
    rows, cols = np.mgrid[:shape[0], :shape[1]]
    centres = np.column_stack([cols.ravel(), rows.ravel()])
    out = np.zeros(shape, bool)
    for p in polygons:
        out |= MplPath(p).contains_points(centres).reshape(shape)
    return out


@settings(max_examples=300, deadline=None)
@given(arrays(bool, st.tuples(st.integers(1, 14), st.integers(1, 14))))
def test_every_mask_comes_back_under_both_fill_rules_one_polygon_per_piece(mask):
    polygons = mask_polygons(mask)
    assert len(polygons) == ndimage.label(mask)[1]
    assert all(len(p) >= 4 for p in polygons)
    assert np.array_equal(even_odd(polygons, mask.shape), mask)
    assert np.array_equal(union_of_nonzero(polygons, mask.shape), mask)


def test_blobs_with_many_holes_and_islands_come_back():
    rng = np.random.default_rng(7)
    for _ in range(40):
        mask = ndimage.gaussian_filter(rng.random((70, 60)), 2) > 0.5
        mask ^= ndimage.gaussian_filter(rng.random((70, 60)), 1.5) > 0.55
        polygons = mask_polygons(mask)
        assert len(polygons) == ndimage.label(mask)[1]
        assert np.array_equal(even_odd(polygons, mask.shape), mask)
        assert np.array_equal(union_of_nonzero(polygons, mask.shape), mask)


def test_one_voxel_is_a_square_on_its_edges():
    mask = np.zeros((5, 6), bool)
    mask[2, 3] = True
    (square,) = mask_polygons(mask)
    assert sorted(map(tuple, square)) == [(2.5, 1.5), (2.5, 2.5), (3.5, 1.5), (3.5, 2.5)]


def test_a_ring_is_one_keyhole_contour_and_an_island_in_it_another():
    mask = np.zeros((9, 9), bool)
    mask[1:8, 1:8] = True
    mask[2:7, 2:7] = False
    mask[4, 4] = True
    ring, island = mask_polygons(mask)
    area = 0.5 * abs(np.sum(ring[:, 0] * np.roll(ring[:, 1], -1) - np.roll(ring[:, 0], -1) * ring[:, 1]))
    assert area == mask.sum() - 1  # the ring's voxels: the channel has no width
    # the channel runs on a voxel edge (half-integer column), from the outside to the hole and back
    xs = ring[:, 0]
    assert np.all(np.abs(xs - np.round(xs)) == 0.5)
    assert len(island) == 4
    assert np.array_equal(even_odd([ring, island], mask.shape), mask)


def test_pieces_touching_at_a_corner_are_two_contours():
    mask = np.array([[1, 0], [0, 1]], bool)
    assert len(mask_polygons(mask)) == 2


@pytest.mark.parametrize("name, expected", [
    ("Brainstem", "Brainstem"), ("SpinalCord", "SpinalCord"), ("Parotid_R", "Parotid_R"), ("Parotid_L", "Parotid_L"),
    ("Esophagus", "Esophagus"), ("Larynx", "Larynx"), ("Mandible", "Bone_Mandible"), ("liver", "Liver"),
    ("kidney_right", "Kidney_R"), ("kidney_left", "Kidney_L"), ("spleen", "Spleen"), ("pancreas", "Pancreas"),
    ("aorta", "A_Aorta"), ("inferior_vena_cava", "V_Venacava_I"), ("adrenal_gland_right", "Glnd_Adrenal_R"),
    ("adrenal_gland_left", "Glnd_Adrenal_L"), ("gallbladder", "Gallbladder"), ("esophagus", "Esophagus"),
    ("stomach", "Stomach"), ("duodenum", "Duodenum"), ("Right Kidney", "Kidney_R"), ("LeftParotid", "Parotid_L"),
    # what TG-263 has no name for keeps the library's own name
    ("kidney", "kidney"), ("tumour_bed", "tumour_bed"), ("liver_right", "liver_right"),
])
def test_tg263_names(name, expected):
    assert structure_name(name) == expected


def test_names_stay_unique():
    assert structure_names([(1, "mandible"), (2, "Bone_Mandible"), (3, "liver")]) == ["mandible", "Bone_Mandible",
                                                                                       "Liver"]
