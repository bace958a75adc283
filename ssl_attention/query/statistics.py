"""Queries over the ``head_stats`` table: one statistic as a layers x heads grid, one map's statistics."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ssl_attention.query.errors import MissingDataError, UnknownNameError, format_values
from ssl_attention.query.results import StatGrid
from ssl_attention.query.views import quote_ident
from ssl_attention.stats import STATISTICS

if TYPE_CHECKING:
    from ssl_attention.query.handle import WarehouseHandle


def require_stat(stat: object) -> str:
    if stat not in STATISTICS:
        raise UnknownNameError(f"unknown statistic {stat!r}; valid statistics: {format_values(STATISTICS, 20)}")
    return stat  # type: ignore[return-value]


def _stats_path(wh: WarehouseHandle, model: str, method: str) -> Path:
    path = wh.path("head_stats", model=model, method=method)
    if not path.is_file():
        raise MissingDataError(
            f"no head statistics for {model}/{method} yet; materialize the head_stats asset "
            f"(or call ssl_attention.stats.write_head_stats) for {model}"
        )
    return path


def stat_grid(wh: WarehouseHandle, model: str, method: str, stat: str, image_id: str | None = None) -> StatGrid:
    """``stat`` for every layer x (fused + heads): of ``image_id``, or the mean over all images (None)."""
    info = wh.require_model(model)
    method = wh.require_method(info, method)
    column = quote_ident(require_stat(stat))  # an identifier from the fixed whitelist, never user text
    path = _stats_path(wh, model, method)
    if image_id is None:
        sql = f"""SELECT layer, head, avg({column}) AS value, count({column}) AS n
FROM read_parquet($path) GROUP BY layer, head"""
        params: dict[str, object] = {}
    else:
        image_id = wh.require_image_id(image_id)
        sql = f"""SELECT layer, head, {column} AS value, CAST({column} IS NOT NULL AS BIGINT) AS n
FROM read_parquet($path) WHERE image_id = $image_id"""
        params = {"image_id": image_id}
    result = wh.read_numpy(path, sql, params)
    if image_id is not None and len(result["layer"]) == 0:
        raise wh.missing_image(image_id, model, method)
    facts = wh.facts(model, method)
    layers = facts.layers
    heads: tuple[int | None, ...] = (None, *facts.heads)
    values = np.full((len(layers), len(heads)), np.nan)
    counts = np.zeros((len(layers), len(heads)), dtype=np.int64)
    layer_pos = {layer: i for i, layer in enumerate(layers)}
    head_pos = {head: i for i, head in enumerate(heads)}
    head_column = result["head"]
    head_mask = np.ma.getmaskarray(head_column)
    for layer, head, masked, value, n in zip(  # (L x (H+1)) cells: small, no per-map work
        result["layer"].tolist(),
        np.ma.getdata(head_column).tolist(),
        head_mask.tolist(),
        np.ma.filled(result["value"].astype(np.float64), np.nan).tolist(),
        np.ma.filled(result["n"], 0).tolist(),
        strict=True,
    ):
        key = None if masked else int(head)
        if layer in layer_pos and key in head_pos:
            values[layer_pos[layer], head_pos[key]] = value
            counts[layer_pos[layer], head_pos[key]] = n
    return StatGrid(model, method, stat, image_id, layers, heads, values, counts)


def head_statistics(
    wh: WarehouseHandle, image_id: str, model: str, method: str, layer: int, head: int | None = None
) -> dict[str, float | None]:
    """Every statistic of one map (``head=None``: the fused map), NULLs as None."""
    info = wh.require_model(model)
    method = wh.require_method(info, method)
    head = wh.require_head(info, method, head)
    layer = wh.require_layer(info, method, layer)
    image_id = wh.require_image_id(image_id)
    columns = ", ".join(quote_ident(name) for name in STATISTICS)
    condition = "head IS NULL" if head is None else "head = $head"
    sql = f"SELECT {columns} FROM read_parquet($path) WHERE image_id = $image_id AND layer = $layer AND {condition}"
    params: dict[str, object] = {"image_id": image_id, "layer": layer}
    if head is not None:
        params["head"] = head
    rows = wh.read_dicts(_stats_path(wh, model, method), sql, params)
    if not rows:
        raise wh.missing_image(image_id, model, method)
    return rows[0]
