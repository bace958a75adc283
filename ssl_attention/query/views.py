"""DDL of the SQL views over the warehouse, shared by the SQL shell's connection and the catalog file.

The Python query API does not use them: it reads each partition file directly (``warehouse.py``). The views
are one per table of ``warehouse.paths.TABLES`` (same name, partition keys first), plus ``DERIVED_VIEWS``.

Every identifier here comes from fixed tuples in this module or the warehouse schema; the only literals are
the warehouse's own path and the model registry's constants, quoted by ``quote_literal``. A table with no
files yet gets an empty view with the same columns and types, so queries over an empty or partial warehouse
return no rows instead of failing.

The in-process views (``connection.py``, ``sandbox.py``) read absolute paths, built from the root they are
asked for. The catalog file's views (``relative=True``) read globs relative to the warehouse root instead, so
a moved or copied warehouse reads its own files: DuckDB resolves them against ``file_search_path``, which the
client sets to the folder of ``attention.duckdb``. Left unset, DuckDB would resolve them against the working
directory (and could read another warehouse there), so each such view refuses to bind and its error says what
to run (``RELATIVE_GUARD``).
"""

from __future__ import annotations

import functools
from pathlib import Path

import duckdb

from ssl_attention.alignment.metrics import METRIC_COLUMNS
from ssl_attention.alignment.ranking import LOWER_IS_BETTER
from ssl_attention.registry import METHODS, MODELS
from ssl_attention.warehouse import schema
from ssl_attention.warehouse.paths import TABLES, has_partitions, table_glob
from ssl_attention.warehouse.shards import SHARD_KEY, readable_shards

DERIVED_VIEWS = ("methods", "attention_cells", "head_feature_matrix", "exemplars")
MACROS = ("map_cells",)

_GLOB_CHARACTERS = set("*?[]{}")


RELATIVE_GUARD = (
    "this attention.duckdb reads the warehouse's Parquet files relative to the folder that holds it: set that folder"
    " as DuckDB's file_search_path first, e.g. SET file_search_path = '/path/to/warehouse'; or start the client as"
    " duckdb -readonly -cmd \"SET file_search_path = '/path/to/warehouse'\" /path/to/warehouse/attention.duckdb"
    " (Python: duckdb.connect(catalog, read_only=True, config={'file_search_path': folder}))"
)
"""The error of a catalog view opened without ``file_search_path`` (no path in it: a copy's catalog must not
send its reader to the original)."""


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


def view_keys(table: str) -> tuple[str, ...]:
    """The partition keys a view shows: all but ``shard``, a storage detail (a function of ``image_id``), so
    queries read the same whatever the shard count."""
    return tuple(key for key in TABLES[table] if key != SHARD_KEY)


def _relative_glob(table: str) -> str:
    """``table``'s files relative to the warehouse root, always as a glob: DuckDB looks a glob up in
    ``file_search_path`` only, but a plain relative file name in the working directory first (a client inside
    another warehouse would read that one's ``images/data.parquet``), so a key-less table's one file is
    written ``images/[d]ata.parquet``."""
    pattern = Path(table_glob(Path(), table))
    if _GLOB_CHARACTERS & set(str(pattern)):
        return str(pattern)
    return str(pattern.parent / f"[{pattern.name[0]}]{pattern.name[1:]}")


def _source(root: Path | None, table: str, present: bool) -> str:
    """A FROM-able source with the partition keys first (``view_keys``), then the file columns; ``root=None``: a
    glob relative to the warehouse root, resolved by the client's ``file_search_path`` (and refused while that
    is unset)."""
    keys = TABLES[table]
    columns = duckdb_types(table)
    if not present:
        casts = [f"CAST(NULL AS VARCHAR) AS {quote_ident(k)}" for k in view_keys(table)]
        casts += [f"CAST(NULL AS {kind}) AS {quote_ident(name)}" for name, kind in columns]
        return f"(SELECT {', '.join(casts)} LIMIT 0)"
    if root is None:
        relative = quote_literal(_relative_glob(table))
        glob = (
            f"CASE WHEN current_setting('file_search_path') = '' THEN error({quote_literal(RELATIVE_GUARD)}) "
            f"ELSE {relative} END"
        )
    else:
        root_text = str(root)
        if _GLOB_CHARACTERS & set(root_text):
            raise CatalogPathError(
                f"the warehouse path {root_text!r} contains glob characters ({''.join(_GLOB_CHARACTERS)})"
            )
        glob = quote_literal(table_glob(root, table))
    if keys:
        types = ", ".join(f"{quote_literal(k)}: 'VARCHAR'" for k in keys)
        reader = f"read_parquet({glob}, hive_partitioning = true, hive_types = {{{types}}})"
    else:
        reader = f"read_parquet({glob}, hive_partitioning = false)"
    projection = ", ".join(quote_ident(name) for name in (*view_keys(table), *(c for c, _ in columns)))
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


def _head_feature_matrix_view() -> str:
    """head_ranking without the "all" feature: one row per (model, method, layer, metric, entry, feature), with
    the entry's rank among the features (1 = the feature it scores best on: its specialisation)."""
    lower = ", ".join(quote_literal(m) for m in sorted(LOWER_IS_BETTER))
    return f"""SELECT model, method, layer, metric, entry, map_kind, head, feature, n_images, mean, ci_low, ci_high,
    head_rank,
    CAST(rank() OVER (PARTITION BY model, method, layer, metric, entry
        ORDER BY CASE WHEN metric IN ({lower}) THEN mean ELSE -mean END NULLS LAST) AS INTEGER) AS feature_rank
FROM head_ranking WHERE feature <> 'all'"""


def _exemplars_view() -> str:
    """alignment's map rows unpivoted to (metric, value), each image ranked within its map and feature, best
    first (lowest for kl and mse; ties by image id); unscored rows (NULL) are left out."""
    lower = ", ".join(quote_literal(m) for m in sorted(LOWER_IS_BETTER))
    metrics = ", ".join(quote_ident(m) for m in METRIC_COLUMNS)
    casts = ", ".join(f"CAST({quote_ident(m)} AS DOUBLE) AS {quote_ident(m)}" for m in METRIC_COLUMNS)
    return f"""SELECT model, method, layer, head, feature, metric, image_id, file_name, value,
    CAST(row_number() OVER (PARTITION BY model, method, layer, head, feature, metric
        ORDER BY CASE WHEN metric IN ({lower}) THEN value ELSE -value END, image_id) AS INTEGER) AS image_rank
FROM (UNPIVOT (SELECT model, method, image_id, layer, head, feature, {casts} FROM alignment WHERE map_kind = 'map')
    ON {metrics} INTO NAME metric VALUE value)
LEFT JOIN (SELECT image_id, file_name FROM images) USING (image_id)"""


def view_statements(root: Path, present: dict[str, bool], relative: bool = False) -> list[str]:
    """CREATE OR REPLACE statements for every view and macro, in dependency order; ``present`` says which
    tables have files (the others get empty typed views). ``relative``: globs relative to the warehouse root
    (the catalog file's views; the statements then name no path at all)."""
    readable_shards(Path(root))  # a warehouse written before image shards: LegacyLayoutError names the migration
    base = None if relative else Path(root).resolve()
    statements = []
    for table in TABLES:
        source = _source(base, table, present[table])
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
    statements.append(f"CREATE OR REPLACE VIEW head_feature_matrix AS {_head_feature_matrix_view()}")
    statements.append(f"CREATE OR REPLACE VIEW exemplars AS {_exemplars_view()}")
    statements.append(
        f"""CREATE OR REPLACE MACRO map_cells(p_model, p_method, p_image_id, p_layer, p_head := NULL) AS TABLE
SELECT {cell}, value
FROM ({unnested} FROM attention_maps
    WHERE model = p_model AND method = p_method AND image_id = p_image_id AND layer = p_layer
        AND head IS NOT DISTINCT FROM p_head)
ORDER BY "row", col"""
    )
    return statements


def tables_present(root: Path) -> dict[str, bool]:
    """Which tables of the warehouse at ``root`` have at least one data file."""
    return {t: has_partitions(root, t) for t in TABLES}


def create_views(con: duckdb.DuckDBPyConnection, root: Path) -> dict[str, bool]:
    """Create (or replace) the views of ``root`` (absolute paths) on ``con``; returns which tables had files."""
    root = Path(root).resolve()
    present = tables_present(root)
    for statement in view_statements(root, present):
        con.execute(statement)
    return present
