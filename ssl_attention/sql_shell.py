"""Ad-hoc, read-only SQL over the warehouse: ``ssl-attention sql "SELECT ..."`` or an interactive prompt.

Read-only is enforced twice. Each statement is parsed with ``duckdb.extract_statements`` and must be a
query (SELECT / WITH / VALUES / FROM / DESCRIBE / SHOW / SUMMARIZE), an EXPLAIN of one, or a PRAGMA that only
shows something; COPY, ATTACH, INSTALL/LOAD, SET and every writing statement are refused before they run.
And the connection is sandboxed with DuckDB's own settings: external access is off except for the warehouse
directory (``allowed_directories``, plus a private temp directory for spills), extension autoloading is off
and the configuration is locked, so even a SELECT cannot read ``/etc/passwd`` or change a setting. Each query
runs under a row cap and a time limit (a timer interrupts it). Errors are one line on stderr and exit code 2;
no traceback reaches the user.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import csv
import datetime as dt
import decimal
import io
import json
import math
import os
import re
import shutil
import signal
import sys
import tempfile
import threading
import uuid
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import duckdb

from ssl_attention.processes import pid_alive
from ssl_attention.query.errors import first_line
from ssl_attention.query.views import DERIVED_VIEWS, MACROS, TABLES, create_views
from ssl_attention.warehouse.paths import WarehouseLocationError, resolve_warehouse

DEFAULT_MAX_ROWS = 10_000
DEFAULT_TIMEOUT_S = 30.0
FORMATS = ("table", "csv", "json")
MAX_CELL_WIDTH = 60
HISTORY_LENGTH = 2000

READ_ONLY_PRAGMAS = frozenset(
    {
        "show_tables",
        "show_tables_expanded",
        "table_info",
        "show",
        "database_list",
        "database_size",
        "version",
        "platform",
        "functions",
        "collations",
        "storage_info",
        "metadata_info",
        "user_agent",
    }
)
ALLOWED = "SELECT/WITH/VALUES/FROM, DESCRIBE, SHOW, SUMMARIZE, EXPLAIN, PRAGMA show_tables/table_info/…"
_GAP = r"(?:\s+|--[^\n]*(?:\n|\Z)|/\*.*?\*/)*"  # whitespace and comments
_COMMENT = re.compile(rf"\A{_GAP}", re.S)
# EXPLAIN [ANALYZE | (ANALYZE, FORMAT ...)]: what follows is the statement that EXPLAIN plans (and ANALYZE runs)
_EXPLAIN = re.compile(rf"explain{_GAP}(?:analy[sz]e\b|\({_GAP}(?:analy[sz]e|format)\b[^()]*\))?", re.I | re.S)
_PRAGMA_NAME = re.compile(r"pragma\s+([A-Za-z_][A-Za-z0-9_]*)", re.I)


class ShellError(Exception):
    """A one-line error for the user."""


# --- the sandboxed connection ------------------------------------------------------------------------------


SPILL_PREFIX = "ssl-attention-sql-"


def _remove_orphaned_spill_dirs() -> None:
    """Spill directories of shells that were killed (their pid is gone) are removed by the next shell."""
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


# --- statement gate ----------------------------------------------------------------------------------------


def _strip_comments(text: str) -> str:
    return text[_COMMENT.match(text).end() :]  # type: ignore[union-attr]


def _kind(statement: duckdb.Statement) -> duckdb.StatementType | None:
    """The statement's type; None for a type this duckdb module has no name for (``UPDATE EXTENSIONS``)."""
    try:
        return statement.type
    except ValueError:
        return None


def _refuse(word: str) -> ShellError:
    return ShellError(f"refused: {word} statements are not allowed in this read-only shell; allowed: {ALLOWED}")


def check_statement(statement: duckdb.Statement) -> None:
    """Raise ShellError unless ``statement`` only reads."""
    kind = _kind(statement)
    text = _strip_comments(statement.query)
    if kind == duckdb.StatementType.SELECT:
        return
    if kind is None:
        raise _refuse(" ".join(text.split()[:2]).upper().rstrip(";") or "unknown")
    if kind == duckdb.StatementType.EXPLAIN:  # EXPLAIN ANALYZE runs its statement: check that one too
        match = _EXPLAIN.match(text)
        try:
            inner = duckdb.extract_statements(text[match.end() :]) if match else []
        except duckdb.Error:
            inner = []
        if len(inner) == 1 and _kind(inner[0]) == duckdb.StatementType.SELECT:
            return
        raise ShellError("refused: EXPLAIN is allowed for queries only, as EXPLAIN [ANALYZE] <query> (read-only shell)")
    if kind == duckdb.StatementType.MULTI:  # what DuckDB makes of a PIVOT without IN: CREATE TYPE, then the query
        raise ShellError(
            "refused: PIVOT without an IN list creates an enum type first, which this read-only shell does not"
            " allow; list the values: PIVOT images ON format IN ('JPEG', 'PNG') (find them with SELECT DISTINCT)"
        )
    if kind == duckdb.StatementType.PRAGMA:
        match = _PRAGMA_NAME.match(text)
        if match and match.group(1).lower() in READ_ONLY_PRAGMAS:
            return
        name = match.group(1) if match else "?"
        raise ShellError(
            f"refused: PRAGMA {name} is not a read-only pragma; allowed: {', '.join(sorted(READ_ONLY_PRAGMAS))}"
        )
    word = {
        duckdb.StatementType.LOAD: "INSTALL/LOAD",
        duckdb.StatementType.SET: "SET/RESET/USE",
        duckdb.StatementType.VARIABLE_SET: "SET VARIABLE",
        duckdb.StatementType.COPY: "COPY",
        duckdb.StatementType.COPY_DATABASE: "COPY DATABASE",
        duckdb.StatementType.ATTACH: "ATTACH",
        duckdb.StatementType.DETACH: "DETACH",
        duckdb.StatementType.EXPORT: "EXPORT",
        duckdb.StatementType.CALL: "CALL",
    }.get(kind, str(kind).rsplit(".", 1)[-1].replace("_", " "))
    raise _refuse(word)


def parse_statements(sql: str) -> list[duckdb.Statement]:
    try:
        statements = duckdb.extract_statements(sql)
    except duckdb.Error as exc:
        raise ShellError(one_line(exc)) from None
    if not statements:
        raise ShellError("no SQL statement given")
    for statement in statements:
        check_statement(statement)
    return statements


# --- running -----------------------------------------------------------------------------------------------


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


@contextlib.contextmanager
def _interrupt_on_ctrl_c(cur: duckdb.DuckDBPyConnection) -> Iterator[threading.Event]:
    """While the block runs, SIGINT interrupts ``cur`` at once.

    Python runs its own SIGINT handler only between bytecodes of the main thread, which is blocked inside
    DuckDB during a query; the signal's wake-up byte, written by the C-level handler to a pipe, is seen by a
    watcher thread instead, which interrupts the query. Main thread only (a no-op elsewhere).
    """
    pressed = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield pressed
        return
    read_end, write_end = os.pipe()
    os.set_blocking(write_end, False)
    previous = signal.set_wakeup_fd(write_end, warn_on_full_buffer=False)

    def watch() -> None:
        while True:
            data = os.read(read_end, 64)
            if not data:  # write end closed: the block is over
                return
            if signal.SIGINT in data:
                pressed.set()
                with contextlib.suppress(duckdb.Error):
                    cur.interrupt()

    watcher = threading.Thread(target=watch, name="sql-ctrl-c", daemon=True)
    watcher.start()
    try:
        yield pressed
    finally:
        signal.set_wakeup_fd(previous)
        os.close(write_end)
        watcher.join(timeout=1)
        os.close(read_end)


def run_statement(
    con: duckdb.DuckDBPyConnection, statement: duckdb.Statement, max_rows: int, timeout_s: float
) -> Result:
    """Run one checked statement on its own cursor, under a row cap and a time limit.

    A timer thread ``interrupt()``s the cursor at the time limit; Ctrl-C interrupts it too and surfaces as
    KeyboardInterrupt (the prompt then cancels the statement and goes on).
    """
    cur = con.cursor()
    timed_out = threading.Event()

    def on_timeout() -> None:
        timed_out.set()
        cur.interrupt()

    timer = threading.Timer(timeout_s, on_timeout) if timeout_s > 0 else None
    if timer is not None:
        timer.daemon = True
        timer.start()
    try:
        with _interrupt_on_ctrl_c(cur) as ctrl_c:
            try:
                return _fetch(cur, statement, max_rows)
            except (duckdb.InterruptException, RuntimeError) as exc:
                if timed_out.is_set():
                    raise ShellError(
                        f"query cancelled: it ran past the time limit of {timeout_s:g} s (raise it with --timeout)"
                    ) from None
                if ctrl_c.is_set() or isinstance(exc, duckdb.InterruptException) or "interrupted" in str(exc):
                    raise KeyboardInterrupt from None
                raise
            except duckdb.Error as exc:
                raise ShellError(one_line(exc)) from None
    finally:
        if timer is not None:
            timer.cancel()
        cur.close()


# --- output ------------------------------------------------------------------------------------------------


def _cell(value: Any) -> str:
    if value is None:
        return "NULL"
    if isinstance(value, bytes | bytearray | memoryview):
        return f"<{len(bytes(value))} bytes>"
    if isinstance(value, list):
        shown = ", ".join(_cell(v) for v in value[:6])
        more = f", … ({len(value)} values)" if len(value) > 6 else ""
        return f"[{shown}{more}]"
    if isinstance(value, float):
        return f"{value:.6g}"
    text = str(value).replace("\n", " ")
    return text if len(text) <= MAX_CELL_WIDTH else text[: MAX_CELL_WIDTH - 1] + "…"


def _json_value(value: Any) -> Any:
    if isinstance(value, bytes | bytearray | memoryview):
        return base64.b64encode(bytes(value)).decode("ascii")
    if isinstance(value, dt.datetime | dt.date | dt.time):
        return value.isoformat()
    if isinstance(value, decimal.Decimal | uuid.UUID):
        return str(value)
    if isinstance(value, dt.timedelta):
        return value.total_seconds()
    if isinstance(value, float) and not math.isfinite(value):  # NaN and ±Infinity are not JSON
        return None
    if isinstance(value, list | tuple):
        return [_json_value(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _json_value(v) for k, v in value.items()}
    return value


def format_table(result: Result) -> str:
    cells = [[_cell(v) for v in row] for row in result.rows]
    widths = [max([len(c), *(len(r[i]) for r in cells)]) for i, c in enumerate(result.columns)]

    def line(values: Sequence[str]) -> str:
        return " " + " | ".join(v.ljust(w) for v, w in zip(values, widths, strict=True)).rstrip()

    out = [line(result.columns), "+".join("-" * (w + 2) for w in widths)]
    out += [line(row) for row in cells]
    out.append(f"({len(result.rows)} row{'s' if len(result.rows) != 1 else ''})")
    return "\n".join(out) + "\n"


def _csv_value(value: Any) -> Any:
    """NULL as an empty field, lists and structs as JSON, the rest as in JSON output."""
    if value is None:
        return ""
    if isinstance(value, list | dict):
        return json.dumps(_json_value(value))
    return _json_value(value)


def format_csv(result: Result) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(result.columns)
    writer.writerows([_csv_value(v) for v in row] for row in result.rows)
    return buffer.getvalue()


def format_json(result: Result) -> str:
    records = [{c: _json_value(v) for c, v in zip(result.columns, row, strict=True)} for row in result.rows]
    return json.dumps(records, indent=1, ensure_ascii=False) + "\n"


FORMATTERS: dict[str, Callable[[Result], str]] = {"table": format_table, "csv": format_csv, "json": format_json}


def truncation_note(max_rows: int) -> str:
    return f"note: output truncated to the first {max_rows} rows (row cap; raise it with --max-rows, 0 = no cap)"


# --- command line ------------------------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit code 2
        raise ShellError(f"{message} (see ssl-attention sql --help)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="ssl-attention sql",
        description="Read-only SQL over the attention warehouse (DuckDB). Tables: "
        + ", ".join((*TABLES, *DERIVED_VIEWS))
        + f"; table macro {MACROS[0]}(model, method, image_id, layer[, head]). Examples: docs/sql.md.",
    )
    parser.add_argument("query", nargs="?", help="SQL to run; omit for an interactive prompt (or pipe SQL in)")
    parser.add_argument("--warehouse", help="warehouse directory (default: $SSL_ATTENTION_WAREHOUSE or data/warehouse)")
    parser.add_argument("--format", choices=FORMATS, default="table", help="output format (default: table)")
    parser.add_argument("--output", type=Path, help="write the result to FILE instead of stdout")
    parser.add_argument(
        "--max-rows", type=int, default=DEFAULT_MAX_ROWS, help="row cap, 0 = none (default: %(default)s)"
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_TIMEOUT_S,
        help="time limit in seconds, 0 = none (default: %(default)s); the query is interrupted then, but a sort"
        " or large operator may take some seconds more to stop",
    )
    return parser


@dataclass
class Settings:
    format: str = "table"
    max_rows: int = DEFAULT_MAX_ROWS
    timeout_s: float = DEFAULT_TIMEOUT_S


def execute_sql(con: duckdb.DuckDBPyConnection, sql: str, settings: Settings) -> Iterator[tuple[Result, str]]:
    """(result, rendered text) per statement; all statements are checked before the first runs."""
    for statement in parse_statements(sql):
        result = run_statement(con, statement, settings.max_rows, settings.timeout_s)
        yield result, FORMATTERS[settings.format](result)


def run_once(con: duckdb.DuckDBPyConnection, sql: str, settings: Settings, out: TextIO, err: TextIO) -> None:
    for result, text in execute_sql(con, sql, settings):
        out.write(text)
        if result.truncated:
            err.write(truncation_note(settings.max_rows) + "\n")


def sql_main(argv: list[str]) -> int:
    """Entry point of ``ssl-attention sql``; returns the exit code (0 ok, 2 error)."""
    try:
        args = build_parser().parse_args(argv)
        if args.max_rows < 0 or args.timeout < 0:
            raise ShellError("--max-rows and --timeout must be >= 0")
        warehouse = resolve_warehouse(args.warehouse)
        settings = Settings(args.format, args.max_rows, args.timeout)
        con = open_sandbox(warehouse)
        if not (warehouse / "attention_maps").is_dir():
            sys.stderr.write(f"note: no attention maps under {warehouse} yet; tables are empty\n")
        if args.query is None:
            if sys.stdin.isatty():
                return interactive(con, settings, warehouse)
            query = sys.stdin.read()
        else:
            query = args.query
        if args.output is not None:
            buffer = io.StringIO()
            run_once(con, query, settings, buffer, sys.stderr)
            args.output.write_text(buffer.getvalue(), encoding="utf-8")
            sys.stderr.write(f"wrote {args.output}\n")
        else:
            run_once(con, query, settings, sys.stdout, sys.stderr)
        return 0
    except SystemExit as exc:  # --help
        return int(exc.code or 0) if isinstance(exc.code, int) else 0
    except (ShellError, WarehouseLocationError, OSError, ValueError, duckdb.Error) as exc:
        sys.stderr.write(f"error: {one_line(exc)}\n")
        return 2
    except KeyboardInterrupt:
        sys.stderr.write("error: interrupted\n")
        return 2


# --- interactive prompt ------------------------------------------------------------------------------------


def history_file() -> Path:
    state = os.environ.get("XDG_STATE_HOME")
    if state:
        return Path(state) / "ssl_attention" / "history"
    return Path.home() / ".ssl_attention_history"


HELP = """Statements end with ';'. Commands:
  .tables              list the tables and views
  .schema [TABLE]      columns and types
  .format table|csv|json
  .maxrows N           row cap (0 = none)
  .timeout S           time limit in seconds (0 = none)
  .help  .quit
Examples: docs/sql.md"""


def _command(con: duckdb.DuckDBPyConnection, line: str, settings: Settings, out: TextIO) -> bool:
    """Handle a dot command; False means quit."""
    parts = line.split()
    name, rest = parts[0].lower(), parts[1:]
    if name in (".quit", ".exit", ".q"):
        return False
    if name == ".help":
        out.write(HELP + "\n")
    elif name == ".tables":
        out.write("  ".join((*TABLES, *DERIVED_VIEWS)) + f"   (macro: {MACROS[0]})\n")
    elif name == ".schema":
        targets = rest or list((*TABLES, *DERIVED_VIEWS))
        for table in targets:
            if table not in (*TABLES, *DERIVED_VIEWS):
                raise ShellError(f"unknown table {table!r}; tables: {', '.join((*TABLES, *DERIVED_VIEWS))}")
            rows = con.execute(f"DESCRIBE {table}").fetchall()  # table name from the fixed list above
            out.write(f"{table}: " + ", ".join(f"{r[0]} {r[1]}" for r in rows) + "\n")
    elif name == ".format" and len(rest) == 1 and rest[0] in FORMATS:
        settings.format = rest[0]
    elif name in (".maxrows", ".timeout") and len(rest) == 1:
        try:
            value = float(rest[0])
        except ValueError:
            raise ShellError(f"{name} needs a number") from None
        if value < 0:
            raise ShellError(f"{name} must be >= 0")
        if name == ".maxrows":
            settings.max_rows = int(value)
        else:
            settings.timeout_s = value
    else:
        raise ShellError(f"unknown or malformed command {line.strip()!r}; type .help")
    return True


def _setup_readline() -> Callable[[], None]:
    try:
        import readline
    except ImportError:  # Windows without pyreadline: no history, still works
        return lambda: None
    path = history_file()
    with contextlib.suppress(OSError):
        path.parent.mkdir(parents=True, exist_ok=True)
        readline.read_history_file(path)
    readline.set_history_length(HISTORY_LENGTH)

    def save() -> None:
        with contextlib.suppress(OSError):
            readline.write_history_file(path)

    return save


def interactive(
    con: duckdb.DuckDBPyConnection,
    settings: Settings,
    warehouse: Path,
    read: Callable[[str], str] = input,
    out: TextIO | None = None,
    err: TextIO | None = None,
) -> int:
    """The prompt: statements end with ';', dot commands, Ctrl-C cancels, Ctrl-D quits."""
    out = out or sys.stdout
    err = err or sys.stderr
    save_history = _setup_readline() if read is input else (lambda: None)
    out.write(f"ssl-attention SQL over {warehouse} (read-only). .help for commands, .quit to leave.\n")
    buffer: list[str] = []
    try:
        while True:
            try:
                line = read("sql> " if not buffer else "...> ")
            except EOFError:
                out.write("\n")
                return 0
            except KeyboardInterrupt:
                out.write("\n")
                buffer.clear()
                continue
            if not buffer and line.strip().startswith("."):
                try:
                    if not _command(con, line, settings, out):
                        return 0
                except (ShellError, duckdb.Error, ValueError) as exc:
                    err.write(f"error: {one_line(exc)}\n")
                continue
            buffer.append(line)
            text = "\n".join(buffer)
            if not text.strip():
                buffer.clear()
                continue
            if not text.rstrip().endswith(";"):
                continue
            buffer.clear()
            try:
                run_once(con, text, settings, out, err)
            except (ShellError, duckdb.Error, ValueError) as exc:  # one statement failed: the prompt goes on
                err.write(f"error: {one_line(exc)}\n")
            except KeyboardInterrupt:
                err.write("error: cancelled\n")
    finally:
        save_history()


def main(argv: Sequence[str] | None = None) -> int:
    return sql_main(list(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    sys.exit(main())
