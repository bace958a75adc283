"""One DuckDB connection per process, created lazily; one cursor per thread.

DuckDB's Python connection is not safe to share between threads, its cursors are: each thread gets its own
``cursor()`` (a connection to the same in-memory database: same settings and Parquet metadata cache). A
forked child (Dagster's multiprocess executor) gets a fresh connection of its own.
"""

from __future__ import annotations

import os
import threading

import duckdb

_lock = threading.Lock()
_connection: duckdb.DuckDBPyConnection | None = None
_pid: int | None = None
_local = threading.local()


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
    return _connection


def cursor() -> duckdb.DuckDBPyConnection:
    """This thread's cursor on the process connection."""
    con = connection()
    cur = getattr(_local, "cursor", None)
    if cur is None or getattr(_local, "parent", None) is not con:
        cur = con.cursor()
        _local.cursor, _local.parent = cur, con
    return cur
