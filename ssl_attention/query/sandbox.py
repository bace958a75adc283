"""A read-only DuckDB connection over the warehouse views, for SQL written by someone else.

Read-only is enforced twice. ``check_statement`` lets through only what reads: a query (SELECT / WITH /
VALUES / FROM / DESCRIBE / SHOW / SUMMARIZE), an EXPLAIN of one, or a PRAGMA that only shows something;
COPY, ATTACH, INSTALL/LOAD, SET and every writing statement are refused before anything runs (the types come
from DuckDB's own parser). And ``open_sandbox`` locks the connection down with DuckDB's settings: external
access off except for the warehouse (``allowed_directories``, plus a private spill directory), extension
autoloading off, configuration locked, so even a SELECT cannot read ``/etc/passwd`` or change a setting.
``run_statement`` runs one statement under a row cap and a time limit. ``ssl-attention sql`` is built on it;
``Warehouse.sql`` is not sandboxed (it is for your own code).
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import weakref
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import duckdb

from ssl_attention.processes import pid_alive
from ssl_attention.query.errors import QueryError, first_line
from ssl_attention.query.views import create_views

SPILL_PREFIX = "ssl-attention-sql-"
READ_ONLY_PRAGMAS = frozenset(
    {
        *("show_tables", "show_tables_expanded", "table_info", "show", "database_list", "database_size"),
        *("version", "platform", "functions", "collations", "storage_info", "metadata_info", "user_agent"),
    }
)
ALLOWED = "SELECT/WITH/VALUES/FROM, DESCRIBE, SHOW, SUMMARIZE, EXPLAIN, PRAGMA show_tables/table_info/…"
_GAP = r"(?:\s+|--[^\n]*(?:\n|\Z)|/\*.*?\*/)*"  # whitespace and comments
_COMMENT = re.compile(rf"\A{_GAP}", re.S)
# EXPLAIN [ANALYZE | (ANALYZE, FORMAT ...)]: what follows is the statement that EXPLAIN plans (and ANALYZE runs)
_EXPLAIN = re.compile(rf"explain{_GAP}(?:analy[sz]e\b|\({_GAP}(?:analy[sz]e|format)\b[^()]*\))?", re.I | re.S)
_PRAGMA_NAME = re.compile(r"pragma\s+([A-Za-z_][A-Za-z0-9_]*)", re.I)
_T = duckdb.StatementType
_REFUSED_WORDS = {
    _T.LOAD: "INSTALL/LOAD",
    _T.SET: "SET/RESET/USE",
    _T.VARIABLE_SET: "SET VARIABLE",
    _T.COPY_DATABASE: "COPY DATABASE",
}


class SandboxError(QueryError):
    """A one-line error for the user: a refused statement, a query past its time limit, DuckDB's error."""


# --- the connection -----------------------------------------------------------------------------------------


def _remove_orphaned_spill_dirs() -> None:
    """Spill directories of sandboxes whose process was killed (its pid is gone) are removed by the next one."""
    for path in Path(tempfile.gettempdir()).glob(f"{SPILL_PREFIX}*-*"):
        pid = path.name[len(SPILL_PREFIX) :].split("-", 1)[0]
        if pid.isdigit() and not pid_alive(int(pid)) and path.is_dir():
            shutil.rmtree(path, ignore_errors=True)


def open_sandbox(warehouse: Path) -> duckdb.DuckDBPyConnection:
    """An in-memory connection with the warehouse views, locked down to read the warehouse only.

    Disabling external access also allows DuckDB's temp directory, by default ``.tmp`` in the working
    directory: the sandbox spills to a private one instead (mode 0700, removed with the connection). SQL can
    list it, but it holds nothing but this connection's own spill files.
    """
    con = duckdb.connect(":memory:")
    _remove_orphaned_spill_dirs()
    spill = tempfile.mkdtemp(prefix=f"{SPILL_PREFIX}{os.getpid()}-")
    weakref.finalize(con, shutil.rmtree, spill, ignore_errors=True)  # at garbage collection or exit
    create_views(con, warehouse)
    allowed = str(warehouse).rstrip("/") + "/"
    # order matters: the temp directory and allowed_directories can only be set while external access is on
    for statement, params in (
        ("SET GLOBAL parquet_metadata_cache = true", None),
        ("SET temp_directory = ?", [spill]),
        ("SET allowed_directories = ?", [[allowed]]),
        ("SET enable_external_access = false", None),
        ("SET autoinstall_known_extensions = false", None),
        ("SET autoload_known_extensions = false", None),
        ("SET lock_configuration = true", None),
    ):
        con.execute(statement, params)
    return con


# --- the statement gate -------------------------------------------------------------------------------------


def _kind(statement: duckdb.Statement) -> duckdb.StatementType | None:
    """The statement's type; None for a type this duckdb module has no name for (``UPDATE EXTENSIONS``)."""
    try:
        return statement.type
    except ValueError:
        return None


def _refuse(word: str) -> SandboxError:
    return SandboxError(f"refused: {word} statements are not allowed in this read-only shell; allowed: {ALLOWED}")


def check_statement(statement: duckdb.Statement) -> None:
    """Raise SandboxError unless ``statement`` only reads."""
    kind = _kind(statement)
    text = statement.query[_COMMENT.match(statement.query).end() :]  # type: ignore[union-attr]
    if kind == _T.SELECT:
        return
    if kind is None:
        raise _refuse(" ".join(text.split()[:2]).upper().rstrip(";") or "unknown")
    if kind == _T.EXPLAIN:  # EXPLAIN ANALYZE runs its statement: check that one too
        match = _EXPLAIN.match(text)
        try:
            inner = duckdb.extract_statements(text[match.end() :]) if match else []
        except duckdb.Error:
            inner = []
        if len(inner) == 1 and _kind(inner[0]) == _T.SELECT:
            return
        raise SandboxError(
            "refused: EXPLAIN is allowed for queries only, as EXPLAIN [ANALYZE] <query> (read-only shell)"
        )
    if kind == _T.MULTI:  # what DuckDB makes of a PIVOT without IN: CREATE TYPE, then the query
        raise SandboxError(
            "refused: PIVOT without an IN list creates an enum type first, which this read-only shell does not"
            " allow; list the values: PIVOT images ON format IN ('JPEG', 'PNG') (find them with SELECT DISTINCT)"
        )
    if kind == _T.PRAGMA:
        match = _PRAGMA_NAME.match(text)
        if match and match.group(1).lower() in READ_ONLY_PRAGMAS:
            return
        name = match.group(1) if match else "?"
        raise SandboxError(
            f"refused: PRAGMA {name} is not a read-only pragma; allowed: {', '.join(sorted(READ_ONLY_PRAGMAS))}"
        )
    raise _refuse(_REFUSED_WORDS.get(kind, kind.name.replace("_", " ")))


def parse_statements(sql: str) -> list[duckdb.Statement]:
    """The statements of ``sql``, each checked: all are refused unless every one only reads."""
    try:
        statements = duckdb.extract_statements(sql)
    except duckdb.Error as exc:
        raise SandboxError(one_line(exc)) from None
    if not statements:
        raise SandboxError("no SQL statement given")
    for statement in statements:
        check_statement(statement)
    return statements


# --- running ------------------------------------------------------------------------------------------------


@dataclass
class Result:
    columns: list[str]
    rows: list[tuple[Any, ...]]
    truncated: bool


def one_line(exc: BaseException) -> str:
    """DuckDB's messages span lines (LINE 1: ... ^); keep the first, which says what went wrong."""
    message = first_line(exc)
    if isinstance(exc, duckdb.PermissionException):
        message += " (the SQL shell reads the warehouse only)"
    return message


def _fetch(cur: duckdb.DuckDBPyConnection, statement: duckdb.Statement, max_rows: int) -> Result:
    cur.execute(statement.query)  # its own text: a script is run one checked statement at a time
    columns = [d[0] for d in cur.description] if cur.description else []
    if max_rows <= 0:
        return Result(columns, cur.fetchall(), False)
    rows = cur.fetchmany(max_rows + 1)
    truncated = len(rows) > max_rows
    if truncated:
        cur.abort()  # DuckDB 2 keeps an unfinished result open until it is read or aborted
    return Result(columns, rows[:max_rows], truncated)


def run_statement(
    con: duckdb.DuckDBPyConnection, statement: duckdb.Statement, max_rows: int, timeout_s: float
) -> Result:
    """Run one checked statement on its own cursor under a row cap (0: none) and a time limit (0: none).

    The query runs in a worker thread while this one waits, so the wait ends at the time limit and at Ctrl-C
    (KeyboardInterrupt, re-raised) alike; either interrupts the cursor, and the worker stops at DuckDB's next
    check (a large sort may finish its phase first).
    """
    cur = con.cursor()
    worker = ThreadPoolExecutor(1, thread_name_prefix="sandbox-query")
    try:
        return worker.submit(_fetch, cur, statement, max_rows).result(timeout=timeout_s or None)
    except TimeoutError:
        cur.interrupt()
        raise SandboxError(
            f"query cancelled: it ran past the time limit of {timeout_s:g} s (raise it with --timeout)"
        ) from None
    except KeyboardInterrupt:
        cur.interrupt()
        raise
    except duckdb.Error as exc:
        raise SandboxError(one_line(exc)) from None
    finally:
        worker.shutdown(wait=True)
        cur.close()
