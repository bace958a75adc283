"""Shared by the query, SQL shell and SQL docs tests: a tiny warehouse with head_stats and the catalog."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ssl_attention.alignment.compute import write_alignment
from ssl_attention.alignment.store import write_annotations
from ssl_attention.query import write_catalog
from ssl_attention.registry import MODELS
from ssl_attention.stats import write_head_stats

SLUGS = tuple(MODELS)
SAMPLE_ANNOTATIONS = Path(__file__).resolve().parents[1] / "data" / "samples" / "annotations.json"


def build_sql_warehouse(tiny_warehouse: Path, target: Path) -> Path:
    """Copy the (read-only) session warehouse, add head_stats, the sample annotations and alignment for every
    model, and the catalog file."""
    shutil.copytree(tiny_warehouse, target)
    write_annotations(target, SAMPLE_ANNOTATIONS)
    for slug in SLUGS:
        write_head_stats(target, slug)
        write_alignment(target, slug)
    write_catalog(target)
    return target


def read_partition(warehouse: Path, table: str, model: str, method: str) -> pa.Table:
    return pq.read_table(Path(warehouse) / table / f"model={model}" / f"method={method}" / "shard=0" / "data.parquet")


def grid_of(rows: pa.Table) -> np.ndarray:
    """(rows, grid_h, grid_w) float32 of map rows sharing a grid, via pyarrow only."""
    values = pc.list_flatten(rows["map_values"]).to_numpy()
    return values.reshape(rows.num_rows, rows["grid_h"][0].as_py(), rows["grid_w"][0].as_py())


def select(table: pa.Table, **equal: object) -> pa.Table:
    mask = None
    for column, value in equal.items():
        condition = pc.is_null(table[column]) if value is None else pc.equal(table[column], value)
        mask = condition if mask is None else pc.and_(mask, condition)
    return table.filter(mask) if mask is not None else table


def fused_first(rows: pa.Table) -> pa.Table:
    """Rows ordered by head with the fused map (head NULL) first."""
    key = pc.fill_null(rows["head"], -1).to_numpy()
    return rows.take(np.argsort(key, kind="stable"))
