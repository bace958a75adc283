"""DuckDB query layer over the Parquet warehouse (the dashboard reads only through this package).

    from ssl_attention.query import open_warehouse
    wh = open_warehouse("data/warehouse")
    grid = wh.head_grid(image_id, "dinov2", "cls", layer=11)   # grid.maps: (13, 16, 16) float32, fused first

    wh.sql("SELECT model, avg(entropy) FROM head_stats WHERE layer = $layer GROUP BY model", {"layer": 0})

``Warehouse`` (``warehouse.py``) is the one class to call. Its map and statistics methods read partition files
directly (one image's rows: the file of its image shard; an aggregate: every shard file of the validated model
and method); ``wh.sql`` and SQL users get the tables as
DuckDB views: on the process connection, ``ssl-attention sql`` or the ``attention.duckdb`` catalog file
(``write_catalog``); see docs/sql.md.

Modules: ``warehouse`` (the API), ``selection`` (argument checks), ``reads`` (whole-version file reads),
``metadata`` (model rows, partition facts, catalog), ``maps`` and ``statistics`` (SQL and result building),
``results`` (the returned dataclasses), ``views``/``connection``/``catalog`` (SQL views), ``errors``.
"""

from ssl_attention.query.catalog import client_command, open_catalog, refresh_catalog, write_catalog
from ssl_attention.query.connection import connection, cursor
from ssl_attention.query.errors import (
    EmptyWarehouseError,
    MissingDataError,
    QueryError,
    UnknownNameError,
    UnreadableFileError,
    WarehouseLayoutError,
)
from ssl_attention.query.maps import layer_at_depth
from ssl_attention.query.results import (
    AttentionMap,
    ComparedMap,
    Comparison,
    HeadGrid,
    ImageInfo,
    LayerHeadMaps,
    ModelInfo,
    StatGrid,
    StoredProvenance,
)
from ssl_attention.query.warehouse import Warehouse, open_warehouse
from ssl_attention.stats import STATISTICS

__all__ = [
    "STATISTICS",
    "AttentionMap",
    "ComparedMap",
    "Comparison",
    "EmptyWarehouseError",
    "HeadGrid",
    "ImageInfo",
    "LayerHeadMaps",
    "MissingDataError",
    "ModelInfo",
    "QueryError",
    "StatGrid",
    "StoredProvenance",
    "UnknownNameError",
    "UnreadableFileError",
    "Warehouse",
    "WarehouseLayoutError",
    "client_command",
    "connection",
    "cursor",
    "layer_at_depth",
    "open_catalog",
    "open_warehouse",
    "refresh_catalog",
    "write_catalog",
]
