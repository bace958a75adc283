"""Map queries: one map, the head grid of a layer, all layers x heads, one image across models, input image.

Each query reads one partition file, named by validated (model, method) — explicit partition pruning — and
filters on ``image_id`` (row-group statistics prune to the one row group holding the image) and ``layer``.
Parameters are bound with ``$name``; no user text reaches the SQL.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ssl_attention.query.errors import MissingDataError, QueryError
from ssl_attention.query.results import (
    AttentionMap,
    ComparedMap,
    Comparison,
    HeadGrid,
    LayerHeadMaps,
    StoredProvenance,
)

if TYPE_CHECKING:
    from ssl_attention.query.handle import PartitionFacts, WarehouseHandle

# Only what the dashboard needs: every extra column is decoded for the whole row group (~0.5 ms each).
# Layer names and provenance come from the partition's cached facts (weights_id is added when a partition
# mixes weights, which the asset checks forbid but a reader must not get wrong).
_COLUMNS = "layer, head, grid_h, grid_w, map_values, prefix_mass, register_mass"
_GRADCAM_COLUMNS = ", raw_scale, target_class"


def _select(where: str, order: str, with_weights: bool, gradcam: bool) -> str:
    columns = _COLUMNS + (_GRADCAM_COLUMNS if gradcam else "") + (", weights_id" if with_weights else "")
    return f"SELECT {columns} FROM read_parquet($path) WHERE {where}" + (f" ORDER BY {order}" if order else "")


_ONE_FUSED = "image_id = $image_id AND layer = $layer AND head IS NULL"
_ONE_HEAD = "image_id = $image_id AND layer = $layer AND head = $head"
_LAYER = "image_id = $image_id AND layer = $layer"
_ALL_LAYERS = "image_id = $image_id"

_INPUT_SQL = "SELECT jpeg FROM read_parquet($path) WHERE image_id = $image_id LIMIT 1"


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


def _query(
    wh: WarehouseHandle, path: Path, facts: PartitionFacts, where: str, order: str, params: dict[str, object]
) -> Rows:
    sql = _select(where, order, facts.single_provenance is None, facts.has_gradcam_columns)
    return Rows(wh.read_numpy(path, sql, params))


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


def attention_map(
    wh: WarehouseHandle, image_id: str, model: str, method: str, layer: int, head: int | None = None
) -> AttentionMap:
    info = wh.require_model(model)
    method = wh.require_method(info, method)
    head = wh.require_head(info, method, head)
    layer = wh.require_layer(info, method, layer)
    image_id = wh.require_image_id(image_id)
    facts = wh.facts(model, method)
    path = wh.path("attention_maps", model=model, method=method)
    params: dict[str, object] = {"image_id": image_id, "layer": layer}
    if head is None:
        table = _query(wh, path, facts, _ONE_FUSED, "", params)
    else:
        table = _query(wh, path, facts, _ONE_HEAD, "", params | {"head": head})
    if table.num_rows == 0:
        raise wh.missing_image(image_id, model, method)
    return AttentionMap(
        image_id=image_id,
        model=model,
        method=method,
        layer=layer,
        layer_name=facts.layer_names.get(layer),
        head=head,
        values=_grids(table)[0],
        prefix_mass=float(table.value("prefix_mass")),
        register_mass=float(table.value("register_mass")),
        raw_scale=_float_or_none(table.value("raw_scale")) if "raw_scale" in table.columns else None,
        target_class=table.value("target_class") if "target_class" in table.columns else None,
        provenance=_provenance(facts, table),
    )


def head_grid(wh: WarehouseHandle, image_id: str, model: str, method: str, layer: int) -> HeadGrid:
    info = wh.require_model(model)
    method = wh.require_method(info, method)
    layer = wh.require_layer(info, method, layer)
    image_id = wh.require_image_id(image_id)
    facts = wh.facts(model, method)
    path = wh.path("attention_maps", model=model, method=method)
    table = _query(wh, path, facts, _LAYER, "head NULLS FIRST", {"image_id": image_id, "layer": layer})
    if table.num_rows == 0:
        raise wh.missing_image(image_id, model, method)
    return HeadGrid(
        image_id=image_id,
        model=model,
        method=method,
        layer=layer,
        layer_name=facts.layer_names.get(layer),
        heads=table.optional_ints("head"),
        maps=_grids(table),
        prefix_mass=_floats(table, "prefix_mass"),
        register_mass=_floats(table, "register_mass"),
        provenance=_provenance(facts, table),
    )


def layer_head_maps(wh: WarehouseHandle, image_id: str, model: str, method: str) -> LayerHeadMaps:
    info = wh.require_model(model)
    method = wh.require_method(info, method)
    image_id = wh.require_image_id(image_id)
    facts = wh.facts(model, method)
    path = wh.path("attention_maps", model=model, method=method)
    table = _query(wh, path, facts, _ALL_LAYERS, "layer, head NULLS FIRST", {"image_id": image_id})
    if table.num_rows == 0:
        raise wh.missing_image(image_id, model, method)
    layers_column = np.asarray(table["layer"])
    layers = tuple(int(v) for v in np.unique(layers_column))
    per_layer, names, prefix = [], [], []
    heads: tuple[int | None, ...] = ()
    for layer in layers:  # a dozen layers at most: one selection each, maps stay vectorised
        part = table.select(np.flatnonzero(layers_column == layer))
        layer_heads = part.optional_ints("head")
        if heads and layer_heads != heads:
            raise QueryError(f"{model}/{method}: image {image_id} has different heads in layer {layer}")
        heads = layer_heads
        per_layer.append(_grids(part))
        names.append(facts.layer_names.get(layer))
        prefix.append(_floats(part, "prefix_mass"))
    return LayerHeadMaps(
        image_id=image_id,
        model=model,
        method=method,
        layers=layers,
        layer_names=tuple(names),
        heads=heads,
        per_layer=tuple(per_layer),
        prefix_mass=np.stack(prefix),
        provenance=_provenance(facts, table),
    )


def layer_at_depth(layers: tuple[int, ...], depth: float) -> int:
    """The layer at relative depth ``depth`` in 0..1: index round(depth * (L - 1)), halves rounded up."""
    index = math.floor(depth * (len(layers) - 1) + 0.5)
    return layers[min(max(index, 0), len(layers) - 1)]


def compare_models(
    wh: WarehouseHandle,
    image_id: str,
    depth: float = 1.0,
    methods: dict[str, str] | None = None,
    models: list[str] | None = None,
) -> Comparison:
    """The fused map of one image in every model at a relative depth (0 = first layer, 1 = last).

    Per model the method is ``methods[model]`` if given, else the model's default (cls, else probe, else
    gradcam). Models that lack the image are listed in ``missing`` rather than failing the comparison.
    """
    if isinstance(depth, bool) or not isinstance(depth, int | float) or not 0.0 <= float(depth) <= 1.0:
        raise QueryError(f"depth must be a number in 0..1, got {depth!r}")
    image_id = wh.require_image_id(image_id)
    methods = dict(methods or {})
    wanted = models if models is not None else [m.slug for m in wh.models()]
    infos = [wh.require_model(m) for m in wanted]
    for slug in methods:
        if slug not in {i.slug for i in infos}:
            raise QueryError(f"methods names model {slug!r}, which is not compared ({format_list(wanted)})")
    if image_id not in wh.image_index():
        raise wh.missing_image(image_id, infos[0].slug if infos else "")
    entries, missing = [], {}
    for info in infos:
        method = wh.require_method(info, methods.get(info.slug, info.default_method))
        layers = wh.facts(info.slug, method).layers
        layer = layer_at_depth(layers, float(depth))
        try:
            found = attention_map(wh, image_id, info.slug, method, layer, None)
        except MissingDataError as exc:  # this model has not seen the image: show the others
            missing[info.slug] = str(exc)
            continue
        own_depth = layers.index(layer) / (len(layers) - 1) if len(layers) > 1 else 1.0
        entries.append(ComparedMap(info.slug, method, layer, own_depth, found))
    return Comparison(image_id=image_id, depth=float(depth), entries=tuple(entries), missing=missing)


def format_list(values: list[str]) -> str:
    return ", ".join(values) if values else "(none)"


def input_image(wh: WarehouseHandle, image_id: str, model: str) -> bytes:
    """The model's input image (after its own preprocessing), as JPEG bytes."""
    info = wh.require_model(model)
    image_id = wh.require_image_id(image_id)
    path = wh.path("inputs", model=info.slug)
    if not path.is_file():
        raise wh.missing_image(image_id, info.slug)
    rows = wh.read_dicts(path, _INPUT_SQL, {"image_id": image_id})
    if not rows:
        raise wh.missing_image(image_id, info.slug)
    return bytes(rows[0]["jpeg"])
