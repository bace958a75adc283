"""Where the warehouse lives and how its hive-partitioned tables are laid out.

    <root>/attention_maps/model=<slug>/method=<name>/data.parquet
    <root>/head_stats/model=<slug>/method=<name>/data.parquet
    <root>/inputs/model=<slug>/data.parquet        the model's input image (after its preprocessing)
    <root>/models/model=<slug>/data.parquet        model metadata, one row
    <root>/images/data.parquet                     catalog of input images
    <root>/errors/source=<catalog|slug>/data.parquet
    <root>/attention.duckdb                        DuckDB catalog of views (rebuilt, never authoritative)

Each partition is exactly one ``data.parquet``, replaced atomically (see ``atomic.py``). The map tables
(attention_maps, head_stats, inputs) are sorted by ``image_id`` in row groups of ~1 MiB that never split an image.
"""

from __future__ import annotations

import os
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


def partition_dir(root: Path, table: str, **keys: str) -> Path:
    """``root/table/k1=v1/k2=v2`` with keys in the given order."""
    path = Path(root) / table
    for key, value in keys.items():
        if not value or "/" in value or value.startswith("."):
            raise ValueError(f"invalid partition value {key}={value!r}")
        path = path / f"{key}={value}"
    return path


def partition_file(root: Path, table: str, **keys: str) -> Path:
    return partition_dir(root, table, **keys) / DATA_FILE


def table_glob(root: Path, table: str, depth: int) -> str:
    """Glob of a table's data files, ``depth`` partition levels deep."""
    if not depth:
        return str(Path(root) / table / DATA_FILE)
    return str(Path(root) / table / Path(*(["*"] * depth)) / DATA_FILE)


PARTITION_DEPTH = {"attention_maps": 2, "head_stats": 2, "inputs": 1, "models": 1, "images": 0, "errors": 1}
