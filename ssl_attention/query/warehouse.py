"""The query API: ``open_warehouse(...)`` and its ``Warehouse``, the one class users (and the dashboard) call.

Each query validates its arguments once (``_resolve``: model, method, head, layer, in that order, each error
naming the valid values), reads one partition file (``reads``: one whole file version, identity checked
around the read) and builds its result (``maps``, ``statistics``: reshaping only). Metadata (model rows,
partition facts, the image catalog) is cached per file version; map queries themselves are not cached here.
``sql`` runs over the SQL views instead (``views.py``).
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa

from ssl_attention.query import alignment, maps, statistics
from ssl_attention.query.alignment import HeadFeatureMatrix, RegionsInView, read_arrow
from ssl_attention.query.catalog import refresh_catalog
from ssl_attention.query.connection import views_cursor
from ssl_attention.query.errors import (
    EmptyWarehouseError,
    MissingDataError,
    QueryError,
    UnknownNameError,
    WarehouseLayoutError,
    fill_command,
    format_values,
)
from ssl_attention.query.maps import Rows
from ssl_attention.query.metadata import PartitionFacts, model_info, read_facts, read_images, read_model_row
from ssl_attention.query.reads import VersionCache, file_key, files_key, read_dicts, read_numpy
from ssl_attention.query.results import (
    AttentionMap,
    ComparedMap,
    Comparison,
    HeadGrid,
    ImageInfo,
    LayerHeadMaps,
    ModelInfo,
    StatGrid,
)
from ssl_attention.query.selection import (
    Selection,
    check_depth,
    check_head,
    check_layer,
    check_method,
    check_name,
    check_stat,
)
from ssl_attention.query.views import CatalogPathError
from ssl_attention.registry import MODELS
from ssl_attention.warehouse.paths import iter_partitions, partition_file, resolve_warehouse
from ssl_attention.warehouse.shards import LayoutError, layout_path, readable_shards, shard_of

_EVERY_LAYER = object()  # ``_resolve``'s default: no layer asked for


class Warehouse:
    """Read-only queries over one warehouse root. Thread-safe; get it with ``open_warehouse``.

    Errors are ``QueryError`` (a ``ValueError``) with a message fit for a user: ``UnknownNameError`` names
    the valid values, ``MissingDataError`` says what to run, ``EmptyWarehouseError`` gives the fill command,
    ``UnreadableFileError`` names a damaged file.
    """

    def __init__(self, root: Path) -> None:
        self.root = Path(root).resolve()
        self._cache = VersionCache()

    # --- what is there ----------------------------------------------------------------------------------

    def is_empty(self) -> bool:
        """True when no model has any attention maps."""
        return not self.models()

    def images(self) -> list[ImageInfo]:
        """Catalogued images (id, file name, size, thumbnail JPEG), ordered by file name."""
        path = self.path("images")
        key = file_key(path)
        if key is None:
            return []
        return self._cache.get(("images",), key, lambda: read_images(path))

    def image_index(self) -> dict[str, ImageInfo]:
        """``images()`` by image id."""
        key = file_key(self.path("images"))
        return self._cache.get(("image_index",), key, lambda: {i.image_id: i for i in self.images()})

    def models(self) -> list[ModelInfo]:
        """Models with maps in the warehouse, registry order."""
        infos = [self._model_info(slug) for slug in self._model_slugs()]
        return [info for info in infos if info is not None and info.methods]

    def model(self, model: object) -> ModelInfo:
        """One model with maps; an unknown one is an ``UnknownNameError`` naming the valid models."""
        check_name("model", model)
        info = self._model_info(model) if model in self._model_slugs() else None  # type: ignore[arg-type]
        if info is None or not info.methods:
            valid = [m.slug for m in self.models()]
            if not valid:
                raise EmptyWarehouseError(
                    f"the warehouse at {self.root} holds no attention maps yet; fill it with: {fill_command(self.root)}"
                )
            raise UnknownNameError(f"unknown model {model!r}; valid models: {format_values(valid)}")
        return info

    def methods(self, model: str) -> tuple[str, ...]:
        return self.model(model).methods

    def layers(self, model: str, method: str) -> tuple[int, ...]:
        return self._resolve(model, method).facts.layers

    def heads(self, model: str, method: str) -> tuple[int, ...]:
        """Head indices 0..H-1 of a per-head method; () for rollout, gradcam and the CNN."""
        sel = self._resolve(model, method)
        return tuple(range(sel.info.num_heads)) if sel.info.has_heads(sel.method) else ()

    def facts(self, model: str, method: str) -> PartitionFacts:
        """What the (model, method) maps partition holds: layers and their names, grids, heads, provenance."""
        return self._resolve(model, method).facts

    def path(self, table: str, **keys: str) -> Path:
        """The data file of one partition of this warehouse (``warehouse.paths.partition_file``); every key,
        ``shard`` included, must be given (``files`` lists a partition's shard files)."""
        return partition_file(self.root, table, **keys)

    def files(self, table: str, **keys: str) -> list[Path]:
        """The data files under the leading ``keys`` of ``table``: e.g. every image shard's file of one
        (model, method) of ``attention_maps``, in shard order."""
        if table in ("attention_maps", "head_stats", "inputs", "alignment"):
            self.shards()  # a pre-shard warehouse is refused, naming the migration
        return [p.path for p in iter_partitions(self.root, table, **keys)]

    def version(self, table: str, **keys: str) -> str:
        """The identity of every data file under ``keys`` (inode, mtime, size each), as one string: it changes
        whenever any of them is replaced, added or removed (a cache key for readers of a whole partition)."""
        return repr(files_key(self.files(table, **keys)))

    def shards(self) -> int:
        """The warehouse's image shard count (``layout.json``); a warehouse written before image shards raises
        ``WarehouseLayoutError`` naming the command that migrates it."""
        path = layout_path(self.root)
        try:
            return self._cache.get(("layout",), file_key(path), lambda: readable_shards(self.root))
        except LayoutError as exc:
            raise WarehouseLayoutError(str(exc)) from None

    def shard_file(self, table: str, image_id: str, **keys: str) -> Path:
        """The data file of ``table`` under ``keys`` that holds ``image_id``'s rows (its image shard's)."""
        return self.path(table, **keys, shard=shard_of(image_id, self.shards()))

    # --- maps ---------------------------------------------------------------------------------------------

    def map(self, image_id: str, model: str, method: str, layer: int, head: int | None = None) -> AttentionMap:
        """One map, (grid_h, grid_w) float32; ``head=None`` is the fused map."""
        sel = self._resolve(model, method, layer, head)
        image_id = check_name("image_id", image_id)
        if sel.head is None:
            rows = self._read_maps(sel, image_id, maps.ONE_FUSED, layer=sel.layer)
        else:
            rows = self._read_maps(sel, image_id, maps.ONE_HEAD, layer=sel.layer, head=sel.head)
        return maps.attention_map(sel, image_id, rows)

    def head_grid(self, image_id: str, model: str, method: str, layer: int) -> HeadGrid:
        """Fused + every head of one layer: ``maps`` (H+1, grid_h, grid_w), fused first."""
        sel = self._resolve(model, method, layer)
        image_id = check_name("image_id", image_id)
        rows = self._read_maps(sel, image_id, maps.ONE_LAYER, "head NULLS FIRST", layer=sel.layer)
        return maps.head_grid(sel, image_id, rows)

    def layer_head_maps(self, image_id: str, model: str, method: str) -> LayerHeadMaps:
        """All layers x (fused + heads): ``maps`` (L, H+1, grid_h, grid_w) (``per_layer`` for Grad-CAM)."""
        sel = self._resolve(model, method)
        image_id = check_name("image_id", image_id)
        rows = self._read_maps(sel, image_id, maps.ALL_LAYERS, "layer, head NULLS FIRST")
        return maps.layer_head_maps(sel, image_id, rows)

    def compare_models(
        self,
        image_id: str,
        depth: float = 1.0,
        methods: dict[str, str] | None = None,
        models: list[str] | None = None,
    ) -> Comparison:
        """One image's fused map in every model at relative depth 0..1 (layer round(depth * (L-1))).

        Per model the method is ``methods[model]`` if given, else the model's default (``ModelInfo.
        default_method``). Models that lack the image are listed in ``missing`` rather than failing.
        """
        depth = check_depth(depth)
        image_id = check_name("image_id", image_id)
        methods = dict(methods or {})
        wanted = models if models is not None else [m.slug for m in self.models()]
        infos = [self.model(m) for m in wanted]
        for slug in methods:
            if slug not in {i.slug for i in infos}:
                raise QueryError(f"methods names model {slug!r}, which is not compared ({format_values(wanted)})")
        if image_id not in self.image_index():
            raise self._missing_image(image_id, infos[0].slug if infos else "")
        entries, missing = [], {}
        for info in infos:
            sel = self._resolve(info.slug, methods.get(info.slug, info.default_method))
            layer = maps.layer_at_depth(sel.facts.layers, depth)
            try:
                found = self.map(image_id, info.slug, sel.method, layer)
            except MissingDataError as exc:  # this model has not seen the image: show the others
                missing[info.slug] = str(exc)
                continue
            own_depth = maps.relative_depth(sel.facts.layers, layer)
            entries.append(ComparedMap(info.slug, sel.method, layer, own_depth, found))
        return Comparison(image_id=image_id, depth=depth, entries=tuple(entries), missing=missing)

    def input_image(self, image_id: str, model: str) -> bytes:
        """What the model saw (after its preprocessing), as JPEG bytes."""
        info = self.model(model)
        image_id = check_name("image_id", image_id)
        path = self._shard_file_of("inputs", image_id, model=info.slug)
        rows = read_dicts(path, maps.INPUT_SQL, {"image_id": image_id}) if path.is_file() else []
        if not rows:
            raise self._missing_image(image_id, info.slug)
        return bytes(rows[0]["jpeg"])

    # --- statistics -------------------------------------------------------------------------------------

    def stat_grid(self, model: str, method: str, stat: str, image_id: str | None = None) -> StatGrid:
        """One statistic over layers x (fused + heads), of one image or averaged over all (None)."""
        sel = self._resolve(model, method)
        stat = check_stat(stat)
        files = self._stats_files(sel)
        if image_id is None:
            return statistics.stat_grid(sel, stat, None, read_numpy(files, statistics.stat_grid_sql(stat, False)))
        image_id = check_name("image_id", image_id)
        path = self._shard_file_of("head_stats", image_id, model=sel.model, method=sel.method)
        if not path.is_file():
            raise self._missing_image(image_id, sel.model, sel.method)
        result = read_numpy(path, statistics.stat_grid_sql(stat, True), {"image_id": image_id})
        if len(result["layer"]) == 0:
            raise self._missing_image(image_id, sel.model, sel.method)
        return statistics.stat_grid(sel, stat, image_id, result)

    def head_statistics(
        self, image_id: str, model: str, method: str, layer: int, head: int | None = None
    ) -> dict[str, float | None]:
        """All statistics of one map (``head=None``: the fused map; see docs/sql.md for the formulas)."""
        sel = self._resolve(model, method, layer, head)
        image_id = check_name("image_id", image_id)
        params: dict[str, object] = {"image_id": image_id, "layer": sel.layer}
        if sel.head is not None:
            params["head"] = sel.head
        self._stats_files(sel)  # none at all: say what to materialize
        path = self._shard_file_of("head_stats", image_id, model=sel.model, method=sel.method)
        rows = read_dicts(path, statistics.head_statistics_sql(sel.head is None), params) if path.is_file() else []
        if not rows:
            raise self._missing_image(image_id, sel.model, sel.method)
        return rows[0]

    # --- alignment with annotations ----------------------------------------------------------------------

    def alignment_features(self, model: str, method: str) -> tuple[str, ...]:
        """Features scored for (model, method): ``all`` and every annotated feature, sorted."""
        sel = self._resolve(model, method)
        return self._features(sel)

    def head_ranking(
        self, model: str, method: str, layer: int, metric: str = "iou_50", feature: str = "all"
    ) -> pa.Table:
        """Every head, the fused map and the two baselines of one layer, ranked by their mean ``metric`` over the
        annotated images for ``feature`` (best first): entry, n_images, mean, median, 95 % bootstrap CI, rank,
        head_rank (docs/sql.md, "Alignment")."""
        sel, metric, feature = self._resolve_alignment(model, method, layer, metric, feature)
        params = {"layer": sel.layer, "metric": metric, "feature": feature}
        return read_arrow(self._ranking_file(sel), alignment.RANKING_SQL, params)

    def head_feature_matrix(self, model: str, method: str, layer: int, metric: str = "iou_50") -> HeadFeatureMatrix:
        """Mean ``metric`` per entry (heads, fused, baselines) x feature of one layer."""
        sel, metric, _ = self._resolve_alignment(model, method, layer, metric, "all")
        rows = read_dicts(self._ranking_file(sel), alignment.MATRIX_SQL, {"layer": sel.layer, "metric": metric})
        return alignment.head_feature_matrix(sel.model, sel.method, int(sel.layer or 0), metric, rows)

    def exemplars(
        self,
        model: str,
        method: str,
        layer: int,
        head: int | None,
        feature: str = "all",
        metric: str = "iou_50",
        limit: int = 5,
    ) -> pa.Table:
        """The images where one map (``head=None``: the fused map) scores best on ``metric`` for ``feature``,
        best first: image_id, file_name, value, coverage, iou_50, area and visible fractions."""
        sel, metric, feature = self._resolve_alignment(model, method, layer, metric, feature, head)
        limit = alignment.check_limit(limit)
        params: dict[str, object] = {"layer": sel.layer, "feature": feature, "limit": limit}
        if sel.head is not None:
            params["head"] = sel.head
        files = self._alignment_files(sel)
        table = read_arrow(files, alignment.exemplars_sql(metric, sel.head is None), params)
        index = self.image_index()
        names = pa.array([index[i].file_name if i in index else None for i in table["image_id"].to_pylist()])
        return table.add_column(1, "file_name", names)

    def image_scores(self, image_id: str, model: str, method: str, layer: int, feature: str = "all") -> pa.Table:
        """One image's scores at one layer for ``feature``: the fused map, every head, then the two baselines
        (map_kind, head, every metric of ``METRIC_COLUMNS``, num_regions, area and visible fractions). Empty when
        the image has no regions of ``feature``; metrics are NULL when they all lie outside the view."""
        sel, _, feature = self._resolve_alignment(model, method, layer, "iou_50", feature)
        image_id = check_name("image_id", image_id)
        params = {"image_id": image_id, "layer": sel.layer, "feature": feature, "kinds": list(alignment.MAP_KINDS)}
        self._alignment_files(sel)  # none at all: say what to run
        path = self._shard_file_of("alignment", image_id, model=sel.model, method=sel.method)
        if not path.is_file():  # no image of this shard was scored: an empty table of the query's columns
            path = self._alignment_files(sel)[0]
            params["image_id"] = ""  # no image has an empty id
        table = read_arrow(path, alignment.IMAGE_SCORES_SQL, params)
        if table.num_rows == 0 and image_id not in self.image_index():
            raise self._missing_image(image_id, sel.model, sel.method)
        return table

    def annotated_images(self) -> dict[str, tuple[str, ...]]:
        """image id -> the features of its regions (sorted), for every image with regions; {} when the
        warehouse holds no annotations."""
        path = self.path("annotations")
        key = file_key(path)
        if key is None:
            return {}

        def load() -> dict[str, tuple[str, ...]]:
            features: dict[str, list[str]] = {}
            for row in read_dicts(path, alignment.ANNOTATED_SQL):
                features.setdefault(str(row["image_id"]), []).append(str(row["feature"]))
            return {image: tuple(names) for image, names in features.items()}

        return self._cache.get(("annotated_images",), key, load)

    def regions_in_view(self, image_id: str, model: str) -> RegionsInView:
        """The image's annotated regions in ``model``'s input frame (input pixels, y downwards; each box also
        clipped to the frame, with its visible fraction): where they lie on the model's maps. No regions for an
        image without annotations; a ``MissingDataError`` when the warehouse holds no annotations, or the image's
        input was stored without its transform (an older extraction)."""
        info = self.model(model)
        image_id = check_name("image_id", image_id)
        annotations = self.path("annotations")
        if not annotations.is_file():
            raise MissingDataError(
                f"the warehouse at {self.root} holds no annotations; add them with: "
                f"{fill_command(self.root)} --annotations FILE (COCO instances JSON or WikiChurches)"
            )
        inputs = self._shard_file_of("inputs", image_id, model=info.slug)
        rows = read_dicts(inputs, alignment.TRANSFORM_SQL, {"image_id": image_id}) if inputs.is_file() else []
        if not rows:
            raise self._missing_image(image_id, info.slug)
        transform = alignment.stored_transform(rows[0])
        if transform is None:
            raise MissingDataError(
                f"the {info.slug} input of image {image_id} was stored without its transform (an older extraction); "
                f"re-extract it: {fill_command(self.root)} --models {info.slug} --recompute"
            )
        regions = read_dicts(annotations, alignment.REGIONS_SQL, {"image_id": image_id})
        return alignment.regions_in_view(image_id, info.slug, transform, regions)

    def _resolve_alignment(
        self, model: object, method: object, layer: object, metric: object, feature: object, head: object = None
    ) -> tuple[Selection, str, str]:
        """``_resolve`` (model, method, head, layer), then the metric and the feature, in that order."""
        sel = self._resolve(model, method, layer, head)
        metric = alignment.check_metric(metric)
        feature = alignment.check_feature(feature, self._features(sel), f"{sel.model}/{sel.method}")
        return sel, metric, feature

    def _features(self, sel: Selection) -> tuple[str, ...]:
        path = self._ranking_file(sel)
        key = file_key(path)
        rows = self._cache.get(
            ("features", sel.model, sel.method), key, lambda: read_dicts(path, alignment.FEATURES_SQL)
        )
        return tuple(str(r["feature"]) for r in rows)

    def _alignment_files(self, sel: Selection) -> list[Path]:
        """The alignment files of every image shard of (model, method); none is a ``MissingDataError``."""
        files = self.files("alignment", model=sel.model, method=sel.method)
        if not files:
            raise MissingDataError(
                f"no alignment for {sel.model}/{sel.method} yet; run with annotations: "
                f"{fill_command(self.root)} --models {sel.model} --annotations FILE"
            )
        return files

    def _ranking_file(self, sel: Selection) -> Path:
        self._alignment_files(sel)
        path = self.path("head_ranking", model=sel.model, method=sel.method)
        if not path.is_file():
            raise MissingDataError(
                f"no head ranking for {sel.model}/{sel.method} yet; materialize the alignment asset for {sel.model}"
            )
        return path

    # --- ad-hoc SQL ---------------------------------------------------------------------------------------

    def sql(self, query: str, params: dict[str, Any] | list[Any] | None = None) -> pa.Table:
        """Run ``query`` over this warehouse's views (``images``, ``attention_maps``, ``head_stats``,
        ``models``, ``inputs``, ``errors``, ``annotations``, ``alignment``, ``head_ranking``, ``methods``,
        ``attention_cells``, ``head_feature_matrix``, ``exemplars``, ``map_cells(...)``; docs/sql.md)
        and return an Arrow table. Bind values as ``$name``/``?`` parameters, never by formatting them into
        the text. Unlike ``ssl-attention sql`` this is not sandboxed: it is for code you write yourself.
        """
        self.shards()  # a pre-shard warehouse: the error names the migration command
        try:
            cur = views_cursor(self.root)
        except CatalogPathError as exc:
            raise QueryError(f"cannot make SQL views of this warehouse: {exc}") from None
        try:
            return cur.sql(query, params=params).to_arrow_table()
        except duckdb.Error as exc:
            raise QueryError(f"SQL failed: {str(exc).strip().splitlines()[0]}") from exc

    # --- metadata, validation and reads -------------------------------------------------------------------

    def _model_slugs(self) -> list[str]:
        """Models with a models row, registry order first."""
        found = {p.keys["model"] for p in iter_partitions(self.root, "models")}
        return [m for m in MODELS if m in found] + sorted(found - set(MODELS))

    def _model_info(self, slug: str) -> ModelInfo | None:
        path = self.path("models", model=slug)
        key = file_key(path)
        if key is None:
            return None
        row = self._cache.get(("model_row", slug), key, lambda: read_model_row(path))
        if row is None:
            return None
        available = tuple(m for m in row["methods"] if self.files("attention_maps", model=slug, method=m))
        return model_info(slug, row, available)

    def _facts(self, model: str, method: str) -> tuple[PartitionFacts, tuple[Path, ...]]:
        """The facts of (model, method)'s maps over every image shard, and the shard files they were read from."""
        files = tuple(self.files("attention_maps", model=model, method=method))
        key = files_key(files)
        if key is None:
            raise MissingDataError(f"no {model}/{method} maps in the warehouse at {self.root}")
        return self._cache.get(("facts", model, method), key, lambda: read_facts(list(files))), files

    def _resolve(self, model: object, method: object, layer: object = _EVERY_LAYER, head: object = None) -> Selection:
        """The one validation of (model, method[, layer][, head]) every query goes through, in that order of
        checks: model, method, head, layer. ``head=None`` is the fused map; a layer not given is every layer."""
        info = self.model(model)
        method = check_method(info, method)
        head = check_head(info, method, head)
        facts, files = self._facts(info.slug, method)
        index = None if layer is _EVERY_LAYER else check_layer(info, method, facts, layer)
        return Selection(info, method, facts, files, index, head)

    def _shard_file_of(self, table: str, image_id: str, **keys: str) -> Path:
        """``shard_file``, with an id that is not a hex digest reported as an unknown image."""
        try:
            return self.shard_file(table, image_id, **keys)
        except WarehouseLayoutError:
            raise
        except ValueError:
            raise self._missing_image(image_id, keys.get("model", ""), keys.get("method")) from None

    def _read_maps(self, sel: Selection, image_id: str, where: str, order: str = "", **params: object) -> Rows:
        """The selection's map rows of one image (``where``: one of ``maps``' filters), read from the image's
        shard file only; none is an error."""
        path = self._shard_file_of("attention_maps", image_id, model=sel.model, method=sel.method)
        if not path.is_file():
            raise self._missing_image(image_id, sel.model, sel.method)
        rows = Rows(read_numpy(path, maps.map_sql(sel.facts, where, order), {"image_id": image_id, **params}))
        if rows.num_rows == 0:
            raise self._missing_image(image_id, sel.model, sel.method)
        return rows

    def _stats_files(self, sel: Selection) -> list[Path]:
        files = self.files("head_stats", model=sel.model, method=sel.method)
        if not files:
            raise MissingDataError(
                f"no head statistics for {sel.model}/{sel.method} yet; materialize the head_stats asset "
                f"(or call ssl_attention.stats.write_head_stats) for {sel.model}"
            )
        return files

    def _missing_image(self, image_id: str, model: str, method: str | None = None) -> QueryError:
        """The error for an image that returned no rows: unknown, or known but not extracted here."""
        index = self.image_index()
        if image_id not in index:
            shown = [f"{i.image_id} ({i.file_name})" for i in list(index.values())[:5]]
            more = f", … ({len(index)} images; list them with images())" if len(index) > 5 else ""
            valid = ", ".join(shown) if shown else "(none: the images table is empty)"
            return UnknownNameError(f"unknown image {image_id!r}; valid images: {valid}{more}")
        where = f"{model}/{method}" if method else model
        return MissingDataError(
            f"image {image_id} ({index[image_id].file_name}) has no {where} data yet; "
            f"run the extraction for {model}: {fill_command(self.root)} --models {model}"
        )


_warehouses: dict[Path, Warehouse] = {}
_warehouses_lock = threading.Lock()


def open_warehouse(location: str | os.PathLike[str] | None = None) -> Warehouse:
    """The process-wide ``Warehouse`` of ``location`` (``--warehouse`` value, else ``$SSL_ATTENTION_WAREHOUSE``,
    else ``data/warehouse``). A missing or empty warehouse opens fine and answers with empty lists.

    The first open in a process also rewrites the warehouse's ``attention.duckdb`` if it is stale (written by
    an older version, with absolute paths into where the warehouse was then: ``catalog.refresh_catalog``)."""
    root = resolve_warehouse(location)
    with _warehouses_lock:
        warehouse = _warehouses.get(root)
        if warehouse is None:
            refresh_catalog(root)
            warehouse = _warehouses[root] = Warehouse(root)
    warehouse.shards()  # a warehouse written before image shards: the error names the migration command
    return warehouse
