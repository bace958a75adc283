"""Where the warehouse lives and how its hive-partitioned tables are laid out.

The layout is ``TABLES``: each table's partition keys, outermost first, one directory level per key::

    <root>/<table>/<key1>=<value1>/<key2>=<value2>/data.parquet      e.g. attention_maps/model=clip/method=cls/shard=0/
    <root>/images/data.parquet                                      a table without keys: one file
    <root>/attention.duckdb                                         DuckDB catalog of views (rebuilt)
    <root>/layout.json                                              the image shard count (``shards.py``)

Each partition is exactly one ``data.parquet``, replaced atomically (see ``atomic.py``). The map tables
(attention_maps, head_stats, inputs) are sorted by ``image_id`` in row groups of ~1 MiB that never split an image.
Everything that finds partitions on disk (extraction, statistics, the views, the query layer) goes through
``iter_partitions``; everything that names one goes through ``partition_file``. Adding a table or a key is one
line of ``TABLES`` (plus the table's schema in ``schema.SCHEMAS``).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlparse

DEFAULT_WAREHOUSE = Path("data") / "warehouse"
DATA_FILE = "data.parquet"
CATALOG_FILE = "attention.duckdb"


class WarehouseLocationError(ValueError):
    """A warehouse or images location that is not a local path or file:// URL."""


def resolve_warehouse(location: str | os.PathLike[str] | None = None) -> Path:
    """``--warehouse`` if given, else ``$SSL_ATTENTION_WAREHOUSE``, else ``data/warehouse``; an absolute path.

    Accepts plain paths and ``file://`` URLs. Object stores (``s3://`` ...) need a commit protocol that
    plain renames cannot give; docs/scaling.md describes how to run there. The environment is read in
    ``ssl_attention.settings`` (imported here, not at the top: it builds on this module).
    """
    from ssl_attention.settings import resolve_warehouse as resolve

    return resolve(location)


def local_path(location: str, what: str) -> Path:
    """A plain path or ``file://`` URL -> absolute path; any other scheme is refused, naming ``what`` it is."""
    raw = location.strip()
    if "://" in raw:
        url = urlparse(raw)
        if url.scheme != "file":
            raise WarehouseLocationError(
                f"{what} {raw!r}: only local paths and file:// URLs are supported here "
                f"(got scheme {url.scheme!r}); see docs/scaling.md for object storage"
            )
        if url.netloc not in ("", "localhost"):
            raise WarehouseLocationError(f"{what} {raw!r}: file:// URLs must name a local path")
        raw = unquote(url.path)
    return Path(raw).expanduser().resolve()


TABLES: dict[str, tuple[str, ...]] = {
    "images": (),  # catalog of input images
    "attention_maps": ("model", "method", "shard"),  # shard: warehouse.shards.shard_of(image_id)
    "head_stats": ("model", "method", "shard"),
    "models": ("model",),  # one row of model facts
    "inputs": ("model", "shard"),  # each model's input image, as it saw it
    "errors": ("source",),  # source: "catalog", "annotations" or a model slug
    "annotations": (),  # regions of the annotation file, in original-image pixels
    "alignment": ("model", "method", "shard"),  # every map (and two baselines) scored against every feature
    "head_ranking": ("model", "method"),  # aggregates of alignment, with bootstrap CIs (stored)
}
"""Every warehouse table and its partition keys, outermost first (the views are made in this order)."""


@dataclass(frozen=True)
class Partition:
    """One partition on disk: its table, its key values (in the table's key order) and its data file."""

    table: str
    keys: Mapping[str, str]
    path: Path


def partition_keys(table: str) -> tuple[str, ...]:
    """The partition keys of ``table``, outermost first; a ``ValueError`` names the tables for an unknown one."""
    try:
        return TABLES[table]
    except KeyError:
        raise ValueError(f"unknown warehouse table {table!r}; tables: {', '.join(TABLES)}") from None


def _check_value(key: str, value: object) -> str:
    if not isinstance(value, str) or not value or "/" in value or value.startswith("."):
        raise ValueError(f"invalid partition value {key}={value!r}: a non-empty name without '/' or a leading '.'")
    return value


def partition_dir(root: Path, table: str, **keys: str) -> Path:
    """``root/table/k1=v1/k2=v2``: the directory of the leading keys given (all of them: one partition)."""
    names = partition_keys(table)
    if tuple(keys) != names[: len(keys)]:
        raise ValueError(
            f"{table} is partitioned by ({', '.join(names) or 'nothing'}), outermost first; "
            f"got keys ({', '.join(keys)}): pass a leading run of them, in that order"
        )
    path = Path(root) / table
    for key, value in keys.items():
        path = path / f"{key}={_check_value(key, value)}"
    return path


def partition_file(root: Path, table: str, **keys: str) -> Path:
    """The data file of one partition; every key of the table must be given."""
    names = partition_keys(table)
    if set(keys) != set(names):
        missing = [k for k in names if k not in keys]
        raise ValueError(f"a {table} partition is named by ({', '.join(names)}); missing: {', '.join(missing)}")
    return partition_dir(root, table, **{k: keys[k] for k in names}) / DATA_FILE


def iter_partitions(root: Path, table: str, **fixed: str) -> Iterator[Partition]:
    """The partitions of ``table`` that have a data file, in sorted key order; ``fixed`` pins leading keys
    (``iter_partitions(root, "attention_maps", model="clip")``: clip's methods).

    Only ``key=value`` directories of the table's own keys count: stray files and folders, hidden entries and
    temporary files are skipped.
    """
    names = partition_keys(table)
    start = partition_dir(root, table, **fixed)  # checks that ``fixed`` is a leading run of the keys
    yield from _walk(table, start, names[len(fixed) :], dict(fixed))


def _walk(table: str, directory: Path, keys: tuple[str, ...], found: dict[str, str]) -> Iterator[Partition]:
    if not keys:
        data = directory / DATA_FILE
        if data.is_file():
            yield Partition(table, found, data)
        return
    key, prefix = keys[0], f"{keys[0]}="
    try:
        children = sorted(directory.iterdir())
    except (FileNotFoundError, NotADirectoryError):
        return
    for child in children:
        value = child.name[len(prefix) :]
        if child.name.startswith(prefix) and value and not value.startswith(".") and child.is_dir():
            yield from _walk(table, child, keys[1:], {**found, key: value})


def has_partitions(root: Path, table: str) -> bool:
    """Whether ``table`` has at least one data file."""
    return next(iter_partitions(root, table), None) is not None


def table_glob(root: Path, table: str) -> str:
    """Glob of every data file of ``table`` (``root/table/*/*/*/data.parquet``), for DuckDB's ``read_parquet``."""
    return str(Path(root, table, *(["*"] * len(partition_keys(table))), DATA_FILE))
