"""Alignment metrics against hand-computed toy grids, a per-map reference and a brute-force pixel IoU."""

from __future__ import annotations

import math

import numpy as np
import pytest

from ssl_attention.alignment.geometry import InputTransform, coverage_grid
from ssl_attention.alignment.metrics import (
    KL_EPSILON,
    METRIC_COLUMNS,
    PERCENTILES,
    alignment_metrics,
    descending_order,
    top_k_size,
)


def score_one(values, coverage, soft=None) -> dict[str, float]:
    coverage = np.asarray(coverage, dtype=np.float64)
    soft = np.full(len(coverage), 1 / len(coverage)) if soft is None else np.asarray(soft, dtype=np.float64)
    out = alignment_metrics(np.asarray(values, dtype=np.float64).reshape(1, -1), coverage, soft)
    return {k: v[0].item() for k, v in out.items()}


def cells(n: int, values: dict[int, float]) -> np.ndarray:
    out = np.zeros(n)
    for index, value in values.items():
        out[index] = value
    return out


def test_top_k_sizes_by_hand():
    # N = 16: 8, 4, round(1.6) = 2, round(0.8) = 1; N = 196: 98, 49, round(19.6) = 20, round(9.8) = 10
    assert [top_k_size(16, p) for p in PERCENTILES] == [8, 4, 2, 1]
    assert [top_k_size(196, p) for p in PERCENTILES] == [98, 49, 20, 10]
    assert top_k_size(225, 50) == 113  # 112.5: halves round up
    assert top_k_size(4, 95) == 1  # round(0.2) = 0, at least one cell


# 4 x 4 grid, the region covers cells 5 and 6 (row 1, columns 1-2) completely: sum c = 2
REGION = cells(16, {5: 1.0, 6: 1.0})


def test_one_hot_map_inside_the_region():
    s = score_one(cells(16, {5: 1.0}), REGION)
    assert s["coverage"] == 1.0
    assert s["pointing_hit"] is True
    assert s["iou_95"] == pytest.approx(1 / (1 + 2 - 1))  # k = 1: S = {5}
    assert s["iou_90"] == pytest.approx(1 / (2 + 2 - 1))  # k = 2: S = {5, 0} (zeros tie, lowest index first)
    # k = 8: S = {5, 0, 1, 2, 3, 4, 6, 7} holds both region cells
    assert s["iou_50"] == pytest.approx(2 / (8 + 2 - 2))


def test_one_hot_map_outside_the_region():
    s = score_one(cells(16, {12: 1.0}), REGION)
    assert s["coverage"] == 0.0
    assert s["pointing_hit"] is False
    assert s["iou_95"] == 0.0  # S = {12}
    assert s["iou_75"] == 0.0  # S = {12, 0, 1, 2}
    assert s["iou_50"] == pytest.approx(2 / (8 + 2 - 2))  # S = {12, 0..6}: both region cells


def test_exact_k_iou_with_a_half_covered_cell():
    # coverage: cell 5 whole, cell 6 half: sum c = 1.5
    coverage = cells(16, {5: 1.0, 6: 0.5})
    # ranks: 6 > 9 > 5 > 0 > everything else (zeros)
    values = cells(16, {6: 0.4, 9: 0.3, 5: 0.2, 0: 0.1})
    s = score_one(values, coverage)
    assert s["iou_95"] == pytest.approx(0.5 / (1 + 1.5 - 0.5))  # k = 1: {6}
    assert s["iou_90"] == pytest.approx(0.5 / (2 + 1.5 - 0.5))  # k = 2: {6, 9}
    assert s["iou_75"] == pytest.approx(1.5 / (4 + 1.5 - 1.5))  # k = 4: {6, 9, 5, 0}
    assert s["iou_50"] == pytest.approx(1.5 / (8 + 1.5 - 1.5))  # k = 8
    assert s["coverage"] == pytest.approx((0.4 * 0.5 + 0.2 * 1.0) / 1.0)
    assert s["pointing_hit"] is True  # argmax 6 has c = 0.5 >= 0.5


def test_ties_are_broken_by_cell_index():
    coverage = cells(16, {7: 1.0})
    tied = cells(16, {3: 1.0, 7: 1.0})  # two equal peaks: 3 comes first
    s = score_one(tied, coverage)
    assert s["pointing_hit"] is False  # argmax = 3, outside
    assert s["iou_95"] == 0.0  # S = {3}
    assert s["iou_90"] == pytest.approx(1 / (2 + 1 - 1))  # S = {3, 7}
    swapped = score_one(cells(16, {7: 1.0, 11: 1.0}), coverage)
    assert swapped["pointing_hit"] is True and swapped["iou_95"] == pytest.approx(1.0)


def test_kl_and_mse_against_a_known_soft_target():
    soft = np.array([0.5, 0.25, 0.25, 0.0])
    coverage = np.zeros(4)
    exact = score_one([2.0, 1.0, 1.0, 0.0], coverage, soft)  # normalises to the target itself
    assert exact["mse"] == pytest.approx(0.0, abs=1e-15)
    assert exact["kl"] == pytest.approx(0.0, abs=1e-7)
    uniform = score_one([1.0, 1.0, 1.0, 1.0], coverage, soft)
    assert uniform["kl"] == pytest.approx(0.5 * math.log(2), abs=1e-7)  # 0.5 ln(0.5/0.25) + 2 * 0.25 ln 1
    assert uniform["mse"] == pytest.approx((0.25**2 + 0 + 0 + 0.25**2) / 4)
    # a map with no mass where the target has some: q = (a + eps) / (1 + 4 eps)
    missing = score_one([0.0, 1.0, 1.0, 0.0], coverage, soft)
    q = np.array([KL_EPSILON, 0.5 + KL_EPSILON, 0.5 + KL_EPSILON]) / (1 + 4 * KL_EPSILON)
    expected = 0.5 * math.log(0.5 / q[0]) + 0.25 * math.log(0.25 / q[1]) + 0.25 * math.log(0.25 / q[2])
    assert missing["kl"] == pytest.approx(expected, rel=1e-12)
    assert missing["mse"] == pytest.approx((0.25 + 0.0625 + 0.0625 + 0) / 4)


def test_an_all_zero_map_scores_as_the_uniform_map():
    coverage = cells(16, {0: 1.0, 1: 0.5, 15: 0.25})
    soft = cells(16, {0: 0.6, 1: 0.4})
    zero = score_one(np.zeros(16), coverage, soft)
    flat = score_one(np.ones(16), coverage, soft)
    assert zero == pytest.approx(flat)
    assert zero["coverage"] == pytest.approx(1.75 / 16)


def reference_metrics(values: np.ndarray, coverage: np.ndarray, soft: np.ndarray) -> dict[str, float]:
    """One map by plain Python: sorted() with (-value, index) keys and the formulas of the docstring."""
    n = len(values)
    order = sorted(range(n), key=lambda i: (-float(values[i]), i))
    total = float(coverage.sum())
    out: dict[str, float] = {}
    for p in PERCENTILES:
        k = max(1, math.floor(n * (100 - p) / 100 + 0.5))
        inside = sum(coverage[i] for i in order[:k])
        out[f"iou_{p}"] = inside / (k + total - inside)
    mass = float(values.sum())
    a = values / mass if mass > 0 else np.full(n, 1 / n)
    out["coverage"] = float(a @ coverage)
    out["pointing_hit"] = bool(coverage[order[0]] >= 0.5)
    q = (a + KL_EPSILON) / (1 + n * KL_EPSILON)
    out["kl"] = sum(g * math.log(g / q[i]) for i, g in enumerate(soft) if g > 0)
    out["mse"] = float(np.mean((a - soft) ** 2))
    return out


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("grid", [(4, 4), (14, 14), (3, 7)])
def test_vectorised_metrics_equal_a_per_map_reference(dtype, grid):
    rng = np.random.default_rng(7)
    n = grid[0] * grid[1]
    maps = np.round(rng.random((60, n)) * 5) / 5  # few distinct values: many ties
    maps[0] = 0.0
    maps[1, : n // 2] = 1.0
    maps = maps.astype(dtype)
    coverage = np.round(rng.random(n) * 4) / 4 * (rng.random(n) < 0.4)
    soft = rng.random(n) * (rng.random(n) < 0.8)
    soft /= soft.sum()
    out = alignment_metrics(maps, coverage, soft)
    assert set(out) == set(METRIC_COLUMNS)
    for row in range(len(maps)):
        expected = reference_metrics(maps[row].astype(np.float64), coverage, soft)
        got = {k: out[k][row].item() for k in METRIC_COLUMNS}
        assert got == pytest.approx(expected, rel=1e-9, abs=1e-12), row


def test_float32_order_matches_a_stable_descending_argsort():
    rng = np.random.default_rng(3)
    maps = (np.round(rng.random((200, 37)) * 9) / 9).astype(np.float32)
    maps[0, 3] = -0.0  # sorts like 0.0
    assert np.array_equal(descending_order(maps), np.argsort(-maps.astype(np.float64), axis=1, kind="stable"))


@pytest.mark.parametrize("grid_h, grid_w, s", [(4, 4, 4), (3, 5, 6), (5, 2, 3)])
def test_grid_iou_equals_brute_force_pixel_iou(grid_h, grid_w, s):
    """Each cell is s x s input pixels. The map upsampled by nearest neighbour gives every pixel its cell's
    value; taking the top k*s*s pixels ordered by (-value, cell index, position in the cell) takes exactly the
    pixels of the top-k cells, so the pixel IoU against the region mask must equal the grid formula."""
    rng = np.random.default_rng(grid_h * 10 + grid_w)
    input_h, input_w = grid_h * s, grid_w * s
    transform = InputTransform(0.5, 0.5, 0, 0, input_w, input_h)  # original image twice the input's size
    for trial in range(5):
        boxes = []
        mask = np.zeros((input_h, input_w), dtype=bool)  # the union, drawn pixel by pixel
        for _ in range(rng.integers(1, 4)):
            x0, x1 = sorted(rng.choice(input_w + 1, 2, replace=False))
            y0, y1 = sorted(rng.choice(input_h + 1, 2, replace=False))
            boxes.append([2 * x0, 2 * y0, 2 * x1, 2 * y1])  # original pixels
            mask[y0:y1, x0:x1] = True
        coverage = coverage_grid(np.array(boxes), transform, grid_h, grid_w)
        maps = np.round(rng.random((8, grid_h * grid_w)) * 3) / 3  # ties
        scores = alignment_metrics(maps, coverage, np.full(grid_h * grid_w, 1 / (grid_h * grid_w)))
        rows, cols = np.mgrid[0:input_h, 0:input_w]
        cell_of_pixel = ((rows // s) * grid_w + cols // s).ravel()
        within_cell = ((rows % s) * s + cols % s).ravel()
        for m, values in enumerate(maps):
            upsampled = np.kron(values.reshape(grid_h, grid_w), np.ones((s, s))).ravel()
            order = np.lexsort((within_cell, cell_of_pixel, -upsampled))  # last key is the primary one
            for p in PERCENTILES:
                top = np.zeros(input_h * input_w, dtype=bool)
                top[order[: top_k_size(grid_h * grid_w, p) * s * s]] = True
                region = mask.ravel()
                pixel_iou = (top & region).sum() / (top | region).sum()
                assert scores[f"iou_{p}"][m] == pytest.approx(pixel_iou, abs=1e-6), (trial, m, p)
            pixel_coverage = (upsampled * mask.ravel()).sum() / upsampled.sum()
            assert scores["coverage"][m] == pytest.approx(pixel_coverage, abs=1e-9)


def test_bad_maps_are_refused_with_a_reason():
    coverage, soft = np.zeros(4), np.full(4, 0.25)
    with pytest.raises(ValueError, match="non-negative"):
        alignment_metrics(np.array([[0.5, -0.1, 0.3, 0.3]]), coverage, soft)
    with pytest.raises(ValueError, match="finite"):
        alignment_metrics(np.array([[np.nan, 0.1, 0.3, 0.3]]), coverage, soft)
    with pytest.raises(ValueError, match=r"shape \(4,\)"):
        alignment_metrics(np.ones((2, 4)), np.zeros(5), soft)
    with pytest.raises(ValueError, match=r"\(M, N\)"):
        alignment_metrics(np.ones(4), coverage, soft)


def test_no_maps_give_empty_columns():
    out = alignment_metrics(np.zeros((0, 4)), np.zeros(4), np.full(4, 0.25))
    assert all(len(v) == 0 for v in out.values()) and set(out) == set(METRIC_COLUMNS)
