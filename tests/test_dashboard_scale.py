"""The colour scale modes (dashboards/views.py): what range each one gives and what it hides, against values
computed by hand."""

from __future__ import annotations

import numpy as np
import pytest

from dashboards import views
from tests.outline_helpers import cells_enclosed, top_mass_cells

# a layer: fused + one head, 2 x 3 grids
FUSED = np.array([[0.10, 0.20, 0.30], [0.15, 0.15, 0.10]])
HEAD = np.array([[0.05, 0.05, 0.60], [0.10, 0.10, 0.10]])
LAYER = np.stack([FUSED, HEAD])


@pytest.mark.parametrize(
    ("mode", "shared", "expected"),
    [
        ("zero", False, (0.0, 0.30)),
        ("zero", True, (0.0, 0.60)),
        ("min", False, (0.10, 0.30)),
        ("min", True, (0.05, 0.60)),
        ("mass", False, (0.0, 0.30)),
    ],
)
def test_display_range_of_each_mode(mode: str, shared: bool, expected: tuple[float, float]) -> None:
    assert views.display_range(LAYER, FUSED, shared, mode) == pytest.approx(expected)


def test_percentile_clip_spans_the_2nd_to_98th_percentile() -> None:
    values = np.arange(101, dtype=np.float64).reshape(1, 101)  # 0..100: the k-th percentile is k
    values[0, -1] = 1e6  # one hot cell: 0 -> max would flatten every other cell into the lowest colours
    low, high = views.display_range(values, values, False, "clip")
    assert low == pytest.approx(2.0)
    assert high == pytest.approx(98.0)  # sorted 0..99, 1e6: the 98th percentile interpolates at index 98


def test_a_constant_map_gets_a_usable_range() -> None:
    flat = np.full((2, 3), 0.5)
    for mode in views.CONTRAST:
        low, high = views.display_range(flat, flat, False, mode)
        assert high > low, mode
    with pytest.raises(ValueError, match="valid: zero, min, clip, mass"):
        views.display_range(flat, flat, False, "log")


def test_mass_mask_is_the_smallest_set_holding_60_percent() -> None:
    # total 1.0; sorted 0.60 (HEAD's hot cell) alone reaches 60%
    assert views.mass_mask(HEAD).tolist() == [[False, False, True], [False, False, False]]
    # FUSED: total 1.0; 0.30 + 0.20 = 0.50 < 0.6, + 0.15 (first of the two, by position) = 0.65
    assert views.mass_mask(FUSED).tolist() == [[False, True, True], [True, False, False]]
    assert not views.mass_mask(np.zeros((2, 2))).any()


def test_mass_mode_hides_the_rest_on_screen_and_in_the_tiles() -> None:
    shown = views.shown_values(FUSED, "mass")
    assert np.isnan(shown).tolist() == (~views.mass_mask(FUSED)).tolist()
    np.testing.assert_array_equal(views.shown_values(FUSED, "zero"), FUSED.astype(np.float32))
    tiles = views.scale_tiles(list(LAYER), shared=True, mode="mass")
    assert np.nanmax(tiles[1]) == pytest.approx(1.0)  # HEAD's hot cell is the layer's top
    assert np.isnan(tiles[0]).sum() == 3 and np.isnan(tiles[1]).sum() == 5
    # min -> max, independent: each tile spans [0, 1] exactly
    for tile in views.scale_tiles(list(LAYER), shared=False, mode="min"):
        assert (float(tile.min()), float(tile.max())) == (0.0, 1.0)


def test_mask_outline_is_the_boundary_of_the_mask_cells() -> None:
    # FUSED's top-60% cells: (0, 1), (0, 2), (1, 0); segments (x0, y0, x1, y1), x = column edge, y = row edge
    segments = {tuple(s) for s in views.mask_outline(views.mass_mask(FUSED)).tolist()}
    expected = {
        (1, 0, 2, 0), (1, 1, 2, 1), (1, 0, 1, 1),  # cell (0, 1): top, bottom, left
        (2, 0, 3, 0), (2, 1, 3, 1), (3, 0, 3, 1),  # cell (0, 2): top, bottom, right (the border)
        (0, 1, 1, 1), (0, 2, 1, 2), (0, 1, 0, 2), (1, 1, 1, 2),  # cell (1, 0): every side
    }  # fmt: skip
    assert segments == expected
    assert views.mask_outline(np.zeros((2, 2), bool)).shape == (0, 4)
    assert {tuple(s) for s in views.mask_outline(np.ones((1, 1), bool)).tolist()} == {
        (0, 0, 1, 0), (0, 1, 1, 1), (0, 0, 0, 1), (1, 0, 1, 1)
    }  # fmt: skip


@pytest.mark.parametrize("seed", range(5))
def test_contour_mode_outlines_the_top_60_percent_and_hides_nothing(seed: int) -> None:
    values = np.random.default_rng(seed).gamma(0.5, size=(6, 7))
    inside = cells_enclosed(views.mask_outline(views.mass_mask(values)), values.shape)  # read back by ray casting
    assert inside.tolist() == top_mass_cells(values).tolist()
    assert values[inside].sum() >= 0.6 * values.sum() > values[inside].sum() - values[inside].min()  # the fewest
    np.testing.assert_array_equal(views.shown_values(values, "contour"), values.astype(np.float32))
    assert views.display_range(values, values, False, "contour") == pytest.approx((0.0, values.max()))
