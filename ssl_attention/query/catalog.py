"""The ``attention.duckdb`` catalog file: only views and the cells macro, no data, and no path.

Its views read globs relative to the warehouse root (``views.py``, ``relative=True``), so the file travels
with its warehouse: a client sets DuckDB's ``file_search_path`` to the folder that holds it and reads the
files there, wherever that folder was moved or copied::

    duckdb -readonly -cmd "SET file_search_path = 'data/warehouse'" data/warehouse/attention.duckdb

A client that does not set it gets an error naming that command, never another folder's files. It is
written to a temporary file beside the target and swapped in with ``os.replace``, so a client never opens a
half-written catalog. The ``catalog_info`` view records its format and a fingerprint of its statements:
``refresh_catalog`` (called by ``open_warehouse`` and ``ssl-attention sql``) rewrites a catalog whose
statements differ from what this code would write for the warehouse now — one written by an older version
(absolute paths into wherever it was written), or before a table got its first files.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shlex
import uuid
from pathlib import Path

import duckdb

from ssl_attention.query.views import CatalogPathError, quote_literal, tables_present, view_statements
from ssl_attention.warehouse.paths import CATALOG_FILE

CATALOG_FORMAT = 2  # 1: views over absolute paths (no catalog_info); 2: globs relative to file_search_path
INFO_VIEW = "catalog_info"

_log = logging.getLogger(__name__)


def _root(warehouse: str | os.PathLike[str]) -> Path:
    """The warehouse's absolute path, refused if DuckDB's ``file_search_path`` (comma-separated) cannot hold it."""
    root = Path(warehouse).resolve()
    if "," in str(root):
        raise CatalogPathError(
            f"the warehouse path {str(root)!r} contains a comma, which DuckDB's file_search_path splits on: "
            "move the warehouse to a folder without one"
        )
    return root


def _statements(root: Path) -> tuple[list[str], str]:
    """The catalog's view statements for the warehouse at ``root`` now, and their fingerprint."""
    statements = view_statements(root, tables_present(root), relative=True)
    digest = hashlib.sha256(f"{CATALOG_FORMAT}\n".encode())
    for statement in statements:
        digest.update(statement.encode())
        digest.update(b"\0")
    return statements, digest.hexdigest()


def _shell_word(text: str) -> str:
    """``text`` as one POSIX shell word, in double quotes where that is enough (readable SQL quotes inside)."""
    if shlex.quote(text) == text:
        return text
    return f'"{text}"' if not set(text) & set('"$`\\!') else shlex.quote(text)


def client_command(warehouse: str | os.PathLike[str]) -> str:
    """The shell command that opens the catalog of ``warehouse`` in DuckDB's own client, read-only."""
    root = Path(warehouse).resolve()
    setting = f"SET file_search_path = {quote_literal(str(root))}"
    return f"duckdb -readonly -cmd {_shell_word(setting)} {_shell_word(str(root / CATALOG_FILE))}"


def open_catalog(warehouse: str | os.PathLike[str]) -> duckdb.DuckDBPyConnection:
    """A read-only connection to ``<warehouse>/attention.duckdb`` whose views read that warehouse's files."""
    root = _root(warehouse)
    path = root / CATALOG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no {CATALOG_FILE} in {root}; write it with ssl_attention.query.write_catalog")
    return duckdb.connect(str(path), read_only=True, config={"file_search_path": str(root)})


def write_catalog(warehouse: str | os.PathLike[str]) -> Path:
    """Write ``<warehouse>/attention.duckdb`` atomically; returns its path."""
    root = _root(warehouse)
    root.mkdir(parents=True, exist_ok=True)
    target = root / CATALOG_FILE
    temp = root / f".{CATALOG_FILE}.{os.getpid()}-{uuid.uuid4().hex}.tmp"
    statements, fingerprint = _statements(root)
    info = (
        f"CREATE OR REPLACE VIEW {INFO_VIEW} AS SELECT * FROM (VALUES ({CATALOG_FORMAT}, "
        f"{quote_literal(fingerprint)}, {quote_literal('file_search_path = the folder that holds this file')})) "
        "AS info(format, fingerprint, reads_relative_to)"
    )
    try:
        # an older storage format: the DuckDB CLI on PyPI (duckdb-cli 1.4/1.5) reads it; the file holds views only.
        # CREATE VIEW binds the view, so the writer resolves the relative globs as a reader does.
        config = {"storage_compatibility_version": "v1.4.0", "file_search_path": str(root)}
        con = duckdb.connect(str(temp), config=config)
        try:
            for statement in (*statements, info):
                con.execute(statement)
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


def catalog_is_current(warehouse: str | os.PathLike[str]) -> bool:
    """Whether ``<warehouse>/attention.duckdb`` holds exactly the views this code would write for it now; a
    missing, unreadable or older catalog is not."""
    root = Path(warehouse).resolve()
    if not (root / CATALOG_FILE).is_file():
        return False
    try:
        con = open_catalog(root)
        try:
            found = con.execute(f"SELECT format, fingerprint FROM {INFO_VIEW}").fetchone()
        finally:
            con.close()
    except (duckdb.Error, CatalogPathError):  # no catalog_info (format 1), a damaged or locked file, a comma
        return False
    return found == (CATALOG_FORMAT, _statements(root)[1])


def refresh_catalog(warehouse: str | os.PathLike[str]) -> bool:
    """Rewrite an existing catalog that is not current (``catalog_is_current``); True if it was rewritten.

    A warehouse without a catalog is left alone (the ``warehouse_catalog`` asset writes it). One that cannot
    be written (a read-only copy) is logged and left as it is: ``write_catalog`` it where it can be written."""
    root = Path(warehouse).resolve()
    if not (root / CATALOG_FILE).is_file() or catalog_is_current(root):
        return False
    try:
        write_catalog(root)
    except (OSError, duckdb.Error, CatalogPathError) as exc:
        _log.warning("could not rewrite the stale DuckDB catalog %s: %s", root / CATALOG_FILE, exc)
        return False
    _log.info("rewrote the DuckDB catalog %s (it was written by an older version or for other files)", root)
    return True
