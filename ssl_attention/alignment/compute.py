"""The ``alignment`` table: every stored map of one model scored against every feature of its image.

Per (model, method) partition of ``attention_maps`` and per image with regions in ``annotations``:

- features: ``all`` (the union of every region of the image) and each feature present;
- targets: the regions carried through the image's stored ``InputTransform`` (``inputs`` table) onto each
  map's grid (``geometry.feature_targets_grids``: Grad-CAM stages on their own grids, each image's regions
  measured and rastered once for all of them);
- rows: one per map x feature (``map_kind`` = ``map``; ``head`` NULL = the fused map) with the metrics of
  ``metrics.alignment_metrics``, plus per (layer, feature) one row for each baseline (``uniform``,
  ``centre_gaussian``) on that layer's grid. A feature whose regions all lie outside the view gets its rows
  with NULL metrics (recorded, not scored).

Incremental: each row carries the maps' ``weights_id`` and ``extracted_at`` and a hash of the image's regions
and transform (``targets_hash``); an image whose three values are unchanged is carried over, the others are
scored again, images no longer annotated or extracted are dropped. Nothing changed -> the partition is not
rewritten. Partitions are replaced atomically like the maps (``PartitionWriter``), streamed row group
by row group, so memory does not grow with the number of images.
"""

from __future__ import annotations

import bisect
import datetime as dt
import functools
import hashlib
import json
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ssl_attention.alignment.annotations import Region
from ssl_attention.alignment.geometry import (
    FeatureTargets,
    InputTransform,
    centre_gaussian_baseline,
    feature_targets_grids,
)
from ssl_attention.alignment.metrics import METRIC_COLUMNS, alignment_metric_array
from ssl_attention.alignment.ranking import write_head_ranking
from ssl_attention.alignment.store import read_regions
from ssl_attention.warehouse import schema
from ssl_attention.warehouse.atomic import PartitionWriter, WriteStats
from ssl_attention.warehouse.paths import DATA_FILE, iter_partitions, partition_dir, partition_file
from ssl_attention.warehouse.tables import copy_rows_except, flat_map_values

FEATURE_ALL = "all"
MAP_KINDS = ("map", "uniform", "centre_gaussian")
BASELINES = MAP_KINDS[1:]
TRANSFORM_COLUMNS = ("scale_x", "scale_y", "crop_left", "crop_top", "input_w", "input_h")
CHUNK_IMAGES = 32  # images scored together across the methods (their targets computed once)
_MAP_COLUMNS = ["image_id", "layer", "head", "grid_h", "grid_w", "map_values", "weights_id", "extracted_at"]


@dataclass
class MethodAlignment:
    method: str
    images_scored: int = 0  # images computed in this run
    images_up_to_date: int = 0
    maps_scored: int = 0  # map rows scored in this run (each against every feature of its image)
    rows_written: int = 0  # rows in the partition after the run
    rewritten: bool = False
    write: WriteStats | None = None


@dataclass
class AlignmentReport:
    model: str
    methods: dict[str, MethodAlignment] = field(default_factory=dict)
    images_without_transform: list[str] = field(default_factory=list)  # extracted before transforms were stored
    seconds: float = 0.0

    @property
    def maps_scored(self) -> int:
        return sum(m.maps_scored for m in self.methods.values())

    @property
    def rows_written(self) -> int:
        return sum(m.rows_written for m in self.methods.values())

    @property
    def maps_per_second(self) -> float:
        return self.maps_scored / self.seconds if self.seconds > 0 else 0.0


# --- inputs ------------------------------------------------------------------------------------------------


def read_transforms(warehouse: Path, model: str, shard: str | None = None) -> dict[str, InputTransform | None]:
    """image id -> the stored ``InputTransform`` of ``model`` (None for rows written before it was stored), of
    one image shard or (None) of every shard."""
    result: dict[str, InputTransform | None] = {}
    for partition in iter_partitions(warehouse, "inputs", model=model):
        if shard not in (None, partition.keys["shard"]):
            continue
        path = partition.path
        names = pq.ParquetFile(path).schema_arrow.names
        if not set(TRANSFORM_COLUMNS) <= set(names):
            result.update(dict.fromkeys(pq.read_table(path, columns=["image_id"])["image_id"].to_pylist()))
            continue
        for row in pq.read_table(path, columns=["image_id", *TRANSFORM_COLUMNS]).to_pylist():
            values = [row[c] for c in TRANSFORM_COLUMNS]
            result[row["image_id"]] = None if any(v is None for v in values) else InputTransform(*values)
    return result


def targets_hash(regions: Sequence[Region], transform: InputTransform) -> str:
    """Identity of what an image's targets are made of: its regions' features and boxes, and the transform."""
    payload = {
        "transform": [getattr(transform, c) for c in TRANSFORM_COLUMNS],
        "regions": sorted([r.feature, r.x0, r.y0, r.x1, r.y1] for r in regions),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:32]


def features_of(regions: Sequence[Region]) -> dict[str, list[Region]]:
    """``all`` (every region) first, then each feature present, in sorted order."""
    features: dict[str, list[Region]] = {FEATURE_ALL: list(regions)}
    for name in sorted({r.feature for r in regions}):
        features[name] = [r for r in regions if r.feature == name]
    return features


@functools.lru_cache(maxsize=64)
def _centre_baseline(input_h: int, input_w: int, grid_h: int, grid_w: int) -> np.ndarray:
    return centre_gaussian_baseline(input_h, input_w, grid_h, grid_w)


def _baseline_maps(transform: InputTransform, grid_h: int, grid_w: int) -> np.ndarray:
    """(2, N): the uniform and the centred-Gaussian maps, in BASELINES order."""
    n = grid_h * grid_w
    return np.stack([np.full(n, 1.0 / n), _centre_baseline(transform.input_h, transform.input_w, grid_h, grid_w)])


# --- state: what is up to date ------------------------------------------------------------------------------


def _map_state(path: Path) -> dict[str, tuple[str, dt.datetime]]:
    """image id -> (weights_id, latest extracted_at) of a maps partition (columns only: cheap)."""
    table = pq.read_table(path, columns=["image_id", "weights_id", "extracted_at"])
    grouped = table.group_by(["image_id", "weights_id"]).aggregate([("extracted_at", "max")])
    return {
        row["image_id"]: (row["weights_id"], row["extracted_at_max"])
        for row in grouped.to_pylist()  # one weights_id per image: extraction replaces an image whole
    }


def _alignment_state(path: Path) -> dict[str, tuple[str, dt.datetime, str]]:
    if not path.is_file():
        return {}
    table = pq.read_table(path, columns=["image_id", "weights_id", "maps_extracted_at", "targets_hash"])
    grouped = table.group_by(["image_id", "weights_id", "maps_extracted_at", "targets_hash"]).aggregate([])
    return {r["image_id"]: (r["weights_id"], r["maps_extracted_at"], r["targets_hash"]) for r in grouped.to_pylist()}


# --- scoring ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ImageTargets:
    transform: InputTransform
    features: dict[str, list[Region]]
    targets_hash: str


def _row_groups(path: Path, wanted: Sequence[str]) -> Iterator[tuple[str, pa.Table]]:
    """(first image id, rows) of each row group of a maps partition that may hold a ``wanted`` (sorted) image
    id, filtered to those ids, in order of their first image id."""
    parquet = pq.ParquetFile(path)
    meta = parquet.metadata
    column = meta.schema.names.index("image_id")
    value_set = pa.array(list(wanted), pa.string())
    order = []
    for index in range(meta.num_row_groups):
        stats = meta.row_group(index).column(column).statistics
        if stats is not None and stats.has_min_max:
            position = bisect.bisect_left(wanted, stats.min)
            if position == len(wanted) or wanted[position] > stats.max:
                continue  # no wanted image in [min, max]
            order.append((stats.min, index))
        else:
            order.append(("", index))
    for first, index in sorted(order):
        group = parquet.read_row_group(index, columns=_MAP_COLUMNS)
        group = _keep(group, pc.is_in(group["image_id"], value_set=value_set))
        if group.num_rows:
            yield first, group


class _ImageStream:
    """A partition's wanted map rows, handed out by image id ranges: ``take_until(last)`` returns the rows of
    images <= ``last`` read so far plus those of the next row groups that start at or before it; the rest
    waits for the next call. Holds at most one row group beyond the range."""

    def __init__(self, path: Path, wanted: Sequence[str]) -> None:
        self._groups = _row_groups(path, wanted)
        self._next: tuple[str, pa.Table] | None = next(self._groups, None)
        self._pending: pa.Table | None = None

    def take_until(self, last: str) -> pa.Table | None:
        parts = [self._pending] if self._pending is not None else []
        while self._next is not None and self._next[0] <= last:
            parts.append(self._next[1])
            self._next = next(self._groups, None)
        if not parts:
            return None
        rows = pa.concat_tables(parts)
        mine = pc.less_equal(rows["image_id"], last)
        rest = _keep(rows, pc.invert(mine))
        self._pending = rest if rest.num_rows else None
        taken = _keep(rows, mine)
        return taken if taken.num_rows else None


def _keep(rows: pa.Table, mask: pa.ChunkedArray | pa.Array) -> pa.Table:
    """``rows.filter(mask)`` without copying the maps where the kept rows are all the rows, none, or one run
    (the usual case: partitions are sorted by image id)."""
    keep = mask.to_numpy(zero_copy_only=False) if isinstance(mask, pa.Array) else np.asarray(mask)
    kept = np.flatnonzero(keep)
    if len(kept) == 0:
        return rows.slice(0, 0)
    if kept[-1] - kept[0] + 1 == len(kept):  # one run: a zero-copy slice
        return rows.slice(int(kept[0]), len(kept))
    return rows.filter(mask)


TargetCache = dict[tuple[str, str, int, int], FeatureTargets]  # (image, feature, grid_h, grid_w) -> targets


def score_maps(
    group: pa.Table, targets: dict[str, ImageTargets], annotations_hash: str, cache: TargetCache | None = None
) -> pa.Table:
    """The ``alignment`` rows of a chunk of ``attention_maps`` rows whose images all have targets; ``cache``
    shares each (image, feature, grid)'s targets between calls (the methods of one chunk of images)."""
    cache = {} if cache is None else cache
    computed_at = dt.datetime.now(dt.UTC)
    image_ids = group["image_id"].to_numpy(zero_copy_only=False)
    grid_h = group["grid_h"].to_numpy().astype(np.int64)
    grid_w = group["grid_w"].to_numpy().astype(np.int64)
    layers = group["layer"].to_numpy().astype(np.int64)
    flat, offsets, _ = flat_map_values(group)

    head_values = group["head"].fill_null(-1).to_numpy().astype(np.int64)  # -1: fused
    codes = pc.dictionary_encode(group["image_id"]).combine_chunks().indices.to_numpy().astype(np.int64)
    block_keys = (codes * 65536 + grid_h) * 65536 + grid_w  # one key per (image, grid)
    parts: dict[str, list[np.ndarray]] = {name: [] for name in ("row", "layer", "head", "kind", "metrics")}
    per_block: list[tuple[int, str, int, int, int, FeatureTargets]] = []  # (first row, feature, gh, gw, count, t)
    blocks = list(dict.fromkeys(block_keys.tolist()))  # (image, grid) in order of appearance
    grids_of: dict[int, list[tuple[int, int]]] = {}  # image code -> its grids here (Grad-CAM: several)
    for key in blocks:
        grids_of.setdefault(key >> 32, []).append(((key >> 16) & 0xFFFF, key & 0xFFFF))
    for key in blocks:
        members = np.flatnonzero(block_keys == key)
        first = int(members[0])
        image_id, gh, gw = str(image_ids[first]), int(grid_h[first]), int(grid_w[first])
        image = targets[image_id]
        n = gh * gw
        if members[-1] - members[0] + 1 == len(members):  # one run of rows (sorted by image): a view
            maps = flat[offsets[members[0]] : offsets[members[0]] + len(members) * n].reshape(len(members), n)
        else:
            maps = flat[offsets[members][:, None] + np.arange(n)[None, :]]  # (M, N) float32
        unique_layers = np.unique(layers[members])
        baselines = _baseline_maps(image.transform, gh, gw)
        # rows of one (image, grid, feature): the maps, then per layer the baselines in BASELINES order
        rows = np.concatenate([members, np.full(len(BASELINES) * len(unique_layers), first)])
        row_layers = np.concatenate([layers[members], np.repeat(unique_layers, len(BASELINES))])
        row_heads = np.concatenate([head_values[members], np.full(len(BASELINES) * len(unique_layers), -1)])
        kinds = np.concatenate(
            [np.zeros(len(members), np.int8), np.tile(np.arange(1, len(MAP_KINDS), dtype=np.int8), len(unique_layers))]
        )
        feature_targets_here = {}
        for feature, regions in image.features.items():
            cache_key = (image_id, feature, gh, gw)
            if cache_key not in cache:  # every grid of the image at once: one raster of the soft target
                for (h, w), t in feature_targets_grids(regions, image.transform, grids_of[key >> 32]).items():
                    cache.setdefault((image_id, feature, h, w), t)
            feature_targets_here[feature] = cache[cache_key]
        scored = [i for i, t in enumerate(feature_targets_here.values()) if t.scored]
        stacked = np.concatenate([maps, baselines.astype(maps.dtype)])  # the maps and the baselines together
        targets_here = list(feature_targets_here.values())
        scores = alignment_metric_array(
            stacked,
            np.array([targets_here[i].coverage for i in scored]).reshape(len(scored), n),
            np.array([targets_here[i].soft_target for i in scored]).reshape(len(scored), n),
        )  # (scored features, metrics, maps + baselines)
        m = len(members)
        count = len(rows)
        # per feature: the maps' scores, then the baselines' repeated for each layer; NaN where not scored
        # (every region outside the view: recorded, not scored)
        block = np.full((len(targets_here), len(METRIC_COLUMNS), count), np.nan)
        block[scored] = np.concatenate(
            [scores[:, :, :m], np.tile(scores[:, :, m:], (1, 1, len(unique_layers)))], axis=2
        )
        parts["metrics"].append(block.transpose(1, 0, 2).reshape(len(METRIC_COLUMNS), -1))
        for name, column in (("row", rows), ("layer", row_layers), ("head", row_heads), ("kind", kinds)):
            parts[name].append(np.tile(column, len(targets_here)))
        for feature, t in feature_targets_here.items():
            per_block.append((first, feature, gh, gw, count, t))
    if not per_block:
        return schema.ALIGNMENT.empty_table()
    row = np.concatenate(parts["row"])  # the source map row each output row belongs to (baselines: the first)
    counts = np.array([b[4] for b in per_block])
    repeat = functools.partial(np.repeat, repeats=counts)
    heads_out = np.concatenate(parts["head"])
    features = [b[1] for b in per_block]
    feature_names = sorted(set(features))
    feature_codes = repeat(np.array([feature_names.index(f) for f in features], dtype=np.int32))
    region_counts = [len(targets[str(image_ids[b[0]])].features[b[1]]) for b in per_block]
    columns = {
        "image_id": pc.take(group["image_id"], pa.array(row)),
        "layer": pa.array(np.concatenate(parts["layer"]).astype(np.int16)),
        "head": pa.array(heads_out.astype(np.int16), mask=heads_out < 0),
        "map_kind": pa.DictionaryArray.from_arrays(
            pa.array(np.concatenate(parts["kind"]).astype(np.int32)), pa.array(MAP_KINDS)
        ).cast(pa.string()),
        "feature": pa.DictionaryArray.from_arrays(pa.array(feature_codes), pa.array(feature_names)).cast(pa.string()),
        "grid_h": pa.array(repeat(np.array([b[2] for b in per_block], dtype=np.int16))),
        "grid_w": pa.array(repeat(np.array([b[3] for b in per_block], dtype=np.int16))),
        "num_regions": pa.array(repeat(np.array(region_counts, dtype=np.int32))),
        "area_fraction": pa.array(repeat(np.array([b[5].area_fraction for b in per_block]))),
        "visible_fraction": pa.array(repeat(np.array([b[5].visible_fraction for b in per_block]))),
        "weights_id": pc.take(group["weights_id"], pa.array(row)),
        "maps_extracted_at": pc.take(group["extracted_at"], pa.array(row)),
        "targets_hash": pa.array([targets[str(image_ids[b[0]])].targets_hash for b in per_block]).take(
            pa.array(repeat(np.arange(len(per_block))))
        ),
        # constants: repeated scalars (an object array of n Python values costs ~0.4 us a row to convert)
        "annotations_hash": pa.repeat(pa.scalar(annotations_hash, pa.string()), len(row)),
        "computed_at": pa.repeat(pa.scalar(computed_at, schema.TIMESTAMP), len(row)),
    }
    metrics = np.concatenate(parts["metrics"], axis=1)  # (metrics, rows)
    for metric, values_m in zip(METRIC_COLUMNS, metrics, strict=True):
        missing = np.isnan(values_m)
        if metric == "pointing_hit":
            columns[metric] = pa.array(values_m > 0.5, pa.bool_(), mask=missing)
        else:
            columns[metric] = pa.array(values_m, pa.float64(), mask=missing)
    return pa.table(columns).select(schema.ALIGNMENT.names).cast(schema.ALIGNMENT)


@dataclass
class _Plan:
    """One (model, method) partition's work: images to score, images carried over, and its writer."""

    result: MethodAlignment
    maps_path: Path
    target_dir: Path
    todo: list[str]
    writer: PartitionWriter | None = None
    stream: _ImageStream | None = None


def _plan(maps_path: Path, target_dir: Path, targets: dict[str, ImageTargets], method: str) -> _Plan:
    current = _map_state(maps_path)
    wanted = {i: current[i] for i in targets if i in current}
    existing = _alignment_state(target_dir / DATA_FILE)
    # same maps and same targets: carried over
    up_to_date = {i for i, (w, e) in wanted.items() if existing.get(i) == (w, e, targets[i].targets_hash)}
    plan = _Plan(MethodAlignment(method, images_up_to_date=len(up_to_date)), maps_path, target_dir, [])
    plan.todo = sorted(set(wanted) - up_to_date)
    stale = set(existing) - up_to_date
    if not plan.todo and not stale and (target_dir / DATA_FILE).is_file():
        plan.result.rows_written = pq.ParquetFile(target_dir / DATA_FILE).metadata.num_rows
        return plan  # nothing to do: the partition is not rewritten
    # not clustered: new rows arrive in image order, one row group per chunk of images, and alignment is read
    # whole (rankings, checks), never by image, so the clustering pass (a second write) would buy nothing
    plan.writer = PartitionWriter(target_dir, schema.ALIGNMENT)
    if up_to_date:
        copy_rows_except(target_dir / DATA_FILE, stale, plan.writer.write)
    plan.stream = _ImageStream(maps_path, plan.todo) if plan.todo else None
    return plan


def _score(plans: list[_Plan], targets: dict[str, ImageTargets], annotations_hash: str) -> None:
    """Score every plan's images, CHUNK_IMAGES images at a time across the methods, so each image's targets
    are computed once per grid and then dropped (memory: one chunk of images, whatever their number)."""
    images = sorted(set().union(*(p.todo for p in plans)))
    for start in range(0, len(images), CHUNK_IMAGES):
        last = images[min(start + CHUNK_IMAGES, len(images)) - 1]
        cache: TargetCache = {}
        for plan in plans:
            rows = plan.stream.take_until(last) if plan.stream is not None else None
            if rows is not None and plan.writer is not None:
                plan.writer.write(score_maps(rows, targets, annotations_hash, cache))
                plan.result.maps_scored += rows.num_rows


def write_alignment(warehouse: Path, model: str, rank: bool = True, shard: str | None = None) -> AlignmentReport:
    """Score every maps partition of ``model`` (of one image shard, or None: every shard) against the
    ``annotations`` table (see the module docstring); with ``rank``, rebuild the ``head_ranking`` of each
    method whose alignment was rewritten (or is missing) from all its shards (``write_rankings``)."""
    start = time.perf_counter()
    warehouse = Path(warehouse)
    report = AlignmentReport(model)
    regions, annotations_hash = read_regions(warehouse)
    transforms = read_transforms(warehouse, model, shard)
    targets: dict[str, ImageTargets] = {}
    for image_id, image_regions in regions.items():
        if image_id not in transforms:
            continue  # not extracted by this model
        transform = transforms[image_id]
        if transform is None:
            report.images_without_transform.append(image_id)
            continue
        targets[image_id] = ImageTargets(transform, features_of(image_regions), targets_hash(image_regions, transform))
    plans = []
    try:
        for source in iter_partitions(warehouse, "attention_maps", model=model):
            if shard not in (None, source.keys["shard"]):
                continue
            target_dir = partition_dir(warehouse, "alignment", **source.keys)
            plans.append(_plan(source.path, target_dir, targets, source.keys["method"]))
        _score([p for p in plans if p.writer is not None], targets, annotations_hash or "")
        for plan in plans:
            if plan.writer is not None:
                plan.result.write = plan.writer.commit()
                plan.result.rows_written = plan.result.write.rows
                plan.result.images_scored = len(plan.todo)
                plan.result.rewritten = True
    except BaseException:
        for plan in plans:
            if plan.writer is not None and not plan.writer.closed:
                plan.writer.abort()
        raise
    stale: set[str] = set()
    for plan in plans:
        method = plan.result.method
        previous = report.methods.get(method)
        report.methods[method] = plan.result if previous is None else _add(previous, plan.result)
        ranking = partition_file(warehouse, "head_ranking", model=model, method=method)
        if plan.result.rewritten or not ranking.is_file():
            stale.add(method)
    if rank and stale:
        write_rankings(warehouse, model, sorted(stale))
    report.seconds = time.perf_counter() - start
    return report


def _add(total: MethodAlignment, shard: MethodAlignment) -> MethodAlignment:
    """One method's alignment over its shards: counts summed."""
    return MethodAlignment(
        total.method,
        images_scored=total.images_scored + shard.images_scored,
        images_up_to_date=total.images_up_to_date + shard.images_up_to_date,
        maps_scored=total.maps_scored + shard.maps_scored,
        rows_written=total.rows_written + shard.rows_written,
        rewritten=total.rewritten or shard.rewritten,
    )


def write_rankings(warehouse: Path, model: str, methods: Sequence[str] | None = None) -> dict[str, WriteStats]:
    """Rebuild the ``head_ranking`` of ``model``'s methods (None: every method with alignment) from the
    alignment rows of all their image shards; a ranking aggregates over every image, so it is per (model,
    method), never per shard."""
    files: dict[str, list[Path]] = {}
    for partition in iter_partitions(warehouse, "alignment", model=model):
        files.setdefault(partition.keys["method"], []).append(partition.path)
    wanted = list(files) if methods is None else list(methods)
    return {
        method: write_head_ranking(
            files.get(method, []), partition_dir(warehouse, "head_ranking", model=model, method=method)
        )
        for method in wanted
    }
