"""Data checks of the ``annotations`` and ``alignment`` tables (the Dagster asset checks run these).

- ``regions_matched``: every image the annotation file names is a catalogued image (no "unknown image" or
  ambiguous base-name errors), and every stored region's image is in the catalogue.
- ``coordinates_valid``: every stored region satisfies 0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height of
  its catalogued image (after EXIF orientation).
- ``metric_ranges``: IoU, coverage, area and visible fractions in [0, 1]; KL >= 0; MSE >= 0; finite.
- ``one_row_per_map_feature``: per (model, method), the map rows of each scored image equal its stored maps
  x its features (``all`` + each feature present), each (image, layer, head, feature) once.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow.compute as pc
import pyarrow.parquet as pq

from ssl_attention.alignment.annotations import AnnotationSet
from ssl_attention.alignment.compute import FEATURE_ALL, read_transforms
from ssl_attention.alignment.metrics import PERCENTILES
from ssl_attention.alignment.store import read_catalog_entries
from ssl_attention.validation import CheckOutcome
from ssl_attention.warehouse.paths import iter_partitions, partition_file

ANNOTATION_CHECKS = {
    "regions_matched": "Every image the annotation file names is a catalogued image.",
    "coordinates_valid": "Every region lies inside its image: 0 <= x0 < x1 <= width, 0 <= y0 < y1 <= height.",
}
ALIGNMENT_CHECKS = {
    "metric_ranges": "IoU, coverage and fractions in [0, 1], KL and MSE >= 0, every score finite.",
    "one_row_per_map_feature": "One alignment row per stored map x feature of its image (all + each feature).",
}
UNMATCHED_PREFIXES = ("unknown image", "base name")
UNIT_COLUMNS = (*(f"iou_{p}" for p in PERCENTILES), "coverage", "area_fraction", "visible_fraction")


def check_annotations(warehouse: Path, parsed: AnnotationSet | None = None) -> list[CheckOutcome]:
    """The two annotation checks over the stored table (and the parse's errors, when given)."""
    matched = CheckOutcome("regions_matched", True, ANNOTATION_CHECKS["regions_matched"])
    valid = CheckOutcome("coordinates_valid", True, ANNOTATION_CHECKS["coordinates_valid"])
    for error in parsed.errors if parsed is not None else []:
        if error.reason.startswith(UNMATCHED_PREFIXES):
            matched.fail(f"{error.file_name}: {error.reason}")
    path = partition_file(warehouse, "annotations")
    if path.is_file():
        sizes = {image_id: (w, h) for image_id, _, w, h in read_catalog_entries(warehouse)}
        columns = ["image_id", "file_name", "region_id", "x0", "y0", "x1", "y1"]
        for row in pq.read_table(path, columns=columns).to_pylist():
            where = f"{row['file_name']} region {row['region_id']}"
            if row["image_id"] not in sizes:
                matched.fail(f"{where}: image {row['image_id']} is not catalogued")
                continue
            width, height = sizes[row["image_id"]]
            if not (0 <= row["x0"] < row["x1"] <= width and 0 <= row["y0"] < row["y1"] <= height):
                box = f"({row['x0']:g}, {row['y0']:g}, {row['x1']:g}, {row['y1']:g})"
                valid.fail(f"{where}: box {box} outside {width} x {height}")
    return [matched, valid]


def check_alignment(warehouse: Path, model: str, shard: str | None = None) -> dict[str, list[CheckOutcome]]:
    """Per method (and image shard) of ``model``: the two alignment checks of one shard, or (None) of every
    shard (merge them with ``validation.merge_outcomes``)."""
    results = {}
    for source in iter_partitions(warehouse, "alignment", model=model):
        method, where = source.keys["method"], source.keys["shard"]
        if shard not in (None, where):
            continue
        label = method if shard is not None else f"{method} shard {where}"
        results[label] = [_metric_ranges(source.path), _one_row_per_map_feature(warehouse, model, method, where)]
    return results


def _metric_ranges(path: Path) -> CheckOutcome:
    outcome = CheckOutcome("metric_ranges", True, ALIGNMENT_CHECKS["metric_ranges"])
    table = pq.read_table(path, columns=["image_id", "layer", "head", "feature", *UNIT_COLUMNS, "kl", "mse"])
    for column in (*UNIT_COLUMNS, "kl", "mse"):
        values = table[column]
        low = pc.less(values, -1e-9)
        high = pc.greater(values, 1 + 1e-9) if column in UNIT_COLUMNS else pc.is_nan(values)
        bad = pc.or_(pc.or_(low, high), pc.is_nan(values)).fill_null(False)
        for row in table.filter(bad).slice(0, 3).to_pylist():
            outcome.fail(f"{column} = {row[column]} for image {row['image_id']} layer {row['layer']} "
                         f"head {row['head']} feature {row['feature']}")  # fmt: skip
        extra = pc.sum(bad).as_py() or 0
        if extra > 3:
            outcome.failures += extra - 3
    return outcome


def _one_row_per_map_feature(warehouse: Path, model: str, method: str, shard: str) -> CheckOutcome:
    outcome = CheckOutcome("one_row_per_map_feature", True, ALIGNMENT_CHECKS["one_row_per_map_feature"])
    rows = pq.read_table(
        partition_file(warehouse, "alignment", model=model, method=method, shard=shard),
        columns=["image_id", "layer", "head", "map_kind", "feature"],
    )
    maps_path = partition_file(warehouse, "attention_maps", model=model, method=method, shard=shard)
    stored: dict[str, int] = {}  # image id -> its stored maps
    if maps_path.is_file():
        counts = pq.read_table(maps_path, columns=["image_id"]).group_by("image_id").aggregate([("image_id", "count")])
        stored = dict(zip(counts["image_id"].to_pylist(), counts["image_id_count"].to_pylist(), strict=True))
    map_rows = rows.filter(pc.equal(rows["map_kind"], "map"))
    keys = map_rows.group_by(["image_id", "layer", "head", "feature"]).aggregate([("image_id", "count")])
    duplicates = keys.filter(pc.greater(keys["image_id_count"], 1))
    for row in duplicates.slice(0, 3).to_pylist():
        outcome.fail(f"image {row['image_id']} layer {row['layer']} head {row['head']} feature {row['feature']} "
                     f"appears {row['image_id_count']} times")  # fmt: skip
    annotated = features_by_image(warehouse)
    per_image = map_rows.group_by("image_id").aggregate([("feature", "count")]).to_pylist()
    scored = {row["image_id"] for row in per_image}
    transforms = read_transforms(warehouse, model, shard)
    for image_id in sorted(set(annotated) & set(stored) - scored):
        if transforms.get(image_id) is not None:  # extracted with a stored transform: it should be scored
            outcome.fail(f"image {image_id}: annotated and extracted, but has no alignment rows")
    for row in per_image:
        image_id = row["image_id"]
        expected = stored.get(image_id, 0) * len(annotated.get(image_id, ()))
        if row["feature_count"] != expected:
            outcome.fail(f"image {image_id}: {row['feature_count']} rows, expected {expected} "
                         f"({stored.get(image_id, 0)} maps x {len(annotated.get(image_id, ()))} features)")  # fmt: skip
    return outcome


def features_by_image(warehouse: Path) -> dict[str, set[str]]:
    """image id -> the features it is scored for (``all`` and each annotated feature)."""
    path = partition_file(warehouse, "annotations")
    if not path.is_file():
        return {}
    result: dict[str, set[str]] = {}
    for row in pq.read_table(path, columns=["image_id", "feature"]).to_pylist():
        result.setdefault(row["image_id"], {FEATURE_ALL}).add(row["feature"])
    return result
