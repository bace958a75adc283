"""The ``head_ranking`` table: per (layer, metric, feature) of one (model, method), every head, the fused map
and the two baselines side by side, with mean, median, a seeded bootstrap CI of the mean, and ranks.

Stored rather than a view: the bootstrap needs random resamples, which SQL cannot draw reproducibly.

A *group* is one (layer, map_kind, head, feature) and one metric; its scores are the finite values of that
metric over the images with a row for it (NULL and NaN are left out; ``n_images`` counts the rest).

- ``mean`` and ``median`` (the mean of the two middle values for an even count) are exact.
- CI: the Poisson bootstrap (Hanley & MacGibbon 2006, "Creating non-parametric bootstrap samples using
  Poisson frequencies", Comput. Methods Programs Biomed. 83:57-62; Chamandy et al. 2012, "Estimating
  uncertainty for massive data streams", Google): resample b = 1..B (B = ``BOOTSTRAP_RESAMPLES``) gives
  image i the weight w_bi ~ Poisson(1), independently over images and resamples (the large-n limit of the
  multinomial counts of n draws with replacement). For a group with scores x_i over its images I,
  mean_b = sum_{i in I} w_bi x_i / sum_{i in I} w_bi (a resample whose weights over I are all 0 is left
  out), and the CI is the 2.5th and 97.5th percentile of mean_b over the resamples (the percentile interval,
  Efron & Tibshirani 1993, "An Introduction to the Bootstrap", ch. 13), linear interpolation. w_bi is a
  pure function of (``BOOTSTRAP_SEED``, b, the image id): a counter-based hash (SplitMix64's finaliser over
  the id's BLAKE2b digest and the resample's stream) turned into a uniform u in [0, 1) with 53 bits, then
  Poisson(1) by its inverse CDF (``poisson_weights``). So an image weighs the same in every group, layer,
  method, file and shard, and a rerun, another row order or another split into files gives the same interval.
- ``rank`` orders every entry of (layer, metric, feature) by its mean, best first (highest, except for ``kl``
  and ``mse``), means equal to 12 decimals sharing the lower rank (competition ranking); ``head_rank`` is the
  same among the heads only; NULL where there is no score.

Streaming: the alignment rows are read batch by batch (Parquet row groups, over any number of files: a
partition's image shards), never whole, with numpy codes for the group columns instead of Python objects.
A first pass reads only the group columns (layer, head, map_kind, feature) to list the groups and count their
rows; the groups, in sorted order, are then cut into slices whose rows and bootstrap sums both fit a memory
budget (``MEMORY_BUDGET_BYTES``); a second pass routes each row (its group, a 64-bit image key and the metric
values) to its slice, kept in memory when there is one slice and otherwise spilled to a temporary file per
slice (``spill_dir``, else the system's temporary folder, ``TMPDIR``); each slice is then finished alone. The
bootstrap walks a slice's images in chunks and accumulates the (B, groups) weighted sums and weight totals
chunk by chunk, so no (B, n) array exists. The ranking's own arrays stay within about the budget (plus one
batch being read; the libraries' fixed buffers come on top), whatever the number of images n, except: the
exact median needs a group's values, so a single group with more rows than the budget allows forms a slice of
its own (76 bytes a row, about 3x that while it is sorted: with n images that slice holds at most n rows);
past 512 slices (a partition with very many groups) the slices widen beyond the budget rather than open more
files; and the temporary files hold every score once, on disk. Results do
not depend on the budget or the batching, except the CI to float rounding (~1e-14: the weighted sums are
added in another order).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import math
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

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
MEMORY_BUDGET_BYTES = 32 * 2**20  # one slice's rows plus its bootstrap sums (about; plus one batch being read)
GROUP_COLUMNS = ("layer", "head", "map_kind", "feature")
_ROW_BYTES = 4 + 8 + 8 * len(METRIC_COLUMNS)  # one spilled row: group code, image key, the metric values
_BATCH_ROWS = 65_536  # batches of an in-memory table
_MAX_SLICES = 512  # spill files open at once (beyond: slices of more groups than the budget's)

# A source of alignment rows: one Parquet file, several (a partition's shards), an Arrow table or a list of
# tables / record batches, or a function returning a fresh iterable of them on each call (the rows are read
# twice, so a one-shot iterator is refused).
AlignmentSource = (
    str
    | Path
    | pa.Table
    | Sequence[str | Path | pa.Table | pa.RecordBatch]
    | Callable[[], Iterable[pa.Table | pa.RecordBatch]]
)


def entry_label(map_kind: str, head: int | None) -> str:
    if map_kind != "map":
        return map_kind
    return "fused" if head is None else f"head {head}"


# --- the Poisson weights -------------------------------------------------------------------------------------

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _mix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser on uint64 arrays (wrapping arithmetic)."""
    z = x + _GOLDEN
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def _poisson_cdf() -> np.ndarray:
    """P(X <= k) for X ~ Poisson(1), k = 0, 1, ...; the last entry is 1.0 (the tail beyond is < 2^-53)."""
    terms, k = [math.exp(-1.0)], 0
    while math.fsum(terms) < 1.0:
        k += 1
        terms.append(terms[-1] / k)
    cdf = np.array([math.fsum(terms[: j + 1]) for j in range(len(terms))])
    cdf[-1] = 1.0
    return cdf


_POISSON_CDF = _poisson_cdf()
_STREAMS = _mix64(
    _mix64(np.full(BOOTSTRAP_RESAMPLES, BOOTSTRAP_SEED, np.uint64)) + np.arange(BOOTSTRAP_RESAMPLES, dtype=np.uint64)
)


def image_keys(image_ids: Iterable[str]) -> np.ndarray:
    """(k,) uint64: the first 8 bytes of each image id's BLAKE2b digest (the image's identity in the bootstrap)."""
    digests = b"".join(hashlib.blake2b(str(i).encode(), digest_size=8).digest() for i in image_ids)
    return np.frombuffer(digests, dtype="<u8").astype(np.uint64)


def _weights_of_keys(keys: np.ndarray) -> np.ndarray:
    bits = _mix64(_STREAMS[:, None] ^ keys[None, :])  # (B, k)
    uniform = (bits >> np.uint64(11)).astype(np.float64) * 2.0**-53
    return np.searchsorted(_POISSON_CDF, uniform, side="right").astype(np.float64)


def poisson_weights(image_ids: Sequence[str]) -> np.ndarray:
    """(B, k) the Poisson(1) bootstrap weights of ``image_ids`` in each of the B resamples (float64 counts)."""
    return _weights_of_keys(image_keys(image_ids))


# --- percentiles and ranks -----------------------------------------------------------------------------------


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


def group_ranks(groups: np.ndarray, means: np.ndarray, higher_is_better: bool) -> np.ndarray:
    """1-based competition ranks of ``means`` within each value of ``groups`` (ties to ``RANK_DECIMALS``
    share the lower rank); 0 (stored as NULL) where the mean is not finite."""
    key = np.round(-means if higher_is_better else means, RANK_DECIMALS)
    valid = np.flatnonzero(np.isfinite(key))
    ranks = np.zeros(len(key), dtype=np.int64)
    if len(valid) == 0:
        return ranks
    order = np.lexsort((key[valid], groups[valid]))
    g, k = groups[valid][order], key[valid][order]
    position = np.arange(len(order))
    new_group = np.r_[True, g[1:] != g[:-1]]
    new_value = new_group | np.r_[True, k[1:] != k[:-1]]
    group_start = np.maximum.accumulate(np.where(new_group, position, 0))
    value_start = np.maximum.accumulate(np.where(new_value, position, 0))
    ranks[valid[order]] = value_start - group_start + 1
    return ranks


# --- reading -------------------------------------------------------------------------------------------------


def _batches(source: AlignmentSource, columns: Sequence[str]) -> Iterator[pa.Table | pa.RecordBatch]:
    """``columns`` of the source's rows, one Parquet row group (or batch) at a time; missing files are empty."""
    if isinstance(source, pa.Table | pa.RecordBatch):
        source = [source]
    if callable(source):
        items: Iterable = source()
    elif isinstance(source, str | Path):
        items = [source]
    elif isinstance(source, Sequence):
        items = source
    else:
        raise TypeError(
            f"alignment rows must be a Parquet path, a list of paths, a table, a list of tables or a function "
            f"returning batches (they are read twice), got {type(source).__name__}"
        )
    for item in items:
        if isinstance(item, pa.Table):
            yield from item.select(list(columns)).to_batches(max_chunksize=_BATCH_ROWS)
        elif isinstance(item, pa.RecordBatch):
            yield item.select(list(columns))
        elif isinstance(item, str | Path):
            if not Path(item).is_file():
                continue
            parquet = pq.ParquetFile(item, read_dictionary=["image_id", "map_kind", "feature"])
            for index in range(parquet.num_row_groups):
                yield parquet.read_row_group(index, columns=list(columns))
        else:
            raise TypeError(f"alignment rows: expected a path, a table or a record batch, got {type(item).__name__}")


def _chunks(column: pa.Array | pa.ChunkedArray) -> list[pa.Array]:
    return list(column.chunks) if isinstance(column, pa.ChunkedArray) else [column]


def _string_codes(column: pa.Array | pa.ChunkedArray, lookup: dict[str, int]) -> np.ndarray:
    """Codes of a string (or dictionary) column in ``lookup``, which gains the strings it did not hold."""
    parts = []
    for chunk in _chunks(column):
        encoded = chunk if pa.types.is_dictionary(chunk.type) else pc.dictionary_encode(chunk)
        local = np.array([lookup.setdefault(v, len(lookup)) for v in encoded.dictionary.to_pylist()], np.int64)
        parts.append(local[encoded.indices.to_numpy(zero_copy_only=False)] if len(local) else np.zeros(0, np.int64))
    return np.concatenate(parts) if parts else np.zeros(0, np.int64)


def _image_column_keys(column: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """(rows,) uint64 ``image_keys`` of an image id column, hashing each distinct id of a batch once."""
    parts = []
    for chunk in _chunks(column):
        encoded = chunk if pa.types.is_dictionary(chunk.type) else pc.dictionary_encode(chunk)
        keys = image_keys(encoded.dictionary.to_pylist())
        parts.append(keys[encoded.indices.to_numpy(zero_copy_only=False)])
    return np.concatenate(parts) if parts else np.zeros(0, np.uint64)


@dataclass
class _Groups:
    """The groups seen in a source: codes for the strings, one packed int64 per (layer, head, kind, feature)."""

    kinds: dict[str, int]
    features: dict[str, int]
    packed: np.ndarray | None = None  # sorted packed keys of every group
    index: np.ndarray | None = None  # packed[j] is group index[j] (groups numbered in sorted order)

    def pack(self, batch: pa.Table | pa.RecordBatch) -> np.ndarray:
        layer = batch.column("layer").to_numpy(zero_copy_only=False).astype(np.int64)
        head = pc.fill_null(batch.column("head"), -1).to_numpy(zero_copy_only=False).astype(np.int64)
        kind = _string_codes(batch.column("map_kind"), self.kinds)
        feature = _string_codes(batch.column("feature"), self.features)
        if len(self.features) >= 1 << 16 or len(self.kinds) >= 1 << 8:
            raise ValueError(f"too many features ({len(self.features)}) or map kinds ({len(self.kinds)}) to rank")
        if len(layer) and (layer.min() < 0 or head.min() < -1 or head.max() >= (1 << 16) - 1):
            raise ValueError("alignment rows need layers >= 0 and heads >= 0 (or NULL for the fused map)")
        return ((layer + 1) << 40) | ((head + 1) << 24) | (kind << 16) | feature

    def of(self, packed: np.ndarray) -> np.ndarray:
        assert self.packed is not None and self.index is not None
        position = np.searchsorted(self.packed, packed)
        if (position >= len(self.packed)).any() or (
            self.packed[position.clip(max=len(self.packed) - 1)] != packed
        ).any():
            raise ValueError("the alignment rows changed while they were ranked (a group was not seen before)")
        return self.index[position]


def _discover(source: AlignmentSource) -> tuple[_Groups, list[tuple[int, str, int | None, str]], np.ndarray]:
    """The source's groups (layer, kind, head, feature) in sorted order and their row counts."""
    groups = _Groups({}, {})
    counts: dict[int, int] = {}
    for batch in _batches(source, GROUP_COLUMNS):
        values, tally = np.unique(groups.pack(batch), return_counts=True)
        for value, count in zip(values.tolist(), tally.tolist(), strict=True):
            counts[value] = counts.get(value, 0) + count
    kind_names = {code: name for name, code in groups.kinds.items()}
    feature_names = {code: name for name, code in groups.features.items()}
    keys = []
    for value in counts:
        head = ((value >> 24) & 0xFFFF) - 1
        keys.append(
            (
                (value >> 40) - 1,
                kind_names[(value >> 16) & 0xFF],
                None if head < 0 else head,
                feature_names[value & 0xFFFF],
            )
        )
    order = sorted(range(len(keys)), key=lambda j: _sort_key(keys[j]))
    packed = np.array(list(counts), dtype=np.int64)
    groups.packed = np.sort(packed)
    rank_of = np.empty(len(keys), dtype=np.int64)
    rank_of[order] = np.arange(len(keys))
    groups.index = rank_of[np.argsort(packed)]
    rows = np.array([counts[int(packed[j])] for j in order], dtype=np.int64)
    return groups, [keys[j] for j in order], rows


def _sort_key(key: tuple[int, str, int | None, str]) -> tuple:
    layer, kind, head, feature = key
    return (layer, feature, kind != "map", kind, -1 if head is None else head)


def _slices(rows: np.ndarray, budget: int) -> list[tuple[int, int]]:
    """[start, stop) runs of consecutive groups whose rows and bootstrap sums fit half the budget each; at
    most ``_MAX_SLICES`` of them (beyond that, larger slices: memory then grows past the budget)."""
    max_rows = max(1, budget // 2 // (3 * _ROW_BYTES))  # the rows, their sort and the dense chunk
    max_groups = max(1, budget // 2 // (4 * 8 * BOOTSTRAP_RESAMPLES * len(METRIC_COLUMNS)))  # sums, totals, means
    while True:
        slices, start, held = [], 0, 0
        for j, count in enumerate(rows.tolist()):
            if j > start and (held + count > max_rows or j - start >= max_groups):
                slices.append((start, j))
                start, held = j, 0
            held += count
        if len(rows):
            slices.append((start, len(rows)))
        if len(slices) <= _MAX_SLICES:
            return slices
        factor = -(-len(slices) // _MAX_SLICES)
        max_rows, max_groups = max_rows * factor, max_groups * factor


# --- one slice's rows -------------------------------------------------------------------------------------


@dataclass
class _Rows:
    groups: np.ndarray  # (r,) int64 group index within the slice
    images: np.ndarray  # (r,) uint64 image keys
    values: np.ndarray  # (r, M) float64, NaN where missing

    @classmethod
    def empty(cls, count: int) -> _Rows:
        return cls(np.empty(count, np.int64), np.empty(count, np.uint64), np.empty((count, len(METRIC_COLUMNS))))


class _Slices:
    """Routes rows to their slice: in memory for a single slice, else appended to one temporary file each."""

    def __init__(self, slices: list[tuple[int, int]], rows: np.ndarray, spill: Path | None) -> None:
        self.slices = slices
        self.rows = rows
        self.starts = np.array([s for s, _ in slices], dtype=np.int64)
        self.filled = np.zeros(len(slices), dtype=np.int64)
        self.memory = _Rows.empty(int(rows.sum())) if spill is None else None
        self.paths = [spill / f"slice-{i}.bin" for i in range(len(slices))] if spill is not None else []
        self.files: list[BinaryIO] = [path.open("wb") for path in self.paths]

    def add(self, groups: np.ndarray, images: np.ndarray, values: np.ndarray) -> None:
        which = np.searchsorted(self.starts, groups, side="right") - 1
        order = np.argsort(which, kind="stable")
        bounds = np.searchsorted(which[order], np.arange(len(self.slices) + 1))
        for s in np.flatnonzero(np.diff(bounds)).tolist():
            take = order[bounds[s] : bounds[s + 1]]
            local = groups[take] - self.starts[s]
            if self.memory is not None:
                at = slice(int(self.filled[s]), int(self.filled[s]) + len(take))
                if at.stop > len(self.memory.groups):
                    raise ValueError("the alignment rows changed while they were ranked (more rows than counted)")
                self.memory.groups[at], self.memory.images[at], self.memory.values[at] = (
                    local,
                    images[take],
                    values[take],
                )
            else:
                out = self.files[s]
                np.array([len(take)], dtype=np.int64).tofile(out)
                local.astype(np.int32).tofile(out)
                images[take].tofile(out)
                np.ascontiguousarray(values[take]).tofile(out)
            self.filled[s] += len(take)

    def close(self) -> None:
        for f in self.files:
            f.close()

    def load(self, s: int) -> _Rows:
        start, stop = self.slices[s]
        expected = int(self.rows[start:stop].sum())
        if self.filled[s] != expected:
            raise ValueError("the alignment rows changed while they were ranked (row counts differ between reads)")
        if self.memory is not None:
            return self.memory
        rows = _Rows.empty(expected)
        at = 0
        with self.paths[s].open("rb") as f:
            while (header := np.fromfile(f, dtype=np.int64, count=1)).size:
                count = int(header[0])
                rows.groups[at : at + count] = np.fromfile(f, dtype=np.int32, count=count)
                rows.images[at : at + count] = np.fromfile(f, dtype=np.uint64, count=count)
                rows.values[at : at + count] = np.fromfile(
                    f, dtype=np.float64, count=count * len(METRIC_COLUMNS)
                ).reshape(count, -1)
                at += count
        self.paths[s].unlink()
        return rows


# --- the statistics of one slice ---------------------------------------------------------------------------


@dataclass
class _Stats:
    """(G, M) per group and metric."""

    n: np.ndarray
    mean: np.ndarray
    median: np.ndarray
    low: np.ndarray
    high: np.ndarray

    @classmethod
    def empty(cls, groups: int) -> _Stats:
        shape = (groups, len(METRIC_COLUMNS))
        return cls(np.zeros(shape, np.int64), *(np.full(shape, np.nan) for _ in range(4)))


def _medians(groups: np.ndarray, values: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Exact median of each group's finite ``values`` (NaN for a group without any)."""
    by_value = np.argsort(values)  # equal values are interchangeable: no need for a stable sort here
    members = groups[by_value]
    if len(members) and members.max() < 1 << 16:
        members = members.astype(np.uint16)  # a stable sort of 16-bit keys is a radix sort
    order = by_value[np.argsort(members, kind="stable")]  # by group, values ascending within each
    ordered = values[order]
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    has = counts > 0
    low = starts + np.maximum(counts - 1, 0) // 2
    high = starts + counts // 2
    out = np.full(len(counts), np.nan)
    out[has] = (ordered[low[has]] + ordered[np.minimum(high, len(ordered) - 1)[has]]) / 2
    return out


def _bootstrap(rows: _Rows, groups: int, chunk_bytes: int) -> tuple[np.ndarray, np.ndarray]:
    """(B, M * G) Poisson-weighted sums and weight totals of a slice (column m * G + g: metric m, group g),
    over its images in chunks: two matrix products a chunk (OpenBLAS stalls on many small ones on a busy
    machine), one when every metric is present on the same rows."""
    metrics = len(METRIC_COLUMNS)
    sums = np.zeros((BOOTSTRAP_RESAMPLES, metrics * groups))
    totals = np.zeros((BOOTSTRAP_RESAMPLES, metrics * groups))
    order = np.lexsort((rows.groups, rows.images))
    images, member = rows.images[order], rows.groups[order]
    new_image = np.r_[True, images[1:] != images[:-1]]
    if ((~new_image) & np.r_[False, member[1:] == member[:-1]]).any():
        raise ValueError("the alignment rows hold an image twice for one (layer, map_kind, head, feature)")
    image_starts = np.r_[np.flatnonzero(new_image), len(images)]
    # a chunk's dense (images, metrics, groups) values and its (B, images) weights each fit chunk_bytes
    per_chunk = max(1, chunk_bytes // (8 * max(metrics * groups, BOOTSTRAP_RESAMPLES)))
    for first in range(0, len(image_starts) - 1, per_chunk):
        last = min(first + per_chunk, len(image_starts) - 1)
        span = slice(int(image_starts[first]), int(image_starts[last]))
        local = np.cumsum(new_image[span]) - 1
        dense = np.full((last - first, metrics, groups), np.nan)
        dense[local, :, member[span]] = rows.values[order[span]]
        weights = _weights_of_keys(images[image_starts[first:last]])  # (B, images)
        present = np.isfinite(dense)
        sums += weights @ np.where(present, dense, 0.0).reshape(last - first, -1)
        if (present == present[:, :1, :]).all():  # the same rows for every metric: one (B, G) product
            totals += np.tile(weights @ present[:, 0, :].astype(np.float64), metrics)
        else:
            totals += weights @ present.reshape(last - first, -1).astype(np.float64)
    return sums, totals


def _slice_stats(rows: _Rows, groups: int, chunk_bytes: int) -> _Stats:
    stats = _Stats.empty(groups)
    sums, totals = _bootstrap(rows, groups, chunk_bytes)
    tail = (1 - CI_LEVEL) / 2 * 100
    for m in range(len(METRIC_COLUMNS)):
        column = rows.values[:, m]
        finite = np.isfinite(column)
        members, scores = rows.groups[finite], column[finite]
        counts = np.bincount(members, minlength=groups)
        block = slice(m * groups, (m + 1) * groups)
        with np.errstate(invalid="ignore", divide="ignore"):
            stats.mean[:, m] = np.bincount(members, weights=scores, minlength=groups) / counts
            resampled = sums[:, block] / totals[:, block]  # (B, G); NaN where a resample's weights are all 0
        stats.n[:, m] = counts
        stats.median[:, m] = _medians(members, scores, counts)
        stats.low[:, m], stats.high[:, m] = nan_percentiles(resampled, (tail, 100 - tail))
    return stats


def _stats(source: AlignmentSource, budget: int, spill_dir: Path | None) -> tuple[list, _Stats]:
    groups, keys, rows = _discover(source)
    stats = _Stats.empty(len(keys))
    if not keys:
        return keys, stats
    slices = _slices(rows, budget)
    columns = ["image_id", *GROUP_COLUMNS, *METRIC_COLUMNS]
    with tempfile.TemporaryDirectory(prefix="ssl_attention_ranking_", dir=spill_dir) as spill:
        router = _Slices(slices, rows, Path(spill) if len(slices) > 1 else None)
        try:
            for batch in _batches(source, columns):
                values = np.column_stack(
                    [batch.column(m).cast(pa.float64()).to_numpy(zero_copy_only=False) for m in METRIC_COLUMNS]
                )
                router.add(groups.of(groups.pack(batch)), _image_column_keys(batch.column("image_id")), values)
        finally:
            router.close()
        for s, (start, stop) in enumerate(slices):
            part = _slice_stats(router.load(s), stop - start, budget // 8)
            for name in ("n", "mean", "median", "low", "high"):
                getattr(stats, name)[start:stop] = getattr(part, name)
    return keys, stats


# --- the table -----------------------------------------------------------------------------------------------


def head_ranking_table(
    alignment: AlignmentSource,
    computed_at: dt.datetime | None = None,
    memory_budget: int = MEMORY_BUDGET_BYTES,
    spill_dir: Path | None = None,
) -> pa.Table:
    """The ``head_ranking`` rows of one (model, method)'s ``alignment`` rows (see the module docstring),
    ordered by feature, metric, layer and entry."""
    computed_at = computed_at or dt.datetime.now(dt.UTC)
    keys, stats = _stats(alignment, memory_budget, spill_dir)
    if not keys:
        return schema.HEAD_RANKING.empty_table()
    layers = np.array([k[0] for k in keys], dtype=np.int64)
    kinds = np.array([k[1] for k in keys], dtype=object)
    heads = np.array([-1 if k[2] is None else k[2] for k in keys], dtype=np.int64)
    features = np.array([k[3] for k in keys], dtype=object)
    entries = np.array([entry_label(k[1], k[2]) for k in keys], dtype=object)
    feature_names = sorted(set(features.tolist()))
    feature_code = np.array([feature_names.index(f) for f in features.tolist()], dtype=np.int64)
    place = feature_code * (layers.max() + 2) + layers  # one value per (layer, feature): the ranking's groups
    is_head = (kinds == "map") & (heads >= 0)
    ranks = np.zeros(stats.n.shape, dtype=np.int64)
    head_ranks = np.zeros(stats.n.shape, dtype=np.int64)
    better = np.array([m not in LOWER_IS_BETTER for m in METRIC_COLUMNS])
    for m in range(len(METRIC_COLUMNS)):
        ranks[:, m] = group_ranks(place, stats.mean[:, m], bool(better[m]))
        head_ranks[is_head, m] = group_ranks(place[is_head], stats.mean[is_head, m], bool(better[m]))
    # rows: per feature, per metric, the groups in (layer, entry) order (keys are sorted by layer, feature, entry)
    g, m = np.meshgrid(np.arange(len(keys)), np.arange(len(METRIC_COLUMNS)), indexing="ij")
    g, m = g.ravel(), m.ravel()
    order = np.lexsort((g, m, feature_code[g]))
    g, m = g[order], m[order]
    scored = stats.n[g, m] > 0

    def nullable(values: np.ndarray) -> pa.Array:
        return pa.array(values, pa.float64(), mask=~(scored & np.isfinite(values)))

    columns = {
        "layer": pa.array(layers[g].astype(np.int16)),
        "metric": pa.array(np.array(METRIC_COLUMNS, dtype=object)[m], pa.string()),
        "feature": pa.array(features[g], pa.string()),
        "map_kind": pa.array(kinds[g], pa.string()),
        "head": pa.array(heads[g].astype(np.int16), mask=heads[g] < 0),
        "entry": pa.array(entries[g], pa.string()),
        "n_images": pa.array(stats.n[g, m].astype(np.int32)),
        "mean": nullable(stats.mean[g, m]),
        "median": nullable(stats.median[g, m]),
        "ci_low": nullable(stats.low[g, m]),
        "ci_high": nullable(stats.high[g, m]),
        "higher_is_better": pa.array(better[m]),
        "rank": pa.array(ranks[g, m].astype(np.int32), mask=ranks[g, m] == 0),
        "head_rank": pa.array(head_ranks[g, m].astype(np.int32), mask=head_ranks[g, m] == 0),
        "computed_at": pa.repeat(pa.scalar(computed_at, schema.TIMESTAMP), len(g)),
    }
    return pa.table(columns).cast(schema.HEAD_RANKING)


def write_head_ranking(alignment: AlignmentSource, target_dir: Path, spill_dir: Path | None = None) -> WriteStats:
    """Rebuild one ``head_ranking`` partition from its ``alignment`` rows: one partition file, a list of
    files (its image shards; missing files count as empty), a table, or a function yielding batches."""
    return write_table_atomic(Path(target_dir), head_ranking_table(alignment, spill_dir=spill_dir), schema.HEAD_RANKING)
