"""Map results from the rows of one partition file: one map, the head grid of a layer, all layers x heads.

``Warehouse`` validates the request (a ``Selection``), reads the rows with the SQL built here (``map_sql``:
the partition named by (model, method), filtered on ``image_id`` -- row-group statistics prune to the one
row group holding the image -- and ``layer``) and hands them to the builders below, which only reshape.
Parameters are bound with ``$name``; no user text reaches the SQL.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from ssl_attention.query.errors import QueryError
from ssl_attention.query.metadata import PartitionFacts
from ssl_attention.query.results import AttentionMap, HeadGrid, LayerHeadMaps, StoredProvenance
from ssl_attention.query.selection import Selection

# Only what the dashboard needs: every extra column is decoded for the whole row group (~0.5 ms each).
# Layer names and provenance come from the partition's cached facts (weights_id is added when a partition
# mixes weights, which the asset checks forbid but a reader must not get wrong).
_COLUMNS = "layer, head, grid_h, grid_w, map_values, prefix_mass, register_mass"
_GRADCAM_COLUMNS = ", raw_scale, target_class"

ONE_FUSED = "image_id = $image_id AND layer = $layer AND head IS NULL"
ONE_HEAD = "image_id = $image_id AND layer = $layer AND head = $head"
ONE_LAYER = "image_id = $image_id AND layer = $layer"
ALL_LAYERS = "image_id = $image_id"

INPUT_SQL = "SELECT jpeg FROM read_parquet($path) WHERE image_id = $image_id LIMIT 1"


def map_sql(facts: PartitionFacts, where: str, order: str = "") -> str:
    """The map query over ``$path``: the columns this partition needs, ``where`` one of the filters above."""
    columns = _COLUMNS + (_GRADCAM_COLUMNS if facts.has_gradcam_columns else "")
    if facts.single_provenance is None:
        columns += ", weights_id"
    return f"SELECT {columns} FROM read_parquet($path) WHERE {where}" + (f" ORDER BY {order}" if order else "")


class Rows:
    """A query result as numpy columns (``fetchnumpy``: the cheapest way out of DuckDB for a few rows)."""

    def __init__(self, columns: dict[str, np.ndarray]) -> None:
        self.columns = columns
        self.num_rows = len(next(iter(columns.values()))) if columns else 0

    def __getitem__(self, name: str) -> np.ndarray:
        return self.columns[name]

    def value(self, name: str, row: int = 0) -> Any:
        column = self.columns[name]
        if np.ma.isMaskedArray(column) and np.ma.getmaskarray(column)[row]:
            return None
        item = column[row]
        return item.item() if isinstance(item, np.generic) else item

    def optional_ints(self, name: str) -> tuple[int | None, ...]:
        column = self.columns[name]
        mask = np.ma.getmaskarray(column)
        return tuple(None if m else int(v) for v, m in zip(np.ma.getdata(column).tolist(), mask.tolist(), strict=True))

    def select(self, rows: np.ndarray) -> Rows:
        return Rows({name: column[rows] for name, column in self.columns.items()})


def _provenance(facts: PartitionFacts, rows: Rows) -> StoredProvenance:
    single = facts.single_provenance
    return single if single is not None else facts.provenances[rows.value("weights_id")]


def _grids(rows: Rows) -> np.ndarray:
    """(rows, grid_h, grid_w) float32 from rows sharing one grid."""
    grid_h, grid_w = int(rows.value("grid_h")), int(rows.value("grid_w"))
    return np.stack(list(rows["map_values"])).astype(np.float32, copy=False).reshape(rows.num_rows, grid_h, grid_w)


def _floats(rows: Rows, name: str) -> np.ndarray:
    return np.ma.filled(rows[name].astype(np.float32), np.nan)


def _float_or_none(value: object) -> float | None:
    return None if value is None else float(value)  # type: ignore[arg-type]


def _one_layer_of(sel: Selection, image_id: str) -> dict[str, Any]:
    """The fields that say what a one-layer result is of: image, model, method, layer and its name."""
    layer = sel.layer
    return {
        "image_id": image_id,
        "model": sel.model,
        "method": sel.method,
        "layer": layer,
        "layer_name": sel.facts.layer_names.get(layer) if layer is not None else None,
    }


def attention_map(sel: Selection, image_id: str, rows: Rows) -> AttentionMap:
    """One map from its one row (``ONE_FUSED`` or ``ONE_HEAD``)."""
    return AttentionMap(
        **_one_layer_of(sel, image_id),
        head=sel.head,
        values=_grids(rows)[0],
        prefix_mass=float(rows.value("prefix_mass")),
        register_mass=float(rows.value("register_mass")),
        raw_scale=_float_or_none(rows.value("raw_scale")) if "raw_scale" in rows.columns else None,
        target_class=rows.value("target_class") if "target_class" in rows.columns else None,
        provenance=_provenance(sel.facts, rows),
    )


def head_grid(sel: Selection, image_id: str, rows: Rows) -> HeadGrid:
    """The fused map and every head of one layer, from the layer's rows ordered fused first (``ONE_LAYER``)."""
    return HeadGrid(
        **_one_layer_of(sel, image_id),
        heads=rows.optional_ints("head"),
        maps=_grids(rows),
        prefix_mass=_floats(rows, "prefix_mass"),
        register_mass=_floats(rows, "register_mass"),
        provenance=_provenance(sel.facts, rows),
    )


def layer_head_maps(sel: Selection, image_id: str, rows: Rows) -> LayerHeadMaps:
    """Every layer's head grid, from the image's rows ordered by layer, fused first (``ALL_LAYERS``)."""
    layers_column = np.asarray(rows["layer"])
    layers = tuple(int(v) for v in np.unique(layers_column))
    per_layer, names, prefix = [], [], []
    heads: tuple[int | None, ...] = ()
    for layer in layers:  # a dozen layers at most: one selection each, maps stay vectorised
        part = rows.select(np.flatnonzero(layers_column == layer))
        layer_heads = part.optional_ints("head")
        if heads and layer_heads != heads:
            raise QueryError(f"{sel.model}/{sel.method}: image {image_id} has different heads in layer {layer}")
        heads = layer_heads
        per_layer.append(_grids(part))
        names.append(sel.facts.layer_names.get(layer))
        prefix.append(_floats(part, "prefix_mass"))
    return LayerHeadMaps(
        image_id=image_id,
        model=sel.model,
        method=sel.method,
        layers=layers,
        layer_names=tuple(names),
        heads=heads,
        per_layer=tuple(per_layer),
        prefix_mass=np.stack(prefix),
        provenance=_provenance(sel.facts, rows),
    )


def layer_at_depth(layers: tuple[int, ...], depth: float) -> int:
    """The layer at relative depth ``depth`` in 0..1: index round(depth * (L - 1)), halves rounded up."""
    index = math.floor(depth * (len(layers) - 1) + 0.5)
    return layers[min(max(index, 0), len(layers) - 1)]


def relative_depth(layers: tuple[int, ...], layer: int) -> float:
    """A layer's own relative depth, its index / (L - 1) (1.0 for a single layer)."""
    return layers.index(layer) / (len(layers) - 1) if len(layers) > 1 else 1.0
