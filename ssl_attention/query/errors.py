"""Errors of the query layer: all are ``ValueError``s with a message fit to show a user as is."""

from __future__ import annotations

from collections.abc import Iterable

from ssl_attention import registry


class QueryError(ValueError):
    """A request the warehouse cannot answer (invalid combination, missing data); the message says why."""


class UnknownNameError(QueryError, registry.UnknownNameError):
    """An unknown model, method, layer, head or image; the message names the valid values."""


class MissingDataError(QueryError):
    """The names are valid but the warehouse holds no such rows (not extracted yet, head_stats not computed)."""


class EmptyWarehouseError(MissingDataError):
    """The warehouse holds no attention maps at all."""


class WarehouseLayoutError(QueryError):
    """A warehouse whose layout this version cannot read as is (written before image shards); the message
    names the command that migrates it."""


class UnreadableFileError(QueryError):
    """A warehouse file that exists but cannot be read (corrupt, truncated, wrong schema, no permission);
    the message names the file and DuckDB's reason."""


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (DuckDB's span lines: ``LINE 1: ...``, a caret), which says
    what went wrong; the class name when the message is empty."""
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else exc.__class__.__name__


def fill_command(root: object) -> str:
    return f"ssl-attention run --images DIR --warehouse {root}"


def format_values(values: Iterable[object], limit: int = 12) -> str:
    """``a, b, c`` — integer runs as ``0..11``; long lists cut with a count."""
    items = list(values)
    if items and all(isinstance(v, int) and not isinstance(v, bool) for v in items):
        ints = sorted(set(items))  # type: ignore[type-var]
        if len(ints) > 2 and ints == list(range(ints[0], ints[-1] + 1)):
            return f"{ints[0]}..{ints[-1]}"
        items = list(ints)
    if not items:
        return "(none)"
    shown = ", ".join(str(v) for v in items[:limit])
    return shown if len(items) <= limit else f"{shown}, … ({len(items)} in total)"
