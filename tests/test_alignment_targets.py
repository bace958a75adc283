"""The fast target paths against the reference ones, and the transform recorded at extraction time."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from ssl_attention.alignment.geometry import (
    InputTransform,
    coverage_grid,
    feature_targets,
    observed_transform,
    pool_to_grid,
    soft_target_grid,
    union_coverage,
)


@pytest.mark.parametrize("grid", [(6, 4), (14, 7), (42, 56), (3, 11), (4, 4)])
def test_feature_targets_equal_the_rasterised_coverage(grid):
    """Coverage from the union's elementary rectangles = rasterise at input resolution, then pool, where the
    grid divides the 56 x 42 input; on the others (3 x 11, 4 x 4) feature_targets keeps the raster's rule.
    Random boxes, overlapping, partly outside the view."""
    rng = np.random.default_rng(sum(grid))
    transform = InputTransform(0.7, 0.55, 9, 4, 56, 42)
    divides = 42 % grid[0] == 0 and 56 % grid[1] == 0
    for _ in range(20):
        corners = rng.uniform(-20, 110, size=(int(rng.integers(1, 5)), 2, 2))
        boxes = np.concatenate([corners.min(axis=1), corners.max(axis=1)], axis=1)
        expected = coverage_grid(boxes, transform, *grid)
        mapped = transform.apply(boxes)
        got = union_coverage(mapped, transform.input_h, transform.input_w, *grid)
        if divides:
            np.testing.assert_allclose(got, expected, atol=1e-12)
        # exact areas either way: the union's area inside the view, summed over the cells
        cell_area = transform.input_h * transform.input_w / (grid[0] * grid[1])
        np.testing.assert_allclose(got.sum() * cell_area, expected.sum() * cell_area, atol=1e-9)
        targets = feature_targets(boxes, transform, *grid)
        np.testing.assert_allclose(targets.coverage, expected, atol=1e-12)
        np.testing.assert_allclose(targets.soft_target, soft_target_grid(boxes, transform, *grid), atol=1e-12)


def test_block_mean_pooling_equals_area_weights():
    """The divisible-grid path (block means) against the general area-weight path on the same raster."""
    raster = np.random.default_rng(1).random((48, 36))
    blocks = pool_to_grid(raster, 6, 4)
    by_hand = np.array([[raster[r * 8 : (r + 1) * 8, c * 9 : (c + 1) * 9].mean() for c in range(4)] for r in range(6)])
    np.testing.assert_allclose(blocks, by_hand, atol=1e-12)


# What observed_transform reads of a transformers image processor: shortest edge 224, centre crop 224 x 224.
SHORTEST_EDGE_224_CROP_224 = SimpleNamespace(
    image_mean=[0.5] * 3,
    do_resize=True,
    size={"shortest_edge": 224},
    do_center_crop=True,
    crop_size={"height": 224, "width": 224},
)


def test_observed_transform_uses_the_processor_when_its_output_size_matches():
    settings = SHORTEST_EDGE_224_CROP_224
    got = observed_transform(settings, 640, 480, 224, 224)
    # by hand: shortest edge 480 -> 224, long side int(224 * 640 / 480) = 298, crop int((298 - 224) / 2) = 37
    assert (got.crop_left, got.crop_top, got.input_w, got.input_h) == (37, 0, 224, 224)
    assert got.scale_x == pytest.approx(298 / 640) and got.scale_y == pytest.approx(224 / 480)


def test_a_size_set_per_call_is_a_plain_resize():
    """A per-image resolution (the processor asked for another size than its settings, no crop): the output
    size observed wins, and the transform is the plain resize to it."""
    settings = SHORTEST_EDGE_224_CROP_224
    got = observed_transform(settings, 640, 480, 336, 448)
    assert got == InputTransform(448 / 640, 336 / 480, 0, 0, 448, 336)
    box = got.apply(np.array([[320.0, 240.0, 640.0, 480.0]]))
    np.testing.assert_allclose(box, [[224.0, 168.0, 448.0, 336.0]])  # the image's lower-right quarter


def test_nan_percentiles_equal_numpys_per_column():
    from ssl_attention.alignment.ranking import nan_percentiles

    rng = np.random.default_rng(3)
    values = rng.random((40, 9))
    values[rng.random((40, 9)) < 0.3] = np.nan
    values[:, 4] = np.nan  # a column without any score
    values[:, 5] = np.nan
    values[7, 5] = 0.25  # a column with one
    got = nan_percentiles(values, (2.5, 50.0, 97.5))
    for j in range(values.shape[1]):
        column = values[:, j][np.isfinite(values[:, j])]
        expected = np.percentile(column, [2.5, 50.0, 97.5]) if len(column) else np.full(3, np.nan)
        np.testing.assert_allclose(got[:, j], expected, equal_nan=True)


def test_many_features_at_once_equal_one_at_a_time():
    from ssl_attention.alignment.metrics import alignment_metrics_many
    from tests.test_alignment_pipeline import _hand_metrics

    rng = np.random.default_rng(5)
    maps = rng.random((30, 16)).astype(np.float32)
    maps[3] = 0.0
    maps[4, :8] = maps[4, 8:]  # ties
    coverages = np.clip(rng.random((3, 16)) * 1.5 - 0.5, 0, 1)
    softs = rng.random((3, 16))
    softs[1, :5] = 0.0  # a support smaller than the grid
    softs /= softs.sum(axis=1, keepdims=True)
    maps[3, 0] = 1.0  # (the plain per-map route below has no all-zero rule)
    together = alignment_metrics_many(maps, coverages, softs)
    for f in range(3):
        for i in range(len(maps)):  # one map at a time, plain Python (tests/test_alignment_pipeline.py)
            expected = _hand_metrics(maps[i], coverages[f], softs[f])
            for name, value in expected.items():
                assert together[f][name][i] == pytest.approx(value, rel=1e-9, abs=1e-12), (f, i, name)
