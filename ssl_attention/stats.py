"""Head statistics: one row per (image, model, method, layer, head) map, the fused map included.

Every statistic is computed on the map's patch distribution ``p = m / sum(m)`` (raw values ``m`` on the
``grid_h x grid_w`` patch grid, float64), vectorised over all maps of the same grid in a chunk of rows.
The formulas, and why mean distance is measured from the centre of mass, are written out in docs/sql.md:

- ``entropy = -sum p log p`` (natural log, 0 log 0 = 0); ``entropy_norm = entropy / log N``.
- cell centres in input pixels: ``x = (col + 0.5) * input_w / grid_w``, ``y = (row + 0.5) * input_h / grid_h``;
  centre of mass ``c = sum p (x, y)``; ``mean_dist_px = sum p |(x, y) - c|``;
  ``mean_dist_frac = mean_dist_px / sqrt(input_h^2 + input_w^2)``.
- ``top1_mass = max p``; ``top1pct_mass`` = sum of the ``ceil(N / 100)`` largest p.
- ``area60_frac`` = (fewest cells whose p sum to >= 0.6) / N, as in DINO's attention masks.
- ``pearson_fused``, ``jsd_fused`` against the fused map of the same image and layer (fused: 1 and 0).

A map whose values do not sum to a positive finite number (an all-zero Grad-CAM stage) gets NULL for every
distribution statistic.
"""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ssl_attention.warehouse import schema
from ssl_attention.warehouse.atomic import PartitionWriter, WriteStats
from ssl_attention.warehouse.paths import iter_partitions, partition_dir
from ssl_attention.warehouse.tables import flat_map_values

AREA_MASS = 0.6  # DINO keeps the patches holding 60% of the attention mass
TOP_FRACTION_DIVISOR = 100  # top-1%: the ceil(N / 100) largest cells
_CUMSUM_TOLERANCE = 1e-9  # so that a cumulative sum of exactly 0.6 is not lost to rounding

STATISTICS: tuple[str, ...] = (
    "entropy",
    "entropy_norm",
    "mean_dist_px",
    "mean_dist_frac",
    "centroid_x_px",
    "centroid_y_px",
    "top1_mass",
    "top1pct_mass",
    "area60_frac",
    "prefix_mass",
    "register_mass",
    "pearson_fused",
    "jsd_fused",
    "total_mass",
)
"""Numeric statistic columns of ``head_stats`` (the whitelist of names a query may aggregate)."""

_MAP_COLUMNS = [
    "image_id",
    "layer",
    "layer_name",
    "head",
    "grid_h",
    "grid_w",
    "map_values",
    "prefix_mass",
    "register_mass",
    "weights_mode",
    "weights_id",
]


def cell_centres(grid_h: int, grid_w: int, input_h: float, input_w: float) -> tuple[np.ndarray, np.ndarray]:
    """(x, y) of every cell centre in input pixels, row-major, each of shape (N,)."""
    rows, cols = np.divmod(np.arange(grid_h * grid_w), grid_w)
    return (cols + 0.5) * (input_w / grid_w), (rows + 0.5) * (input_h / grid_h)


def _xlogx(p: np.ndarray) -> np.ndarray:
    safe = np.where(p > 0, p, 1.0)
    return np.where(p > 0, p * np.log(safe), 0.0)


def distribution_stats(
    values: np.ndarray, grid_h: int, grid_w: int, input_h: float, input_w: float
) -> dict[str, np.ndarray]:
    """Statistics of R maps on one grid. ``values``: (R, N) raw maps. Returns arrays of shape (R,), NaN where
    a statistic is undefined; also ``"p"``, the (R, N) normalised distributions (NaN rows for invalid maps)."""
    values = np.asarray(values, dtype=np.float64)
    rows, cells = values.shape
    if cells != grid_h * grid_w:
        raise ValueError(f"maps have {cells} cells, the grid {grid_h}x{grid_w} has {grid_h * grid_w}")
    total = values.sum(axis=1)
    valid = np.isfinite(total) & (total > 0) & np.all(np.isfinite(values), axis=1)
    p = np.full_like(values, np.nan)
    p[valid] = values[valid] / total[valid, None]
    pv = np.where(valid[:, None], p, 0.0)  # NaN-free copy; invalid rows are masked at the end

    entropy = -_xlogx(pv).sum(axis=1)
    entropy_norm = entropy / math.log(cells) if cells > 1 else np.full(rows, np.nan)

    xs, ys = cell_centres(grid_h, grid_w, input_h, input_w)
    cx, cy = pv @ xs, pv @ ys  # centre of mass, (R,)
    distance = np.hypot(xs[None, :] - cx[:, None], ys[None, :] - cy[:, None])  # (R, N)
    mean_dist = (pv * distance).sum(axis=1)

    ranked = -np.sort(-pv, axis=1)  # descending
    top_k = -(-cells // TOP_FRACTION_DIVISOR)  # ceil(N / 100) in integers
    cumulative = np.cumsum(ranked, axis=1)
    area_cells = np.argmax(cumulative >= AREA_MASS - _CUMSUM_TOLERANCE, axis=1) + 1

    out = {
        "total_mass": total,
        "entropy": entropy,
        "entropy_norm": entropy_norm,
        "mean_dist_px": mean_dist,
        "mean_dist_frac": mean_dist / math.hypot(input_h, input_w),
        "centroid_x_px": cx,
        "centroid_y_px": cy,
        "top1_mass": ranked[:, 0],
        "top1pct_mass": ranked[:, :top_k].sum(axis=1),
        "area60_frac": area_cells / cells,
    }
    for name, column in out.items():
        if name != "total_mass":
            out[name] = np.where(valid, column, np.nan)
    out["p"] = p
    return out


def pearson_rows(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Row-wise Pearson correlation of (R, N) arrays; NaN where either row is constant or invalid."""
    pc_, qc = p - p.mean(axis=1, keepdims=True), q - q.mean(axis=1, keepdims=True)
    denominator = np.sqrt((pc_**2).sum(axis=1) * (qc**2).sum(axis=1))
    with np.errstate(invalid="ignore", divide="ignore"):
        r = (pc_ * qc).sum(axis=1) / denominator
    return np.where(denominator > 0, np.clip(r, -1.0, 1.0), np.nan)


def jensen_shannon_rows(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Row-wise Jensen-Shannon divergence (natural log, in [0, log 2]) of (R, N) distributions."""
    m = 0.5 * (p + q)
    # sum p log(p/m) = sum xlogx(p) - sum p log m, with 0 log 0 = 0 and m > 0 wherever p > 0
    log_m = np.log(np.where(m > 0, m, 1.0))
    kl_pm = (_xlogx(p) - np.where(p > 0, p * log_m, 0.0)).sum(axis=1)
    kl_qm = (_xlogx(q) - np.where(q > 0, q * log_m, 0.0)).sum(axis=1)
    return np.clip(0.5 * (kl_pm + kl_qm), 0.0, math.log(2.0))


def _fused_partner(image_codes: np.ndarray, layers: np.ndarray, is_fused: np.ndarray) -> np.ndarray:
    """For every row, the index of the fused row of the same (image, layer), or -1."""
    keys = image_codes.astype(np.int64) * (int(layers.max(initial=0)) + 1) + layers.astype(np.int64)
    fused_rows = np.flatnonzero(is_fused)
    order = np.argsort(keys[fused_rows], kind="stable")
    sorted_keys = keys[fused_rows][order]
    if len(sorted_keys) == 0:
        return np.full(len(keys), -1)
    position = np.clip(np.searchsorted(sorted_keys, keys), 0, len(sorted_keys) - 1)
    found = sorted_keys[position] == keys
    return np.where(found, fused_rows[order][position], -1)


InputSizes = Mapping[str, tuple[int, int]] | tuple[int, int]


def _row_input_sizes(maps: pa.Table, input_sizes: InputSizes) -> tuple[np.ndarray, np.ndarray]:
    """(input_h, input_w) of every row: one size for all, or each row's image's own (any resolution)."""
    rows = maps.num_rows
    if isinstance(input_sizes, tuple):
        return np.full(rows, input_sizes[0], dtype=np.int64), np.full(rows, input_sizes[1], dtype=np.int64)
    image_ids = maps["image_id"].to_pylist()
    missing = sorted({i for i in image_ids if i not in input_sizes})
    if missing:
        raise ValueError(f"no input size (inputs table) for image(s) {', '.join(missing[:5])}")
    sizes = np.array([input_sizes[i] for i in image_ids], dtype=np.int64).reshape(rows, 2)
    return sizes[:, 0], sizes[:, 1]


def head_stats_table(maps: pa.Table, input_sizes: InputSizes, computed_at: dt.datetime | None = None) -> pa.Table:
    """The ``head_stats`` rows of a chunk of ``attention_maps`` rows (any number of images and grids).

    ``input_sizes``: the model's input (height, width) in pixels, one for every row or per image id.
    """
    rows = maps.num_rows
    computed_at = computed_at or dt.datetime.now(dt.UTC)
    if rows == 0:
        return schema.HEAD_STATS.empty_table()
    grid_h = maps["grid_h"].to_numpy().astype(np.int64)
    grid_w = maps["grid_w"].to_numpy().astype(np.int64)
    input_h, input_w = _row_input_sizes(maps, input_sizes)
    layers = maps["layer"].to_numpy().astype(np.int64)
    is_fused = maps["head"].is_null().to_numpy(zero_copy_only=False)
    image_codes = pc.dictionary_encode(maps["image_id"]).combine_chunks().indices.to_numpy()
    partner = _fused_partner(image_codes, layers, is_fused)

    flat, offsets, lengths = flat_map_values(maps)

    columns = {name: np.full(rows, np.nan) for name in STATISTICS}
    shapes = set(zip(grid_h.tolist(), grid_w.tolist(), input_h.tolist(), input_w.tolist(), strict=True))
    for gh, gw, ih, iw in sorted(shapes):
        members = np.flatnonzero((grid_h == gh) & (grid_w == gw) & (input_h == ih) & (input_w == iw))
        # rows of one grid are contiguous in flat only by accident; gather them
        cells = gh * gw
        index = offsets[members][:, None] + np.arange(cells)[None, :]
        block = flat[index]  # (R_g, N)
        stats = distribution_stats(block, gh, gw, ih, iw)
        p = stats.pop("p")
        for name, column in stats.items():
            columns[name][members] = column
        # agreement with the fused map: the partner is on the same grid and input (same image and layer)
        local = np.full(rows, -1)
        local[members] = np.arange(len(members))
        partner_local = np.where(partner[members] >= 0, local[np.maximum(partner[members], 0)], -1)
        has_partner = partner_local >= 0
        q = np.where(has_partner[:, None], p[np.maximum(partner_local, 0)], np.nan)
        pearson = pearson_rows(np.nan_to_num(p), np.nan_to_num(q))
        jsd = jensen_shannon_rows(np.nan_to_num(p), np.nan_to_num(q))
        both_valid = has_partner & np.all(np.isfinite(p), axis=1) & np.all(np.isfinite(q), axis=1)
        columns["pearson_fused"][members] = np.where(both_valid, pearson, np.nan)
        columns["jsd_fused"][members] = np.where(both_valid, jsd, np.nan)

    valid = np.isfinite(columns["entropy"])
    columns["pearson_fused"] = np.where(is_fused & valid, 1.0, columns["pearson_fused"])  # fused vs itself
    columns["jsd_fused"] = np.where(is_fused & valid, 0.0, columns["jsd_fused"])
    columns["prefix_mass"] = maps["prefix_mass"].to_numpy().astype(np.float64)
    columns["register_mass"] = maps["register_mass"].to_numpy().astype(np.float64)

    table = {
        "image_id": maps["image_id"],
        "layer": maps["layer"],
        "layer_name": maps["layer_name"],
        "head": maps["head"],
        "grid_h": maps["grid_h"],
        "grid_w": maps["grid_w"],
        "num_cells": pa.array(lengths.astype(np.int32)),
        "input_h": pa.array(input_h.astype(np.int16)),
        "input_w": pa.array(input_w.astype(np.int16)),
        **{name: pa.array(column, pa.float64(), mask=np.isnan(column)) for name, column in columns.items()},
        "weights_mode": maps["weights_mode"],
        "weights_id": maps["weights_id"],
        "computed_at": pa.array([computed_at] * rows, schema.TIMESTAMP),
    }
    return pa.table(table).select(schema.HEAD_STATS.names).cast(schema.HEAD_STATS)


def _row_groups_by_image(path: Path) -> Iterator[pa.Table]:
    """The partition's row groups, one at a time, in order of their first image id."""
    parquet = pq.ParquetFile(path)
    meta = parquet.metadata
    column = meta.schema.names.index("image_id")
    order = []
    for index in range(meta.num_row_groups):
        stats = meta.row_group(index).column(column).statistics
        order.append((stats.min if stats is not None and stats.has_min_max else "", index))
    for _, index in sorted(order):
        yield parquet.read_row_group(index, columns=_MAP_COLUMNS)


def read_input_sizes(warehouse: Path, model: str, shard: str | None = None) -> dict[str, tuple[int, int]]:
    """{image_id: (input_h, input_w)} of ``model`` from the inputs table (each image's own size), of one shard
    or (None) of all."""
    files = [p.path for p in iter_partitions(warehouse, "inputs", model=model) if shard in (None, p.keys["shard"])]
    if not files:
        where = partition_dir(warehouse, "inputs", model=model)
        raise FileNotFoundError(f"no inputs rows for {model!r} under {where}; extract the model first")
    sizes = {}
    for path in files:
        table = pq.read_table(path, columns=["image_id", "input_h", "input_w"])
        ids, heights, widths = (table[name].to_pylist() for name in ("image_id", "input_h", "input_w"))
        sizes.update({image_id: (int(h), int(w)) for image_id, h, w in zip(ids, heights, widths, strict=True)})
    return sizes


def write_head_stats(warehouse: Path, model: str, shard: str | None = None) -> dict[str, WriteStats]:
    """Compute ``head_stats`` for every method partition of ``model`` (of one image shard, or None: every shard)
    and replace each partition atomically; returns the write of each method (summed over its shards).

    Streams the maps row group by row group (a few images at a time); memory does not grow with images.
    """
    warehouse = Path(warehouse)
    sources = [p for p in iter_partitions(warehouse, "attention_maps", model=model) if shard in (None, p.keys["shard"])]
    if not sources:
        return {}  # nothing extracted for this model (shard) yet
    results: dict[str, WriteStats] = {}
    computed_at = dt.datetime.now(dt.UTC)
    for source in sources:
        method = source.keys["method"]
        input_sizes = read_input_sizes(warehouse, model, source.keys["shard"])
        target = partition_dir(warehouse, "head_stats", **source.keys)
        with PartitionWriter(target, schema.HEAD_STATS, cluster_by="image_id") as writer:
            for group in _row_groups_by_image(source.path):
                writer.write(head_stats_table(group, input_sizes, computed_at))
            written = writer.commit()
        before = results.get(method)
        results[method] = (
            written
            if before is None
            else WriteStats(written.path.parent.parent, before.rows + written.rows, before.bytes + written.bytes)
        )
    return results
