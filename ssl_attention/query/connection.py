"""One DuckDB connection per process, created lazily; one cursor per thread.

DuckDB's Python connection is not safe to share between threads, its cursors are: each thread gets its own
``cursor()`` (a connection to the same in-memory database: same settings and Parquet metadata cache). A
forked child (Dagster's multiprocess executor) gets a fresh connection of its own.

Each warehouse opened for SQL gets its views (``views.py``: hive-partitioned ``read_parquet`` with explicit
VARCHAR partition types, so filters on model/method prune files) in an attached in-memory catalog of this
connection; ``views_cursor(root)`` is this thread's cursor with that catalog as its default.
"""

from __future__ import annotations

import hashlib
import os
import threading
from pathlib import Path

import duckdb

_lock = threading.Lock()
_connection: duckdb.DuckDBPyConnection | None = None
_pid: int | None = None
_local = threading.local()
_views: dict[Path, tuple[str, tuple[bool, ...]]] = {}  # root -> (catalog name, which tables had files)


def _configure(con: duckdb.DuckDBPyConnection) -> None:
    # Footers of the map partitions are parsed once, not per query. Safe with the atomic replacement:
    # DuckDB revalidates a cached footer against the open file, and a replaced file is a new inode with a new
    # mtime; tests/test_query.py replaces a file under a warm cache, same size and mtime forced, to check it.
    con.execute("SET GLOBAL parquet_metadata_cache = true")  # GLOBAL: cursors inherit it


def connection() -> duckdb.DuckDBPyConnection:
    """The process's DuckDB connection (an empty in-memory database: queries read the Parquet files)."""
    global _connection, _pid
    if _connection is None or _pid != os.getpid():
        with _lock:
            if _connection is None or _pid != os.getpid():
                con = duckdb.connect(":memory:")
                _configure(con)
                _connection, _pid = con, os.getpid()
                _views.clear()
    return _connection


def cursor() -> duckdb.DuckDBPyConnection:
    """This thread's cursor on the process connection."""
    con = connection()
    cur = getattr(_local, "cursor", None)
    if cur is None or getattr(_local, "parent", None) is not con:
        cur = con.cursor()
        _local.cursor, _local.parent = cur, con
    return cur


def views_cursor(root: Path) -> duckdb.DuckDBPyConnection:
    """This thread's cursor whose default catalog holds the views of the warehouse at ``root``.

    The views are created on first use and re-created when a table gains its first files or loses its last
    (a table without files is an empty typed view; a glob view sees new partition files by itself).
    """
    from ssl_attention.query.views import TABLES, view_statements

    root = Path(root).resolve()
    present = tuple(_has_files(root, table) for table in TABLES)
    con = connection()
    with _lock:
        name, built = _views.get(root, (f"warehouse_{hashlib.sha256(str(root).encode()).hexdigest()[:16]}", None))
        if built != present:
            builder = con.cursor()
            builder.execute(f"ATTACH IF NOT EXISTS ':memory:' AS {name}")  # name: hex digits, no user text
            builder.execute(f"USE {name}")
            for statement in view_statements(root, dict(zip(TABLES, present, strict=True))):
                builder.execute(statement)
            builder.close()
            _views[root] = (name, present)
    cursors: dict[tuple[int, str], duckdb.DuckDBPyConnection] = _local.__dict__.setdefault("views", {})
    key = (id(con), name)
    cur = cursors.get(key)
    if cur is None:
        cur = con.cursor()
        cur.execute(f"USE {name}")
        cursors[key] = cur
    return cur


def _has_files(root: Path, table: str) -> bool:
    from ssl_attention.query.views import has_files

    return has_files(root, table)
