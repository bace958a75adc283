"""The query API the dashboard (and anyone in Python) uses: ``open_warehouse(...)`` and its methods."""

from __future__ import annotations

import os
from typing import Any

import duckdb
import pyarrow as pa

from ssl_attention.query import maps, statistics
from ssl_attention.query.connection import views_cursor
from ssl_attention.query.errors import QueryError
from ssl_attention.query.handle import WarehouseHandle, handle_for
from ssl_attention.query.results import (
    AttentionMap,
    Comparison,
    HeadGrid,
    ImageInfo,
    LayerHeadMaps,
    ModelInfo,
    StatGrid,
)
from ssl_attention.query.views import CatalogPathError


class Warehouse(WarehouseHandle):
    """Read-only queries over one warehouse root. Thread-safe; get it with ``open_warehouse``.

    Errors are ``QueryError`` (a ``ValueError``) with a message fit for a user: ``UnknownNameError`` names
    the valid values, ``MissingDataError`` says what to run, ``EmptyWarehouseError`` gives the fill command.
    """

    # --- what is there ----------------------------------------------------------------------------------

    def is_empty(self) -> bool:
        """True when no model has any attention maps."""
        return not self.models()

    def image_list(self) -> list[ImageInfo]:
        """Catalogued images (id, file name, size, thumbnail JPEG), ordered by file name."""
        return self.images()

    def model_list(self) -> list[ModelInfo]:
        """Models with maps in the warehouse, registry order."""
        return self.models()

    def model(self, model: str) -> ModelInfo:
        return self.require_model(model)

    def methods(self, model: str) -> tuple[str, ...]:
        return self.require_model(model).methods

    def layers(self, model: str, method: str) -> tuple[int, ...]:
        info = self.require_model(model)
        return self.facts(info.slug, self.require_method(info, method)).layers

    def heads(self, model: str, method: str) -> tuple[int, ...]:
        """Head indices 0..H-1 of a per-head method; () for rollout, gradcam and the CNN."""
        info = self.require_model(model)
        method = self.require_method(info, method)
        return tuple(range(info.num_heads)) if info.has_heads(method) else ()

    # --- maps ---------------------------------------------------------------------------------------------

    def map(self, image_id: str, model: str, method: str, layer: int, head: int | None = None) -> AttentionMap:
        """One map, (grid_h, grid_w) float32; ``head=None`` is the fused map."""
        return maps.attention_map(self, image_id, model, method, layer, head)

    def head_grid(self, image_id: str, model: str, method: str, layer: int) -> HeadGrid:
        """Fused + every head of one layer: ``maps`` (H+1, grid_h, grid_w), fused first."""
        return maps.head_grid(self, image_id, model, method, layer)

    def layer_head_maps(self, image_id: str, model: str, method: str) -> LayerHeadMaps:
        """All layers x (fused + heads): ``maps`` (L, H+1, grid_h, grid_w) (``per_layer`` for Grad-CAM)."""
        return maps.layer_head_maps(self, image_id, model, method)

    def compare_models(
        self,
        image_id: str,
        depth: float = 1.0,
        methods: dict[str, str] | None = None,
        models: list[str] | None = None,
    ) -> Comparison:
        """One image's fused map in every model at relative depth 0..1 (layer round(depth * (L-1)))."""
        return maps.compare_models(self, image_id, depth, methods, models)

    def input_image(self, image_id: str, model: str) -> bytes:
        """What the model saw (after its preprocessing), as JPEG bytes."""
        return maps.input_image(self, image_id, model)

    # --- statistics -------------------------------------------------------------------------------------

    def stat_grid(self, model: str, method: str, stat: str, image_id: str | None = None) -> StatGrid:
        """One statistic over layers x (fused + heads), of one image or averaged over all (None)."""
        return statistics.stat_grid(self, model, method, stat, image_id)

    def head_statistics(
        self, image_id: str, model: str, method: str, layer: int, head: int | None = None
    ) -> dict[str, float | None]:
        """All statistics of one map (see docs/sql.md for the formulas)."""
        return statistics.head_statistics(self, image_id, model, method, layer, head)

    # --- ad-hoc SQL ---------------------------------------------------------------------------------------

    def sql(self, query: str, params: dict[str, Any] | list[Any] | None = None) -> pa.Table:
        """Run ``query`` over this warehouse's views (``images``, ``attention_maps``, ``head_stats``,
        ``models``, ``inputs``, ``errors``, ``methods``, ``attention_cells``, ``map_cells(...)``; docs/sql.md)
        and return an Arrow table. Bind values as ``$name``/``?`` parameters, never by formatting them into
        the text. Unlike ``ssl-attention sql`` this is not sandboxed: it is for code you write yourself.
        """
        try:
            cur = views_cursor(self.root)
        except CatalogPathError as exc:
            raise QueryError(f"cannot make SQL views of this warehouse: {exc}") from None
        try:
            return cur.sql(query, params=params).to_arrow_table()
        except duckdb.Error as exc:
            raise QueryError(f"SQL failed: {str(exc).strip().splitlines()[0]}") from exc


def open_warehouse(location: str | os.PathLike[str] | None = None) -> Warehouse:
    """The process-wide ``Warehouse`` of ``location`` (``--warehouse`` value, else ``$SSL_ATTENTION_WAREHOUSE``,
    else ``data/warehouse``). A missing or empty warehouse opens fine and answers with empty lists."""
    return handle_for(location, Warehouse)
