"""`ssl-attention sql "QUERY"`: one-shot, read-only SQL over the warehouse, as a table, CSV or JSON.

The statements run in ``ssl_attention.query.sandbox`` (read-only gate, locked-down connection, row cap, time
limit). SQL piped into stdin runs as a script. For an interactive prompt use DuckDB's own client on the
catalog file, with the warehouse as its file search path (``catalog.client_command``: ``duckdb -readonly -cmd
"SET file_search_path = 'data/warehouse'" data/warehouse/attention.duckdb``, docs/sql.md); a stale catalog
is rewritten first. Errors are one line on stderr and exit code 2; no traceback reaches the user.
"""

import argparse
import base64
import csv
import datetime as dt
import decimal
import io
import json
import math
import sys
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import duckdb

from ssl_attention.query.catalog import client_command, refresh_catalog
from ssl_attention.query.sandbox import Result, SandboxError, one_line, open_sandbox, parse_statements, run_statement
from ssl_attention.query.views import DERIVED_VIEWS, MACROS, TABLES
from ssl_attention.settings import WAREHOUSE_ENV, resolve_warehouse
from ssl_attention.warehouse.paths import CATALOG_FILE, WarehouseLocationError

HELP = "ad-hoc, read-only SQL over the warehouse"
DEFAULT_MAX_ROWS = 10_000
DEFAULT_TIMEOUT_S = 30.0
MAX_CELL_WIDTH = 60


# --- output ---------------------------------------------------------------------------------------------


def _cell(value: Any) -> str:
    if value is None:
        return "NULL"
    if isinstance(value, bytes | bytearray | memoryview):
        return f"<{len(bytes(value))} bytes>"
    if isinstance(value, list):
        more = f", … ({len(value)} values)" if len(value) > 6 else ""
        return f"[{', '.join(_cell(v) for v in value[:6])}{more}]"
    if isinstance(value, float):
        return f"{value:.6g}"
    text = str(value).replace("\n", " ")
    return text if len(text) <= MAX_CELL_WIDTH else text[: MAX_CELL_WIDTH - 1] + "…"


def _json_value(value: Any) -> Any:
    """Binary as base64, dates and times in ISO 8601, NaN and ±Infinity as null (JSON has no such numbers)."""
    if isinstance(value, bytes | bytearray | memoryview):
        return base64.b64encode(bytes(value)).decode("ascii")
    if isinstance(value, dt.datetime | dt.date | dt.time):
        return value.isoformat()
    if isinstance(value, decimal.Decimal | uuid.UUID):
        return str(value)
    if isinstance(value, dt.timedelta):
        return value.total_seconds()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, list | tuple):
        return [_json_value(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _json_value(v) for k, v in value.items()}
    return value


def format_table(result: Result) -> str:
    cells = [[_cell(v) for v in row] for row in result.rows]
    widths = [max([len(c), *(len(r[i]) for r in cells)]) for i, c in enumerate(result.columns)]

    def line(values: list[str]) -> str:
        return " " + " | ".join(v.ljust(w) for v, w in zip(values, widths, strict=True)).rstrip()

    rows = [line(result.columns), "+".join("-" * (w + 2) for w in widths), *(line(row) for row in cells)]
    return "\n".join([*rows, f"({len(result.rows)} row{'s' if len(result.rows) != 1 else ''})"]) + "\n"


def format_csv(result: Result) -> str:
    """NULL as an empty field, lists and structs as JSON, the rest as in JSON output."""

    def field(value: Any) -> Any:
        if value is None:
            return ""
        return json.dumps(_json_value(value)) if isinstance(value, list | dict) else _json_value(value)

    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(result.columns)
    writer.writerows([field(v) for v in row] for row in result.rows)
    return buffer.getvalue()


def format_json(result: Result) -> str:
    records = [{c: _json_value(v) for c, v in zip(result.columns, row, strict=True)} for row in result.rows]
    return json.dumps(records, indent=1, ensure_ascii=False) + "\n"


FORMATTERS: dict[str, Callable[[Result], str]] = {"table": format_table, "csv": format_csv, "json": format_json}


# --- command line ---------------------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit code 2
        raise SandboxError(f"{message} (see ssl-attention sql --help)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="ssl-attention sql",
        description="Read-only SQL over the attention warehouse (DuckDB). Tables: "
        + ", ".join((*TABLES, *DERIVED_VIEWS))
        + f"; table macro {MACROS[0]}(model, method, image_id, layer[, head]). Examples: docs/sql.md. For an"
        f" interactive prompt: duckdb -readonly -cmd \"SET file_search_path = 'data/warehouse'\""
        f" data/warehouse/{CATALOG_FILE}",
    )
    parser.add_argument("query", nargs="?", help="SQL to run; omit it to read a script from stdin")
    parser.add_argument("--warehouse", help=f"warehouse directory (default: ${WAREHOUSE_ENV} or data/warehouse)")
    parser.add_argument("--format", choices=tuple(FORMATTERS), default="table", help="output format (default: table)")
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


def main(argv: list[str]) -> int:
    """``ssl-attention sql ARGS``; returns the exit code (0 ok, 2 error)."""
    try:
        args = build_parser().parse_args(argv)
        if args.max_rows < 0 or args.timeout < 0:
            raise SandboxError("--max-rows and --timeout must be >= 0")
        warehouse = resolve_warehouse(args.warehouse)
        refresh_catalog(warehouse)  # so that DuckDB's own client, pointed to it below, reads this warehouse
        if args.query is None and sys.stdin.isatty():
            raise SandboxError(
                f"no query given; for an interactive prompt run DuckDB's client: {client_command(warehouse)}"
            )
        query = sys.stdin.read() if args.query is None else args.query
        con = open_sandbox(warehouse)
        if not (warehouse / "attention_maps").is_dir():
            sys.stderr.write(f"note: no attention maps under {warehouse} yet; tables are empty\n")
        out = io.StringIO() if args.output is not None else sys.stdout
        for statement in parse_statements(query):  # all are checked before the first runs
            result = run_statement(con, statement, args.max_rows, args.timeout)
            out.write(FORMATTERS[args.format](result))
            if result.truncated:
                sys.stderr.write(
                    f"note: output truncated to the first {args.max_rows} rows (row cap; raise it with --max-rows,"
                    " 0 = no cap)\n"
                )
        if args.output is not None:
            args.output.write_text(out.getvalue(), encoding="utf-8")  # type: ignore[attr-defined]
            sys.stderr.write(f"wrote {args.output}\n")
        return 0
    except SystemExit as exc:  # --help
        return exc.code if isinstance(exc.code, int) else 0
    except (SandboxError, WarehouseLocationError, OSError, ValueError, duckdb.Error) as exc:
        sys.stderr.write(f"error: {one_line(exc)}\n")
        return 2
    except KeyboardInterrupt:
        sys.stderr.write("error: interrupted\n")
        return 2
