"""DDL of the SQL views over the warehouse, shared by the SQL shell's connection and the catalog file.

The Python query API does not use them: it reads each partition file directly (``handle.py``).

Every identifier here comes from fixed tuples in this module or the warehouse schema; the only literals are
the warehouse's own absolute path and the model registry's constants, quoted by ``quote_literal``. A table
with no files yet gets an empty view with the same columns and types, so queries over an empty or partial
warehouse return no rows instead of failing.
"""

from __future__ import annotations

import functools
from pathlib import Path

import duckdb

from ssl_attention.registry import METHODS, MODELS
from ssl_attention.warehouse import schema
from ssl_attention.warehouse.paths import PARTITION_DEPTH, table_glob

TABLES = ("images", "attention_maps", "head_stats", "models", "inputs", "errors")
"""The warehouse tables exposed as views of the same name."""

DERIVED_VIEWS = ("methods", "attention_cells")
MACROS = ("map_cells",)

PARTITION_KEYS: dict[str, tuple[str, ...]] = {
    "attention_maps": ("model", "method"),
    "head_stats": ("model", "method"),
    "inputs": ("model",),
    "models": ("model",),
    "images": (),
    "errors": ("source",),
}

_GLOB_CHARACTERS = set("*?[]{}")


class CatalogPathError(ValueError):
    pass


def quote_literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


@functools.cache
def duckdb_types(table: str) -> tuple[tuple[str, str], ...]:
    """(column, DuckDB type) of a warehouse table's file columns, as DuckDB reads its Arrow schema."""
    relation = duckdb.connect(":memory:").from_arrow(schema.SCHEMAS[table].empty_table())
    return tuple((name, str(kind)) for name, kind in zip(relation.columns, relation.types, strict=True))


def has_files(root: Path, table: str) -> bool:
    depth = PARTITION_DEPTH[table]
    base = Path(root) / table
    if depth == 0:
        return (base / "data.parquet").is_file()
    return next(iter(base.glob("/".join(["*"] * depth) + "/data.parquet")), None) is not None


def _source(root: Path, table: str, present: bool) -> str:
    """A FROM-able source with the partition keys first, then the file columns."""
    keys = PARTITION_KEYS[table]
    columns = duckdb_types(table)
    if not present:
        casts = [f"CAST(NULL AS VARCHAR) AS {quote_ident(k)}" for k in keys]
        casts += [f"CAST(NULL AS {kind}) AS {quote_ident(name)}" for name, kind in columns]
        return f"(SELECT {', '.join(casts)} LIMIT 0)"
    root_text = str(root)
    if _GLOB_CHARACTERS & set(root_text):
        raise CatalogPathError(
            f"the warehouse path {root_text!r} contains glob characters ({''.join(_GLOB_CHARACTERS)})"
        )
    glob = quote_literal(table_glob(root, table, PARTITION_DEPTH[table]))
    if keys:
        types = ", ".join(f"{quote_literal(k)}: 'VARCHAR'" for k in keys)
        reader = f"read_parquet({glob}, hive_partitioning = true, hive_types = {{{types}}})"
    else:
        reader = f"read_parquet({glob}, hive_partitioning = false)"
    projection = ", ".join(quote_ident(name) for name in (*keys, *(c for c, _ in columns)))
    return f"(SELECT {projection} FROM {reader})"


def _registry_models() -> str:
    rows = ", ".join(
        f"({quote_literal(m.slug)}, {quote_literal(m.default_weights)}, {quote_literal(m.notes)})"
        for m in MODELS.values()
    )
    return f"(VALUES {rows}) AS registry(model, default_weights, notes)"


def _methods_view() -> str:
    rows = ", ".join(
        f"({quote_literal(m.name)}, {'true' if m.per_head else 'false'}, {quote_literal(m.label)}, "
        f"{quote_literal(m.glossary)})"
        for m in METHODS.values()
    )
    return f"SELECT * FROM (VALUES {rows}) AS methods(method, per_head, label, description)"


def _models_view(source: str) -> str:
    return f"""SELECT m.model, m.label, m.family, m.num_layers, m.num_heads, m.num_registers, m.has_cls,
    m.patch_size, m.input_h, m.input_w,
    CASE WHEN m.patch_size > 0 THEN CAST(m.input_h // m.patch_size AS SMALLINT) END AS grid_h,
    CASE WHEN m.patch_size > 0 THEN CAST(m.input_w // m.patch_size AS SMALLINT) END AS grid_w,
    m.methods, m.per_head_methods, m.layer_names, registry.default_weights, registry.notes,
    m.weights_mode, m.weights_source, m.weights_revision, m.weights_seed, m.weights_id, m.extracted_at
FROM {source} AS m LEFT JOIN {_registry_models()} USING (model)"""


def view_statements(root: Path, present: dict[str, bool]) -> list[str]:
    """CREATE OR REPLACE statements for every view and macro, in dependency order; ``present`` says which
    tables have files (the others get empty typed views)."""
    root = Path(root).resolve()
    statements = []
    for table in TABLES:
        source = _source(root, table, present[table])
        body = _models_view(source) if table == "models" else f"SELECT * FROM {source}"
        statements.append(f"CREATE OR REPLACE VIEW {table} AS {body}")
    statements.append(f"CREATE OR REPLACE VIEW methods AS {_methods_view()}")
    # unnest in a subquery without LATERAL: filters on the map columns are then pushed into the Parquet scan
    # (partition and row-group pruning); a LATERAL join made DuckDB unnest the whole table first
    unnested = """SELECT model, method, image_id, layer, head, grid_h, grid_w,
        unnest(map_values) AS value, generate_subscripts(map_values, 1) AS i"""
    cell = 'CAST((i - 1) // grid_w AS INTEGER) AS "row", CAST((i - 1) % grid_w AS INTEGER) AS col'
    statements.append(
        f"""CREATE OR REPLACE VIEW attention_cells AS
SELECT model, method, image_id, layer, head, grid_h, grid_w, {cell}, value
FROM ({unnested} FROM attention_maps)"""
    )
    statements.append(
        f"""CREATE OR REPLACE MACRO map_cells(p_model, p_method, p_image_id, p_layer, p_head := NULL) AS TABLE
SELECT {cell}, value
FROM ({unnested} FROM attention_maps
    WHERE model = p_model AND method = p_method AND image_id = p_image_id AND layer = p_layer
        AND head IS NOT DISTINCT FROM p_head)
ORDER BY "row", col"""
    )
    return statements


def create_views(con: duckdb.DuckDBPyConnection, root: Path) -> dict[str, bool]:
    """Create (or replace) the views of ``root`` on ``con``; returns which tables had files."""
    root = Path(root).resolve()
    present = {t: has_files(root, t) for t in TABLES}
    for statement in view_statements(root, present):
        con.execute(statement)
    return present
