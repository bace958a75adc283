"""Alignment of many maps with one feature's targets at once.

With ``a`` a map over N cells (raster order), ``c`` the feature's coverage (area fraction of each cell inside
the union of its regions) and ``G`` its soft target (sums to 1):

- IoU@p, p in PERCENTILES: S = the k = max(1, round(N (100 - p) / 100)) highest cells (halves round up;
  ties broken by cell index, lower first); IoU = sum_S c / (k + sum c - sum_S c), the exact area IoU at grid
  resolution in units of cells.
- coverage = sum a c / sum a: the share of the map's mass inside the feature.
- pointing game: a hit when the highest cell (the lowest index among ties) has c >= 0.5, i.e. lies at
  least half inside the feature.
- KL(G || q) = sum_{G_i > 0} G_i log(G_i / q_i) with q = (a / sum a + eps) / (1 + N eps), eps = KL_EPSILON:
  the map normalised to sum 1 and smoothed so that a cell with no mass costs log(G_i / eps) rather than
  infinity while q still sums to 1 (so KL >= 0); in nats.
- MSE = mean_i (a_i / sum a - G_i)^2.

An all-zero map is taken as the uniform map (no preference): its normalised form is 1 / N everywhere, its
coverage is mean(c), and its top-k and argmax fall to the lowest cell indices by the tie rule. Maps must be
finite and non-negative.
"""

from __future__ import annotations

import numpy as np

PERCENTILES = (50, 75, 90, 95)
KL_EPSILON = 1e-8  # far below one cell's share of mass (1/N ~ 4e-3 on 16 x 16 grids)
METRIC_COLUMNS = (*(f"iou_{p}" for p in PERCENTILES), "coverage", "pointing_hit", "kl", "mse")
BLOCK_MAPS = 8192  # maps scored per block: memory stays at a few (BLOCK_MAPS, N) arrays


def top_k_size(n_cells: int, percentile: int) -> int:
    """k = max(1, round(N (100 - p) / 100)), halves rounded up, in exact integer arithmetic."""
    return max(1, (n_cells * (100 - percentile) + 50) // 100)


def descending_order(maps: np.ndarray) -> np.ndarray:
    """(M, N) cell indices of each map from highest to lowest value, ties by cell index (lower first).

    float32 maps are sorted as one uint64 key per cell, (~bits of the value) << 32 | cell index: the bit
    pattern of a non-negative float32 orders like its value, so an ascending sort of the keys is the
    descending order with ties by index, several times faster than a stable argsort. Other dtypes use a
    stable argsort of the negated values."""
    if maps.dtype == np.float32:
        bits = (maps + np.float32(0.0)).view(np.uint32).astype(np.uint64)  # + 0.0 turns -0.0 into 0.0
        keys = ((np.uint64(0xFFFFFFFF) - bits) << np.uint64(32)) | np.arange(maps.shape[1], dtype=np.uint64)
        keys.sort(axis=1)
        return (keys & np.uint64(0xFFFFFFFF)).astype(np.intp)
    return np.argsort(-maps, axis=1, kind="stable")


def _check_maps(maps: np.ndarray) -> None:
    if maps.ndim != 2:
        raise ValueError(f"maps must be an (M, N) array, got shape {maps.shape}")
    if not np.isfinite(maps).all() or (maps < 0).any():
        raise ValueError("maps must be finite and non-negative")


def _check_target(n: int, coverage: np.ndarray, soft_target: np.ndarray) -> None:
    if coverage.shape != (n,) or soft_target.shape != (n,):
        raise ValueError(
            f"coverage {coverage.shape} and soft target {soft_target.shape} must both have shape ({n},) like the maps"
        )
    if (coverage < 0).any() or (coverage > 1).any():
        raise ValueError("coverage fractions must lie in [0, 1]")


_COLUMN = {name: i for i, name in enumerate(METRIC_COLUMNS)}


def _score_block(maps: np.ndarray, coverages: np.ndarray, soft_targets: np.ndarray, out: np.ndarray) -> None:
    """Scores of (M, N) maps against F features' (F, N) coverages and soft targets into ``out`` (F, metrics,
    M); the map's order, its normalised form and its log are computed once for all F."""
    n = maps.shape[1]
    values = maps.astype(np.float64)
    mass = values.sum(axis=1)
    empty = mass <= 0
    if empty.any():
        normalised = np.where(empty[:, None], 1.0 / n, values / np.where(empty, 1.0, mass)[:, None])  # (M, N)
    else:
        normalised = np.divide(values, mass[:, None], out=values)
    sizes = [top_k_size(n, p) for p in PERCENTILES]
    top = descending_order(maps)[:, : max(sizes)]  # (M, k_max): only the top cells enter an IoU
    log_smoothed = normalised + KL_EPSILON  # in place from here: log((a + eps) / (1 + N eps))
    log_smoothed /= 1.0 + n * KL_EPSILON
    np.log(log_smoothed, out=log_smoothed)
    kl_cross = log_smoothed @ soft_targets.T  # (M, F): sum_i G_i log q_i (cells outside the support add 0)
    covered = normalised @ coverages.T  # (M, F)
    iou_columns = [_COLUMN[f"iou_{p}"] for p in PERCENTILES]
    step = max(1, BLOCK_MAPS // len(maps))  # features scored together: temporaries of at most BLOCK_MAPS rows
    for first in range(0, len(coverages), step):
        f = slice(first, min(first + step, len(coverages)))
        coverage, soft_target = coverages[f], soft_targets[f]  # (F', N)
        inside_sorted = np.cumsum(coverage[:, top], axis=2)  # (F', M, k_max): sum of c over the top 1..k_max
        total = coverage.sum(axis=1)[:, None]
        for column, k in zip(iou_columns, sizes, strict=True):
            inside = inside_sorted[:, :, k - 1]
            out[f, column] = inside / (k + total - inside)
        out[f, _COLUMN["coverage"]] = covered[:, f].T
        out[f, _COLUMN["pointing_hit"]] = coverage[:, top[:, 0]] >= 0.5
        neg_entropy = np.array([float(g @ np.log(g)) for g in (t[t > 0] for t in soft_target)])
        out[f, _COLUMN["kl"]] = neg_entropy[:, None] - kl_cross[:, f].T
    scratch = np.empty_like(normalised)  # one (M, N) buffer: fits a cache where (F, M, N) would not
    for f in range(len(soft_targets)):
        difference = np.subtract(normalised, soft_targets[f], out=scratch)
        out[f, _COLUMN["mse"]] = np.square(difference, out=difference).mean(axis=1)


def alignment_metrics(maps: np.ndarray, coverage: np.ndarray, soft_target: np.ndarray) -> dict[str, np.ndarray]:
    """Every metric of METRIC_COLUMNS for (M, N) maps against one feature's (N,) coverage and (N,) soft
    target: a dict of (M,) arrays (float64; ``pointing_hit`` bool). Maps are scored in blocks of BLOCK_MAPS."""
    coverage = np.asarray(coverage, dtype=np.float64)
    soft_target = np.asarray(soft_target, dtype=np.float64)
    _check_maps(np.asarray(maps))  # errors name this call's shapes
    _check_target(np.asarray(maps).shape[1], coverage, soft_target)
    return alignment_metrics_many(maps, coverage[None, :], soft_target[None, :])[0]


def alignment_metrics_many(
    maps: np.ndarray, coverages: np.ndarray, soft_targets: np.ndarray
) -> list[dict[str, np.ndarray]]:
    """``alignment_metrics`` of (M, N) maps against each of F features, (F, N) coverages and soft targets:
    one dict per feature, in order. Each map is sorted once for all the features."""
    scores = alignment_metric_array(maps, coverages, soft_targets)
    return [
        {
            name: (row > 0.5 if name == "pointing_hit" else row)
            for name, row in zip(METRIC_COLUMNS, feature, strict=True)
        }
        for feature in scores
    ]


def alignment_metric_array(maps: np.ndarray, coverages: np.ndarray, soft_targets: np.ndarray) -> np.ndarray:
    """``alignment_metrics_many`` as one (F, len(METRIC_COLUMNS), M) float64 array, metrics in METRIC_COLUMNS
    order (``pointing_hit`` as 1.0 / 0.0): what the alignment table's rows are built from."""
    maps = np.asarray(maps)
    if maps.dtype not in (np.float32, np.float64):
        maps = maps.astype(np.float64)
    coverages = np.asarray(coverages, dtype=np.float64)
    soft_targets = np.asarray(soft_targets, dtype=np.float64)
    if coverages.ndim != 2 or soft_targets.shape != coverages.shape:
        raise ValueError(
            f"coverages {coverages.shape} and soft targets {soft_targets.shape} must both be (F, N) arrays"
        )
    _check_maps(maps)
    for coverage, soft_target in zip(coverages, soft_targets, strict=True):
        _check_target(maps.shape[1], coverage, soft_target)
    out = np.empty((len(coverages), len(METRIC_COLUMNS), len(maps)))
    for start in range(0, len(maps), BLOCK_MAPS):
        _score_block(maps[start : start + BLOCK_MAPS], coverages, soft_targets, out[:, :, start : start + BLOCK_MAPS])
    return out
