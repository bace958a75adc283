"""The ``annotations`` table: an annotation file, matched against the warehouse's image catalogue, written
atomically, with its unusable entries in ``errors`` (source ``annotations``).

A file that is neither format raises ``AnnotationFormatError`` before anything is written, so the tables
already in the warehouse stay as they are. A readable file replaces the ``annotations`` table and the
``errors/source=annotations`` partition as a whole: they describe the file as it is now.
"""

from __future__ import annotations

import datetime as dt
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from ssl_attention.alignment.annotations import AnnotationSet, CatalogEntry, Region, read_annotations
from ssl_attention.warehouse import schema
from ssl_attention.warehouse.atomic import write_table_atomic
from ssl_attention.warehouse.paths import partition_dir, partition_file

ERRORS_SOURCE = "annotations"


class NoCatalogError(FileNotFoundError):
    """Annotations were given for a warehouse without an images table."""


@dataclass
class AnnotationsReport:
    annotations: AnnotationSet
    path: Path  # the annotations table's data file
    errors_path: Path
    images: int  # catalogued images with at least one region

    @property
    def regions(self) -> int:
        return len(self.annotations.regions)


def read_catalog_entries(warehouse: Path) -> list[CatalogEntry]:
    """(image_id, file name, width, height) of every catalogued image (sizes after EXIF orientation)."""
    path = partition_file(warehouse, "images")
    if not path.is_file():
        raise NoCatalogError(
            f"no images table in {warehouse}: catalogue the images (materialize `images`) before the annotations"
        )
    rows = pq.read_table(path, columns=["image_id", "file_name", "width", "height"]).to_pylist()
    return [(r["image_id"], r["file_name"], int(r["width"]), int(r["height"])) for r in rows]


def annotations_table(annotations: AnnotationSet, loaded_at: dt.datetime) -> pa.Table:
    rows = [{**region.as_row(), "format": annotations.format, "loaded_at": loaded_at} for region in annotations.regions]
    if not rows:
        return schema.ANNOTATIONS.empty_table()
    return pa.Table.from_pylist(rows, schema=schema.ANNOTATIONS)


def write_annotations(warehouse: Path, annotation_file: str | Path) -> AnnotationsReport:
    """Parse ``annotation_file`` against the catalogue and replace the ``annotations`` table and the
    annotations' ``errors`` partition. ``AnnotationFormatError`` (nothing written) for a file in neither
    format; ``NoCatalogError`` without an images table; ``FileNotFoundError`` for a missing file."""
    warehouse = Path(warehouse)
    path = Path(annotation_file)
    if not path.is_file():
        raise FileNotFoundError(f"annotation file {path} does not exist")
    parsed = read_annotations(path, read_catalog_entries(warehouse))
    stamp = dt.datetime.now(dt.UTC)
    table_stats = write_table_atomic(
        partition_dir(warehouse, "annotations"), annotations_table(parsed, stamp), schema.ANNOTATIONS
    )
    errors = pa.table(
        {
            "file_name": [e.file_name for e in parsed.errors],
            "image_id": [None] * len(parsed.errors),
            "reason": [e.reason for e in parsed.errors],
            "recorded_at": [stamp] * len(parsed.errors),
        },
        schema=schema.ERRORS,
    )
    errors_stats = write_table_atomic(partition_dir(warehouse, "errors", source=ERRORS_SOURCE), errors, schema.ERRORS)
    return AnnotationsReport(
        annotations=parsed,
        path=table_stats.path,
        errors_path=errors_stats.path,
        images=len({r.image_id for r in parsed.regions}),
    )


def read_regions(warehouse: Path) -> tuple[dict[str, list[Region]], str | None]:
    """image id -> its regions (file order), and the annotation file's hash; ({}, None) without a table."""
    path = partition_file(warehouse, "annotations")
    if not path.is_file():
        return {}, None
    table = pq.read_table(path, columns=[f for f in schema.ANNOTATIONS.names if f not in ("format", "loaded_at")])
    by_image: dict[str, list[Region]] = defaultdict(list)
    source_hash = None
    for row in table.to_pylist():
        polygon = tuple(tuple(p) for p in row["polygon"]) if row["polygon"] is not None else None
        region = Region(**{**row, "parent_features": tuple(row["parent_features"]), "polygon": polygon})
        by_image[region.image_id].append(region)
        source_hash = region.source_hash
    return dict(by_image), source_hash
