"""The ``alignment`` table: every stored map of one model scored against every feature of its image.

Per (model, method) partition of ``attention_maps`` and per image with regions in ``annotations``:

- features: ``all`` (the union of every region of the image) and each feature present;
- targets: the regions carried through the image's stored ``InputTransform`` (``inputs`` table) onto each
  map's grid (``geometry.feature_targets``; Grad-CAM stages on their own grids);
- rows: one per map x feature (``map_kind`` = ``map``; ``head`` NULL = the fused map) with the metrics of
  ``metrics.alignment_metrics``, plus per (layer, feature) one row for each baseline (``uniform``,
  ``centre_gaussian``) on that layer's grid. A feature whose regions all lie outside the view gets its rows
  with NULL metrics (recorded, not scored).

Incremental: each row carries the maps' ``weights_id`` and ``extracted_at`` and a hash of the image's regions
and transform (``targets_hash``); an image whose three values are unchanged is carried over, the others are
scored again, images no longer annotated or extracted are dropped. Nothing changed -> the partition is not
rewritten. Partitions are written like the maps (``PartitionWriter``, clustered by image), streamed row group
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
from ssl_attention.alignment.geometry import InputTransform, centre_gaussian_baseline, feature_targets
from ssl_attention.alignment.metrics import METRIC_COLUMNS, alignment_metrics
from ssl_attention.alignment.ranking import write_head_ranking
from ssl_attention.alignment.store import read_regions
from ssl_attention.warehouse import schema
from ssl_attention.warehouse.atomic import PartitionWriter, WriteStats
from ssl_attention.warehouse.paths import DATA_FILE, iter_partitions, partition_dir, partition_file
from ssl_attention.warehouse.tables import copy_rows_except

FEATURE_ALL = "all"
MAP_KINDS = ("map", "uniform", "centre_gaussian")
BASELINES = MAP_KINDS[1:]
TRANSFORM_COLUMNS = ("scale_x", "scale_y", "crop_left", "crop_top", "input_w", "input_h")
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


def read_transforms(warehouse: Path, model: str) -> dict[str, InputTransform | None]:
    """image id -> the stored ``InputTransform`` of ``model`` (None for rows written before it was stored)."""
    path = partition_file(warehouse, "inputs", model=model)
    if not path.is_file():
        return {}
    names = pq.ParquetFile(path).schema_arrow.names
    if not set(TRANSFORM_COLUMNS) <= set(names):
        ids = pq.read_table(path, columns=["image_id"])["image_id"].to_pylist()
        return dict.fromkeys(ids)
    rows = pq.read_table(path, columns=["image_id", *TRANSFORM_COLUMNS]).to_pylist()
    result: dict[str, InputTransform | None] = {}
    for row in rows:
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


def _row_groups(path: Path, wanted: Sequence[str]) -> Iterator[pa.Table]:
    """Row groups of a maps partition that may hold a ``wanted`` (sorted) image id, filtered to those ids."""
    parquet = pq.ParquetFile(path)
    meta = parquet.metadata
    column = meta.schema.names.index("image_id")
    value_set = pa.array(list(wanted), pa.string())
    for index in range(meta.num_row_groups):
        stats = meta.row_group(index).column(column).statistics
        if stats is not None and stats.has_min_max:
            position = bisect.bisect_left(wanted, stats.min)
            if position == len(wanted) or wanted[position] > stats.max:
                continue  # no wanted image in [min, max]
        group = parquet.read_row_group(index, columns=_MAP_COLUMNS)
        group = group.filter(pc.is_in(group["image_id"], value_set=value_set))
        if group.num_rows:
            yield group


def score_maps(group: pa.Table, targets: dict[str, ImageTargets], annotations_hash: str) -> pa.Table:
    """The ``alignment`` rows of a chunk of ``attention_maps`` rows whose images all have targets."""
    computed_at = dt.datetime.now(dt.UTC)
    image_ids = group["image_id"].to_numpy(zero_copy_only=False)
    grid_h = group["grid_h"].to_numpy().astype(np.int64)
    grid_w = group["grid_w"].to_numpy().astype(np.int64)
    layers = group["layer"].to_numpy().astype(np.int64)
    heads = group["head"].to_pylist()
    values = group["map_values"].combine_chunks()
    lengths = pc.list_value_length(values).to_numpy()
    if np.any(lengths != grid_h * grid_w):
        raise ValueError("attention_maps rows whose map length is not grid_h * grid_w")
    flat = pc.list_flatten(values).to_numpy(zero_copy_only=False)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    weights = group["weights_id"].to_pylist()
    extracted = group["extracted_at"].to_pylist()

    out: dict[str, list] = {name: [] for name in schema.ALIGNMENT.names}
    keys = np.char.add(np.char.add(image_ids.astype(str), "|"), np.char.add(grid_h.astype(str), grid_w.astype(str)))
    for key in dict.fromkeys(keys.tolist()):  # (image, grid) in order of appearance
        members = np.flatnonzero(keys == key)
        first = members[0]
        image_id, gh, gw = str(image_ids[first]), int(grid_h[first]), int(grid_w[first])
        image = targets[image_id]
        n = gh * gw
        maps = flat[offsets[members][:, None] + np.arange(n)[None, :]]  # (M, N) float32
        member_layers = layers[members]
        unique_layers = np.unique(member_layers)
        baselines = _baseline_maps(image.transform, gh, gw)
        for feature, regions in image.features.items():
            t = feature_targets(regions, image.transform, gh, gw)
            if t.scored:
                scores = alignment_metrics(maps, t.coverage, t.soft_target)
                base = alignment_metrics(baselines, t.coverage, t.soft_target)
            else:
                scores = base = None
            count = len(members) + len(BASELINES) * len(unique_layers)
            out["image_id"] += [image_id] * count
            out["layer"] += member_layers.tolist() + np.repeat(unique_layers, len(BASELINES)).tolist()
            out["head"] += [heads[i] for i in members] + [None] * (count - len(members))
            out["map_kind"] += ["map"] * len(members) + list(BASELINES) * len(unique_layers)
            out["feature"] += [feature] * count
            out["grid_h"] += [gh] * count
            out["grid_w"] += [gw] * count
            out["num_regions"] += [len(regions)] * count
            for metric in METRIC_COLUMNS:
                if scores is None or base is None:
                    out[metric] += [None] * count
                else:
                    out[metric] += scores[metric].tolist() + np.tile(base[metric], len(unique_layers)).tolist()
            out["area_fraction"] += [t.area_fraction] * count
            out["visible_fraction"] += [t.visible_fraction] * count
            out["weights_id"] += [weights[first]] * count
            out["maps_extracted_at"] += [extracted[first]] * count
            out["targets_hash"] += [image.targets_hash] * count
            out["annotations_hash"] += [annotations_hash] * count
            out["computed_at"] += [computed_at] * count
    return pa.table(out, schema=schema.ALIGNMENT)


def align_partition(
    maps_path: Path, target_dir: Path, targets: dict[str, ImageTargets], annotations_hash: str, method: str
) -> MethodAlignment:
    """Score one (model, method) maps partition into its alignment partition, incrementally."""
    result = MethodAlignment(method)
    current = _map_state(maps_path)
    wanted = {i: current[i] for i in targets if i in current}
    existing = _alignment_state(target_dir / DATA_FILE)
    up_to_date = {
        i for i, (w, e) in wanted.items() if existing.get(i) == (w, e, targets[i].targets_hash)
    }  # same maps and same targets
    todo = sorted(set(wanted) - up_to_date)
    stale = set(existing) - up_to_date
    result.images_up_to_date = len(up_to_date)
    if not todo and not stale and (target_dir / DATA_FILE).is_file():
        result.rows_written = pq.ParquetFile(target_dir / DATA_FILE).metadata.num_rows
        return result
    with PartitionWriter(target_dir, schema.ALIGNMENT, cluster_by="image_id") as writer:
        if up_to_date:
            copy_rows_except(target_dir / DATA_FILE, stale, writer.write)
        if todo:
            for group in _row_groups(maps_path, todo):
                writer.write(score_maps(group, targets, annotations_hash))
                result.maps_scored += group.num_rows
        result.write = writer.commit()
    result.images_scored = len(todo)
    result.rows_written = result.write.rows
    result.rewritten = True
    return result


def write_alignment(warehouse: Path, model: str, rank: bool = True) -> AlignmentReport:
    """Score every maps partition of ``model`` against the ``annotations`` table (see the module docstring);
    with ``rank``, rebuild each rewritten partition's ``head_ranking`` (or a missing one)."""
    start = time.perf_counter()
    warehouse = Path(warehouse)
    report = AlignmentReport(model)
    regions, annotations_hash = read_regions(warehouse)
    transforms = read_transforms(warehouse, model)
    targets: dict[str, ImageTargets] = {}
    for image_id, image_regions in regions.items():
        if image_id not in transforms:
            continue  # not extracted by this model
        transform = transforms[image_id]
        if transform is None:
            report.images_without_transform.append(image_id)
            continue
        targets[image_id] = ImageTargets(transform, features_of(image_regions), targets_hash(image_regions, transform))
    for source in iter_partitions(warehouse, "attention_maps", model=model):
        method = source.keys["method"]
        target_dir = partition_dir(warehouse, "alignment", model=model, method=method)
        result = align_partition(source.path, target_dir, targets, annotations_hash or "", method)
        report.methods[method] = result
        ranking = partition_file(warehouse, "head_ranking", model=model, method=method)
        if rank and (result.rewritten or not ranking.is_file()):
            write_head_ranking(target_dir / DATA_FILE, ranking.parent)
    report.seconds = time.perf_counter() - start
    return report
