"""Queries over the ``head_stats`` table: one statistic as a layers x heads grid, one map's statistics.

The SQL is built here from the fixed whitelist ``STATISTICS`` (identifiers, never user text) and run by
``Warehouse`` on the validated model's ``head_stats`` file; ``stat_grid`` only places the rows in the grid.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ssl_attention.query.results import StatGrid
from ssl_attention.query.selection import Selection
from ssl_attention.query.views import quote_ident
from ssl_attention.stats import STATISTICS


def stat_grid_sql(stat: str, one_image: bool) -> str:
    """``layer, head, value, n`` of a whitelisted ``stat``: of ``$image_id``, or averaged over all images."""
    column = quote_ident(stat)
    if one_image:
        return f"""SELECT layer, head, {column} AS value, CAST({column} IS NOT NULL AS BIGINT) AS n
FROM read_parquet($path) WHERE image_id = $image_id"""
    return f"""SELECT layer, head, avg({column}) AS value, count({column}) AS n
FROM read_parquet($path) GROUP BY layer, head"""


def head_statistics_sql(fused: bool) -> str:
    """Every statistic of one map: ``$image_id``, ``$layer`` and (unless ``fused``) ``$head``."""
    columns = ", ".join(quote_ident(name) for name in STATISTICS)
    condition = "head IS NULL" if fused else "head = $head"
    return f"SELECT {columns} FROM read_parquet($path) WHERE image_id = $image_id AND layer = $layer AND {condition}"


def stat_grid(sel: Selection, stat: str, image_id: str | None, result: dict[str, Any]) -> StatGrid:
    """Place ``stat_grid_sql``'s rows in a (layers, fused + heads) grid; NaN and count 0 where none."""
    layers = sel.facts.layers
    heads: tuple[int | None, ...] = (None, *sel.facts.heads)
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
    return StatGrid(sel.model, sel.method, stat, image_id, layers, heads, values, counts)
