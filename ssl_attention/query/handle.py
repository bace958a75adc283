"""A warehouse as the query layer sees it: reads of its partition files, cached metadata and the validation
of user input.

Every query reads one partition file directly (``read_parquet($path)``, the path built from validated names),
not the SQL views: naming the file is the partition pruning, and the read can check that file's identity
around the query. The views (``views.py``) are for SQL: ``Warehouse.sql`` (on the process connection), the
``ssl-attention sql`` shell and the ``attention.duckdb`` catalog file.

Metadata (model rows, the layers/heads/grids of a partition, the image catalog) is cached per file version:
each lookup ``stat``s the file and re-reads it only when its (inode, mtime, size) changed, which an atomic
replacement always changes. Map queries themselves are not cached here.
"""

from __future__ import annotations

import operator
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import duckdb

from ssl_attention.query import connection
from ssl_attention.query.errors import (
    EmptyWarehouseError,
    MissingDataError,
    QueryError,
    UnknownNameError,
    UnreadableFileError,
    fill_command,
    first_line,
    format_values,
)
from ssl_attention.query.results import ImageInfo, ModelInfo, StoredProvenance
from ssl_attention.registry import MODELS
from ssl_attention.warehouse.paths import DATA_FILE, partition_file, resolve_warehouse

T = TypeVar("T")
FileKey = tuple[int, int, int] | None

_FACTS_SQL = """
SELECT layer, any_value(layer_name) AS layer_name, min(grid_h) AS grid_h, min(grid_w) AS grid_w,
    max(grid_h) <> min(grid_h) OR max(grid_w) <> min(grid_w) AS mixed_grid,
    list(DISTINCT head ORDER BY head) FILTER (WHERE head IS NOT NULL) AS heads,
    bool_or(raw_scale IS NOT NULL OR target_class IS NOT NULL) AS gradcam
FROM read_parquet($path)
GROUP BY layer
ORDER BY layer
"""

_PROVENANCE_SQL = """
SELECT DISTINCT weights_mode AS mode, weights_source AS source, weights_revision AS revision,
    weights_seed AS seed, weights_id
FROM read_parquet($path)
"""

_MODEL_SQL = """
SELECT label, family, num_layers, num_heads, num_registers, has_cls, patch_size, input_h, input_w,
    methods, per_head_methods, layer_names,
    weights_mode, weights_source, weights_revision, weights_seed, weights_id
FROM read_parquet($path)
LIMIT 1
"""

_IMAGES_SQL = """
SELECT image_id, file_name, width, height, format, thumbnail
FROM read_parquet($path)
ORDER BY file_name, image_id
"""


def file_key(path: Path) -> FileKey:
    """Identity of one version of a file; None when it does not exist."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_mtime_ns, st.st_size


@dataclass(frozen=True)
class PartitionFacts:
    """What one attention_maps partition holds, independent of the image."""

    layers: tuple[int, ...]
    layer_names: dict[int, str | None]
    grids: dict[int, tuple[int, int]]
    heads: tuple[int, ...]  # head indices present (empty for fused-only methods)
    provenances: dict[str, StoredProvenance]  # weights_id -> provenance (one entry in a consistent partition)
    has_gradcam_columns: bool = False  # raw_scale / target_class hold values (Grad-CAM)

    @property
    def single_provenance(self) -> StoredProvenance | None:
        return next(iter(self.provenances.values())) if len(self.provenances) == 1 else None


READ_ATTEMPTS = 5


def _check_name(kind: str, value: object) -> str:
    if not isinstance(value, str) or not value:
        raise QueryError(f"{kind} must be a non-empty string, got {value!r}")
    return value


def as_index(kind: str, value: object) -> int:
    """An integer argument (numpy integers welcome, bools and floats refused)."""
    if isinstance(value, bool):
        raise QueryError(f"{kind} must be an integer, got {value!r}")
    try:
        return operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        raise QueryError(f"{kind} must be an integer, got {value!r}") from None


class WarehouseHandle:
    """Partition reads, cached metadata and validation for one warehouse root."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root).resolve()
        self._cache: dict[tuple[str, ...], tuple[object, Any]] = {}

    # --- plumbing -------------------------------------------------------------------------------------

    def cursor(self) -> duckdb.DuckDBPyConnection:
        return connection.cursor()

    def read(self, path: Path, sql: str, params: dict[str, Any], fetch: Callable[[Any], T]) -> T:
        """Run ``sql`` (with ``$path`` bound to ``path``) and ``fetch`` its result, on one file version.

        DuckDB may open a file more than once in a query (parallel scans, DISTINCT over dictionaries), so a
        query that overlaps an atomic replacement can fail ("TProtocolException: Invalid data") or, in
        principle, mix versions. The file's (inode, mtime, size) is taken before and after: if it changed,
        the query is run again; if not, every open saw the same version and the result is whole.

        A file that fails to read without being replaced (corrupt, truncated, wrong schema, no permission)
        raises ``UnreadableFileError`` naming the file and the first line of DuckDB's message.
        """
        for _ in range(READ_ATTEMPTS):
            before = file_key(path)
            if before is None:
                raise MissingDataError(f"{path} is not in the warehouse (any more); refresh and retry")
            try:
                result = fetch(self.cursor().execute(sql, {**params, "path": str(path)}))
            except duckdb.Error as exc:
                if file_key(path) != before:
                    continue  # replaced while we read: read the new version
                raise UnreadableFileError(f"cannot read {path}: {first_line(exc)}") from exc
            if file_key(path) == before:
                return result
        raise QueryError(f"{path} was rewritten {READ_ATTEMPTS} times while being read; try again")

    def read_dicts(self, path: Path, sql: str, params: dict[str, Any] | None = None) -> list[dict[str, Any]]:
        def fetch(cur: duckdb.DuckDBPyConnection) -> list[dict[str, Any]]:
            names = [d[0] for d in cur.description]
            return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]

        return self.read(path, sql, params or {}, fetch)

    def read_numpy(self, path: Path, sql: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
        return self.read(path, sql, params or {}, lambda cur: cur.fetchnumpy())

    def path(self, table: str, **keys: str) -> Path:
        return partition_file(self.root, table, **keys)

    def cached(self, key: tuple[str, ...], version: object, load: Callable[[], T]) -> T:
        hit = self._cache.get(key)
        if hit is not None and hit[0] == version:
            return hit[1]
        value = load()
        self._cache[key] = (version, value)
        return value

    # --- metadata -------------------------------------------------------------------------------------

    def model_slugs(self) -> list[str]:
        """Models with a models row, registry order first."""
        base = self.root / "models"
        found = {p.parent.name.split("=", 1)[1] for p in base.glob(f"model=*/{DATA_FILE}")} if base.is_dir() else set()
        return [m for m in MODELS if m in found] + sorted(found - set(MODELS))

    def model_info(self, slug: str) -> ModelInfo | None:
        path = self.path("models", model=slug)
        key = file_key(path)
        if key is None:
            return None
        row = self.cached(("model_row", slug), key, lambda: self._read_model_row(path))
        if row is None:
            return None
        available = tuple(m for m in row["methods"] if self.path("attention_maps", model=slug, method=m).is_file())
        spec = MODELS.get(slug)
        return ModelInfo(
            slug=slug,
            label=row["label"],
            family=row["family"],
            num_layers=int(row["num_layers"]),
            num_heads=int(row["num_heads"]),
            num_registers=int(row["num_registers"]),
            has_cls=bool(row["has_cls"]),
            patch_size=row["patch_size"],
            input_h=int(row["input_h"]),
            input_w=int(row["input_w"]),
            methods=available,
            per_head_methods=tuple(m for m in row["per_head_methods"] if m in available),
            layer_names=tuple(row["layer_names"]),
            provenance=StoredProvenance(
                row["weights_mode"],
                row["weights_source"],
                row["weights_revision"],
                row["weights_seed"],
                row["weights_id"],
            ),
            default_weights=spec.default_weights if spec else None,
            notes=spec.notes if spec else None,
        )

    def _read_model_row(self, path: Path) -> dict[str, Any] | None:
        rows = self.read_dicts(path, _MODEL_SQL)
        return rows[0] if rows else None

    def models(self) -> list[ModelInfo]:
        infos = [self.model_info(slug) for slug in self.model_slugs()]
        return [info for info in infos if info is not None and info.methods]

    def facts(self, model: str, method: str) -> PartitionFacts:
        path = self.path("attention_maps", model=model, method=method)
        key = file_key(path)
        if key is None:
            raise MissingDataError(f"no {model}/{method} maps in the warehouse at {self.root}")
        return self.cached(("facts", model, method), key, lambda: self._read_facts(path))

    def _read_facts(self, path: Path) -> PartitionFacts:
        rows = self.read_dicts(path, _FACTS_SQL)
        provenances = [StoredProvenance(**row) for row in self.read_dicts(path, _PROVENANCE_SQL)]
        heads = sorted({h for r in rows for h in (r["heads"] or [])})
        return PartitionFacts(
            layers=tuple(int(r["layer"]) for r in rows),
            layer_names={int(r["layer"]): r["layer_name"] for r in rows},
            grids={int(r["layer"]): (int(r["grid_h"]), int(r["grid_w"])) for r in rows},
            heads=tuple(int(h) for h in heads),
            provenances={p.weights_id: p for p in provenances},
            has_gradcam_columns=any(bool(r["gradcam"]) for r in rows),
        )

    def images(self) -> list[ImageInfo]:
        path = self.path("images")
        key = file_key(path)
        if key is None:
            return []
        return self.cached(("images",), key, lambda: self._read_images(path))

    def _read_images(self, path: Path) -> list[ImageInfo]:
        rows = self.read_dicts(path, _IMAGES_SQL)
        return [ImageInfo(**row) for row in rows]

    def image_index(self) -> dict[str, ImageInfo]:
        path = self.path("images")
        return self.cached(("image_index",), file_key(path), lambda: {i.image_id: i for i in self.images()})

    # --- validation -----------------------------------------------------------------------------------

    def require_model(self, model: object) -> ModelInfo:
        _check_name("model", model)
        slugs = self.model_slugs()
        info = self.model_info(model) if model in slugs else None  # type: ignore[arg-type]
        if info is None or not info.methods:
            valid = [m.slug for m in self.models()]
            if not valid:
                raise EmptyWarehouseError(
                    f"the warehouse at {self.root} holds no attention maps yet; fill it with: {fill_command(self.root)}"
                )
            raise UnknownNameError(f"unknown model {model!r}; valid models: {format_values(valid)}")
        return info

    def require_method(self, info: ModelInfo, method: object) -> str:
        _check_name("method", method)
        if method not in info.methods:
            raise UnknownNameError(
                f"method {method!r} is not available for {info.slug}; valid methods: {format_values(info.methods)}"
            )
        return method  # type: ignore[return-value]

    def require_layer(self, info: ModelInfo, method: str, layer: object) -> int:
        index = as_index("layer", layer)
        facts = self.facts(info.slug, method)
        if index not in facts.layers:
            raise UnknownNameError(
                f"layer {index} is not available for {info.slug}/{method}; valid layers: {format_values(facts.layers)}"
            )
        return index

    def require_head(self, info: ModelInfo, method: str, head: object) -> int | None:
        if head is None:
            return None
        index = as_index("head", head)
        if not info.has_heads(method):
            if info.num_heads == 0:
                why = f"{info.slug} is a CNN without attention heads"
            else:
                why = f"{method} is a fused-only method (per-head methods of {info.slug}: "
                why += f"{format_values(info.per_head_methods)})"
            raise QueryError(f"head {index} is not valid: {why}; use head=None for the fused map")
        if not 0 <= index < info.num_heads:
            raise UnknownNameError(
                f"head {index} is out of range for {info.slug} ({info.num_heads} heads); "
                f"valid heads: {format_values(range(info.num_heads))}, or None for the fused map"
            )
        return index

    def require_image_id(self, image_id: object) -> str:
        return _check_name("image_id", image_id)

    def missing_image(self, image_id: str, model: str, method: str | None = None) -> QueryError:
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


_handles: dict[Path, Any] = {}
_handles_lock = threading.Lock()


def handle_for(location: str | os.PathLike[str] | None, factory: Callable[[Path], T]) -> T:
    """The process-wide handle of a warehouse root (``--warehouse``/env/default resolution)."""
    root = resolve_warehouse(location)
    with _handles_lock:
        handle = _handles.get(root)
        if handle is None or type(handle) is not factory:
            handle = factory(root)
            _handles[root] = handle
    return handle
