"""The ``head_ranking`` table: per (layer, metric, feature) of one (model, method), every head, the fused map
and the two baselines side by side, with mean, median, a seeded bootstrap CI of the mean, and ranks.

Stored rather than a view: the bootstrap needs random resamples, which SQL cannot draw reproducibly. For a
group of n image scores, ``BOOTSTRAP_RESAMPLES`` resamples of n images with replacement are drawn by
``numpy.random.default_rng((BOOTSTRAP_SEED, n))`` (so every group of the same n images uses the same
resamples, and a rerun gives the same interval); the CI is the 2.5th and 97.5th percentile of the resampled
means. ``rank`` orders every entry of (layer, metric, feature) by its mean, best first (highest, except for
``kl`` and ``mse``), means equal to 12 decimals sharing the lower rank; ``head_rank`` is the same among the heads only.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ssl_attention.alignment.metrics import METRIC_COLUMNS
from ssl_attention.warehouse import schema
from ssl_attention.warehouse.atomic import WriteStats, write_table_atomic

BOOTSTRAP_SEED = 20240610
BOOTSTRAP_RESAMPLES = 1000
CI_LEVEL = 0.95
LOWER_IS_BETTER = frozenset({"kl", "mse"})
RANK_DECIMALS = 12  # means equal to 12 decimals tie (float noise must not order equal scores)


def entry_label(map_kind: str, head: int | None) -> str:
    if map_kind != "map":
        return map_kind
    return "fused" if head is None else f"head {head}"


def bootstrap_means(values: np.ndarray) -> np.ndarray:
    """(B, G) means of ``BOOTSTRAP_RESAMPLES`` seeded resamples of the n rows of ``values`` (n, G); NaN
    entries are left out of each resampled mean (a resample with none of a column's values gives NaN)."""
    n = values.shape[0]
    rng = np.random.default_rng((BOOTSTRAP_SEED, n))
    counts = rng.multinomial(n, np.full(n, 1.0 / n), size=BOOTSTRAP_RESAMPLES).astype(np.float64)  # (B, n)
    present = np.isfinite(values)
    sums = counts @ np.where(present, values, 0.0)
    weights = counts @ present.astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return sums / weights


def nan_percentiles(values: np.ndarray, percentiles: tuple[float, ...]) -> np.ndarray:
    """(len(percentiles), G) percentiles of each column of (n, G) ``values`` over its finite entries, by linear
    interpolation (numpy's default method), NaN for a column without any; vectorised over the columns."""
    ordered = np.sort(np.where(np.isfinite(values), values, np.inf), axis=0)  # non-finite last
    count = np.isfinite(values).sum(axis=0)
    out = np.full((len(percentiles), values.shape[1]), np.nan)
    has = count > 0
    for i, q in enumerate(percentiles):
        position = (count - 1).clip(min=0) * q / 100.0
        low = np.floor(position).astype(np.int64)
        high = np.minimum(low + 1, (count - 1).clip(min=0))
        a = np.take_along_axis(ordered, low[None, :], axis=0)[0]
        b = np.take_along_axis(ordered, high[None, :], axis=0)[0]
        with np.errstate(invalid="ignore"):
            out[i] = np.where(has, a + (b - a) * (position - low), np.nan)
    return out


def _ranks(means: np.ndarray, higher_is_better: bool) -> np.ndarray:
    """1-based competition ranks (ties share the lower rank) of ``means``; NaN ranks last (as NULL: 0)."""
    key = np.round(-means if higher_is_better else means, RANK_DECIMALS)
    valid = np.isfinite(key)
    ranks = np.zeros(len(key), dtype=np.int64)
    order = np.sort(key[valid])
    ranks[valid] = np.searchsorted(order, key[valid], side="left") + 1
    return ranks


def head_ranking_table(alignment: pa.Table, computed_at: dt.datetime | None = None) -> pa.Table:
    """The ``head_ranking`` rows of one (model, method) ``alignment`` partition."""
    computed_at = computed_at or dt.datetime.now(dt.UTC)
    out: dict[str, list] = {name: [] for name in schema.HEAD_RANKING.names}
    if alignment.num_rows == 0:
        return schema.HEAD_RANKING.empty_table()
    for feature in sorted(pc.unique(alignment["feature"]).to_pylist()):
        rows = alignment.filter(pc.equal(alignment["feature"], feature))
        images = pc.unique(rows["image_id"]).to_pylist()
        image_index = {image: i for i, image in enumerate(images)}
        heads = rows["head"].to_pylist()
        kinds = rows["map_kind"].to_pylist()
        layers = rows["layer"].to_pylist()
        entries = sorted(
            {(layer, kind, head) for layer, kind, head in zip(layers, kinds, heads, strict=True)},
            key=lambda e: (e[0], e[1] != "map", e[1], -1 if e[2] is None else e[2]),
        )
        entry_index = {e: j for j, e in enumerate(entries)}
        row_image = np.array([image_index[i] for i in rows["image_id"].to_pylist()])
        row_entry = np.array([entry_index[e] for e in zip(layers, kinds, heads, strict=True)])
        for metric in METRIC_COLUMNS:
            column = rows[metric].cast(pa.float64()).to_numpy(zero_copy_only=False)
            values = np.full((len(images), len(entries)), np.nan)
            values[row_image, row_entry] = column  # one row per (image, entry)
            scored = np.isfinite(values)
            n_images = scored.sum(axis=0)
            with np.errstate(invalid="ignore"):
                means = np.where(n_images > 0, np.nansum(values, axis=0) / np.maximum(n_images, 1), np.nan)
            (medians,) = nan_percentiles(values, (50.0,))
            keep = scored.any(axis=1)  # resample the images with a score
            resampled = bootstrap_means(values[keep]) if keep.any() else np.full((1, len(entries)), np.nan)
            tail = (1 - CI_LEVEL) / 2 * 100
            low, high = nan_percentiles(resampled, (tail, 100 - tail))
            better = metric not in LOWER_IS_BETTER
            ranks = np.zeros(len(entries), dtype=np.int64)
            head_ranks = np.zeros(len(entries), dtype=np.int64)
            for layer in sorted({e[0] for e in entries}):
                in_layer = np.array([e[0] == layer for e in entries])
                ranks[in_layer] = _ranks(means[in_layer], better)
                is_head = in_layer & np.array([e[1] == "map" and e[2] is not None for e in entries])
                head_ranks[is_head] = _ranks(means[is_head], better)
            for j, (layer, kind, head) in enumerate(entries):
                out["layer"].append(layer)
                out["metric"].append(metric)
                out["feature"].append(feature)
                out["map_kind"].append(kind)
                out["head"].append(head)
                out["entry"].append(entry_label(kind, head))
                out["n_images"].append(int(n_images[j]))
                finite = n_images[j] > 0
                out["mean"].append(float(means[j]) if finite else None)
                out["median"].append(float(medians[j]) if finite else None)
                out["ci_low"].append(float(low[j]) if finite and np.isfinite(low[j]) else None)
                out["ci_high"].append(float(high[j]) if finite and np.isfinite(high[j]) else None)
                out["higher_is_better"].append(better)
                out["rank"].append(int(ranks[j]) or None)
                out["head_rank"].append(int(head_ranks[j]) or None)
                out["computed_at"].append(computed_at)
    return pa.table(out, schema=schema.HEAD_RANKING)


def write_head_ranking(alignment_files: Path | Sequence[Path], target_dir: Path) -> WriteStats:
    """Rebuild one ``head_ranking`` partition from its ``alignment`` files: one file, or the files of every image
    shard of the (model, method) (an image's rows are all in one shard)."""
    columns = ["image_id", "layer", "head", "map_kind", "feature", *METRIC_COLUMNS]
    paths = [alignment_files] if isinstance(alignment_files, str | Path) else list(alignment_files)
    tables = [pq.read_table(path, columns=columns) for path in paths if Path(path).is_file()]
    table = pa.concat_tables(tables) if tables else schema.ALIGNMENT.empty_table().select(columns)
    return write_table_atomic(Path(target_dir), head_ranking_table(table), schema.HEAD_RANKING)
