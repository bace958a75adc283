"""Alignment queries: checks of metric and feature names, the SQL over the ``head_ranking``, ``alignment``,
``annotations`` and ``inputs`` partition files, the head x feature matrix result, and an image's regions in
one model's input frame."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from ssl_attention.alignment.compute import FEATURE_ALL, MAP_KINDS, TRANSFORM_COLUMNS
from ssl_attention.alignment.geometry import InputTransform, map_boxes
from ssl_attention.alignment.metrics import METRIC_COLUMNS
from ssl_attention.alignment.ranking import LOWER_IS_BETTER
from ssl_attention.query.errors import QueryError, UnknownNameError, format_values
from ssl_attention.query.reads import Files, read
from ssl_attention.query.selection import as_index

METRICS = METRIC_COLUMNS

RANKING_SQL = """SELECT layer, metric, feature, entry, map_kind, head, n_images, mean, median, ci_low, ci_high,
    higher_is_better, rank, head_rank
FROM read_parquet($path) WHERE layer = $layer AND metric = $metric AND feature = $feature
ORDER BY rank NULLS LAST, map_kind <> 'map', head NULLS FIRST"""

MATRIX_SQL = """SELECT entry, map_kind, head, feature, mean
FROM read_parquet($path) WHERE layer = $layer AND metric = $metric AND feature <> 'all'"""

FEATURES_SQL = "SELECT DISTINCT feature FROM read_parquet($path) ORDER BY feature"

# the annotations table (original-image pixels) and one model's inputs row (the transform and the input size)
ANNOTATED_SQL = "SELECT DISTINCT image_id, feature FROM read_parquet($path) ORDER BY image_id, feature"
REGIONS_SQL = """SELECT region_id, feature, x0, y0, x1, y1 FROM read_parquet($path)
WHERE image_id = $image_id ORDER BY region_id"""
TRANSFORM_SQL = "SELECT * EXCLUDE (jpeg) FROM read_parquet($path) WHERE image_id = $image_id LIMIT 1"

# one image's scores at one layer for one feature: the maps (fused first, then the heads), then the baselines
IMAGE_SCORES_SQL = f"""SELECT map_kind, head, {", ".join(METRIC_COLUMNS)}, num_regions, area_fraction,
    visible_fraction
FROM read_parquet($path) WHERE image_id = $image_id AND layer = $layer AND feature = $feature
ORDER BY list_position($kinds, map_kind), head NULLS FIRST"""


def read_arrow(path: Files, sql: str, params: dict[str, Any]) -> pa.Table:
    """``reads.read`` of one partition file (or a partition's shard files), fetched as an Arrow table (results
    are small: DuckDB's warning about the copy a DB-API cursor makes is silenced)."""

    def fetch(cur: Any) -> pa.Table:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            return cur.to_arrow_table()

    return read(path, sql, params, fetch)


def exemplars_sql(metric: str, fused: bool) -> str:
    """The best-scoring images of one map: ``metric`` is a checked column name (from METRICS only)."""
    direction = "ASC" if metric in LOWER_IS_BETTER else "DESC"
    value = f"CAST({metric} AS DOUBLE)"
    head = "head IS NULL" if fused else "head = $head"
    return f"""SELECT image_id, {value} AS value, coverage, iou_50, area_fraction, visible_fraction
FROM read_parquet($path)
WHERE map_kind = 'map' AND layer = $layer AND {head} AND feature = $feature AND {metric} IS NOT NULL
ORDER BY value {direction}, image_id LIMIT $limit"""


def check_metric(metric: object) -> str:
    if metric not in METRICS:
        raise UnknownNameError(f"unknown alignment metric {metric!r}; valid metrics: {format_values(METRICS)}")
    return metric  # type: ignore[return-value]


def check_feature(feature: object, features: tuple[str, ...], where: str) -> str:
    if feature not in features:
        raise UnknownNameError(
            f"unknown feature {feature!r} for {where}; valid features: {format_values(features, 30)}"
        )
    return feature  # type: ignore[return-value]


def check_limit(limit: object) -> int:
    value = as_index("limit", limit)
    if value < 1:
        raise QueryError(f"limit must be at least 1, got {value}")
    return value


@dataclass(frozen=True)
class HeadFeatureMatrix:
    """Mean ``metric`` of every head (then the fused map and the baselines) for every feature of one layer."""

    model: str
    method: str
    layer: int
    metric: str
    entries: tuple[str, ...]  # row labels: "head 0".., "fused", "uniform", "centre_gaussian"
    features: tuple[str, ...]  # column labels, sorted ("all" left out: it is the head ranking's)
    values: np.ndarray  # (len(entries), len(features)) float64, NaN where a feature was never scored

    def best_head(self, feature: str) -> str | None:
        """The head with the best mean for ``feature`` (lowest for kl and mse)."""
        if feature not in self.features:
            raise UnknownNameError(f"unknown feature {feature!r}; valid features: {format_values(self.features, 30)}")
        column = self.values[:, self.features.index(feature)]
        heads = [i for i, e in enumerate(self.entries) if e.startswith("head ") and np.isfinite(column[i])]
        if not heads:
            return None
        pick = min if self.metric in LOWER_IS_BETTER else max
        return self.entries[pick(heads, key=lambda i: column[i])]


def _entry_order(map_kind: str, head: int | None) -> tuple[int, int]:
    """Heads in order, then the fused map, then the baselines in MAP_KINDS order."""
    if map_kind == "map":
        return (0, head) if head is not None else (1, 0)
    return (1, MAP_KINDS.index(map_kind))


def head_feature_matrix(
    model: str, method: str, layer: int, metric: str, rows: list[dict[str, object]]
) -> HeadFeatureMatrix:
    order = {
        (r["entry"], _entry_order(str(r["map_kind"]), r["head"]))  # type: ignore[arg-type]
        for r in rows
    }
    entries = tuple(e for e, _ in sorted(order, key=lambda item: item[1]))
    features = tuple(sorted({str(r["feature"]) for r in rows}))
    values = np.full((len(entries), len(features)), np.nan)
    for r in rows:
        if r["mean"] is not None:
            values[entries.index(str(r["entry"])), features.index(str(r["feature"]))] = float(r["mean"])  # type: ignore[arg-type]
    return HeadFeatureMatrix(model, method, layer, metric, entries, features, values)


@dataclass(frozen=True)
class RegionsInView:
    """An image's annotated regions in one model's input frame: each box of the ``annotations`` table (original
    pixels) carried through the model's stored transform (``inputs``: x * scale_x - crop_left), in input pixels
    with y downwards (``alignment.geometry.map_boxes``). The maps span the input, so these are the regions on
    the maps."""

    image_id: str
    model: str
    transform: InputTransform  # its input_w x input_h is the frame
    region_ids: tuple[int, ...]  # position among the image's entries in the annotation file
    features: tuple[str, ...]  # per region
    boxes: np.ndarray  # (R, 4) x0, y0, x1, y1 in input pixels, not clipped (partly outside when cut by the crop)
    clipped: np.ndarray  # (R, 4) clipped to the input frame
    visible_fraction: np.ndarray  # (R,) clipped area / area: 1 whole, 0 wholly outside the view

    @property
    def visible(self) -> np.ndarray:
        """(R,) bool: some of the region is in the view (what can be drawn)."""
        return self.visible_fraction > 0

    @property
    def cut(self) -> np.ndarray:
        """(R,) bool: in the view, but only partly (the crop cut it)."""
        return self.visible & (self.visible_fraction < 1)

    def of_feature(self, feature: str) -> RegionsInView:
        """The regions of ``feature`` (``all``: every region)."""
        if feature == FEATURE_ALL:
            return self
        keep = np.array([f == feature for f in self.features], dtype=bool)
        return RegionsInView(
            self.image_id,
            self.model,
            self.transform,
            tuple(r for r, k in zip(self.region_ids, keep, strict=True) if k),
            tuple(f for f in self.features if f == feature),
            self.boxes[keep],
            self.clipped[keep],
            self.visible_fraction[keep],
        )


def stored_transform(row: dict[str, Any]) -> InputTransform | None:
    """The ``InputTransform`` of an ``inputs`` row; None when the row predates the stored transform."""
    values = [row.get(column) for column in TRANSFORM_COLUMNS]
    if any(v is None for v in values):
        return None
    return InputTransform(*values)


def regions_in_view(image_id: str, model: str, transform: InputTransform, rows: list[dict[str, Any]]) -> RegionsInView:
    boxes = np.array([[r["x0"], r["y0"], r["x1"], r["y1"]] for r in rows], dtype=np.float64).reshape(-1, 4)
    mapped = map_boxes(boxes, transform)
    return RegionsInView(
        image_id=image_id,
        model=model,
        transform=transform,
        region_ids=tuple(int(r["region_id"]) for r in rows),
        features=tuple(str(r["feature"]) for r in rows),
        boxes=mapped.boxes,
        clipped=mapped.clipped,
        visible_fraction=mapped.visible,
    )
