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

from ssl_attention.warehouse.paths import TABLES, has_partitions

_lock = threading.Lock()
_connection: duckdb.DuckDBPyConnection | None = None
_pid: int | None = None
_local = threading.local()
_views: dict[Path, tuple[str, tuple[bool, ...]]] = {}  # root -> (catalog name, which tables had files)


_inherited: list[object] = []  # the parent's DuckDB objects in a forked child: kept, never used or destroyed


def _reset_in_child() -> None:
    """A forked child starts afresh: DuckDB state shared across fork() is not safe to use (destroying it
    crashes the child, so it is kept alive), and a lock held by another thread of the parent at the fork would
    never be released in the child."""
    global _lock, _connection, _pid, _local, _views
    _inherited.append((_connection, _local))
    _lock, _connection, _pid, _local, _views = threading.Lock(), None, None, threading.local(), {}


os.register_at_fork(after_in_child=_reset_in_child)


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
    from ssl_attention.query.views import view_statements

    root = Path(root).resolve()
    present = tuple(has_partitions(root, table) for table in TABLES)
    con = connection()
    with _lock:
        name, built = _views.get(root, (f"warehouse_{hashlib.sha256(str(root).encode()).hexdigest()[:16]}", None))
        if built != present:
            statements = view_statements(root, dict(zip(TABLES, present, strict=True)))  # may refuse the path
            builder = con.cursor()
            try:
                builder.execute(f"ATTACH IF NOT EXISTS ':memory:' AS {name}")  # name: hex digits, no user text
                builder.execute(f"USE {name}")
                for statement in statements:
                    builder.execute(statement)
            finally:
                builder.close()
            _views[root] = (name, present)
    if getattr(_local, "views_parent", None) is not con:  # first use in this thread, or a new connection
        _local.views, _local.views_parent = {}, con
    cur = _local.views.get(name)
    if cur is None:
        cur = con.cursor()
        cur.execute(f"USE {name}")
        _local.views[name] = cur
    return cur
