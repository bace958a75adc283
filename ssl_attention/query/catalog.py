"""The ``attention.duckdb`` catalog file: only views (absolute paths) and the cells macro, no data.

Any DuckDB client opens it and sees the warehouse tables: ``duckdb data/warehouse/attention.duckdb``.
It is written to a temporary file beside the target and swapped in with ``os.replace``, so a client never
opens a half-written catalog. Rebuild it after extraction (the ``warehouse_catalog`` asset does): a table
that had no files when it was written is an empty view until then.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from pathlib import Path

import duckdb

from ssl_attention.query.views import create_views
from ssl_attention.warehouse.paths import CATALOG_FILE


def write_catalog(warehouse: str | os.PathLike[str]) -> Path:
    """Write ``<warehouse>/attention.duckdb`` atomically; returns its path."""
    root = Path(warehouse).resolve()
    root.mkdir(parents=True, exist_ok=True)
    target = root / CATALOG_FILE
    temp = root / f".{CATALOG_FILE}.{os.getpid()}-{uuid.uuid4().hex}.tmp"
    try:
        # an older storage format: the DuckDB CLI on PyPI (duckdb-cli 1.4/1.5) reads it; the file holds views only
        con = duckdb.connect(str(temp), config={"storage_compatibility_version": "v1.4.0"})
        try:
            create_views(con, root)
            con.execute("CHECKPOINT")
        finally:
            con.close()
        with open(temp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(temp, target)
    finally:
        for leftover in (temp, Path(f"{temp}.wal")):
            with contextlib.suppress(FileNotFoundError):
                leftover.unlink()
    return target
