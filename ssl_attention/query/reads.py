"""Reads of partition files, whole-version: DuckDB on this thread's cursor, the files' identity checked around.

Every query of the Python API reads named files (``read_parquet($path)``), not the SQL views: naming the
files is the partition pruning (one image's rows: its shard's file; an aggregate: every shard's file), and
the read can check each file's identity before and after the query.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import duckdb

from ssl_attention.query.connection import cursor
from ssl_attention.query.errors import MissingDataError, QueryError, UnreadableFileError, first_line

T = TypeVar("T")
FileKey = tuple[int, int, int] | None

READ_ATTEMPTS = 5


def file_key(path: Path) -> FileKey:
    """Identity of one version of a file, (inode, mtime ns, size); None when it does not exist."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_mtime_ns, st.st_size


Files = Path | Sequence[Path]  # one partition file, or the files of every image shard of one partition


def _as_list(files: Files) -> list[Path]:
    return [files] if isinstance(files, str | os.PathLike) else list(files)


def files_key(files: Files) -> tuple[FileKey, ...] | None:
    """Identity of one version of a set of files (each one's ``file_key``); None when any is missing or
    there is none."""
    keys = tuple(file_key(path) for path in _as_list(files))
    return None if not keys or None in keys else keys


def read(files: Files, sql: str, params: dict[str, Any], fetch: Callable[[duckdb.DuckDBPyConnection], T]) -> T:
    """Run ``sql`` (with ``$path`` bound to the file, or to the list of files: ``read_parquet`` reads them as
    one table) and ``fetch`` its result, on one version of every file.

    DuckDB may open a file more than once in a query (parallel scans, DISTINCT over dictionaries), so a
    query that overlaps an atomic replacement can fail ("TProtocolException: Invalid data") or, in
    principle, mix versions. Each file's (inode, mtime, size) is taken before and after: if one changed,
    the query is run again; if not, every open saw the same version and the result is whole.

    A file that fails to read without being replaced (corrupt, truncated, wrong schema, no permission)
    raises ``UnreadableFileError`` naming the file and the first line of DuckDB's message.
    """
    paths = _as_list(files)
    bound: str | list[str] = str(paths[0]) if isinstance(files, str | os.PathLike) else [str(p) for p in paths]
    shown = paths[0] if len(paths) == 1 else f"{paths[0].parent.parent} ({len(paths)} shard files)"
    for _ in range(READ_ATTEMPTS):
        before = files_key(paths)
        if before is None:
            raise MissingDataError(f"{shown} is not in the warehouse (any more); refresh and retry")
        try:
            result = fetch(cursor().execute(sql, {**params, "path": bound}))
        except duckdb.Error as exc:
            if files_key(paths) != before:
                continue  # replaced while we read: read the new version
            raise UnreadableFileError(f"cannot read {shown}: {first_line(exc)}") from exc
        if files_key(paths) == before:
            return result
    raise QueryError(f"{shown} was rewritten {READ_ATTEMPTS} times while being read; try again")


def read_dicts(path: Files, sql: str, params: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """The rows as dicts (for small results: metadata, one map's statistics)."""

    def fetch(cur: duckdb.DuckDBPyConnection) -> list[dict[str, Any]]:
        names = [d[0] for d in cur.description]
        return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]

    return read(path, sql, params or {}, fetch)


def read_numpy(path: Files, sql: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
    """The result as numpy columns (``fetchnumpy``: the cheapest way out of DuckDB for a few rows)."""
    return read(path, sql, params or {}, lambda cur: cur.fetchnumpy())


class VersionCache:
    """Values derived from a file, kept per file version: a lookup ``stat``s the file and loads again only when
    its (inode, mtime, size) changed, which an atomic replacement always changes."""

    def __init__(self) -> None:
        self._entries: dict[tuple[str, ...], tuple[FileKey, Any]] = {}

    def get(self, key: tuple[str, ...], version: FileKey, load: Callable[[], T]) -> T:
        hit = self._entries.get(key)
        if hit is not None and hit[0] == version:
            return hit[1]
        value = load()
        self._entries[key] = (version, value)
        return value
