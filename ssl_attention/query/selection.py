"""Validation of user input against what the warehouse holds; each check names the valid values.

``Warehouse._resolve`` runs these in one order (model, method, head, layer) and returns a ``Selection``;
the query functions take that, never the raw arguments.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from pathlib import Path

from ssl_attention.query.errors import QueryError, UnknownNameError, format_values
from ssl_attention.query.metadata import PartitionFacts
from ssl_attention.query.results import ModelInfo
from ssl_attention.stats import STATISTICS


@dataclass(frozen=True)
class Selection:
    """A validated (model, method[, layer][, head]) and the maps partition it names."""

    info: ModelInfo
    method: str
    facts: PartitionFacts  # of the maps partition (over all its image shards)
    files: tuple[Path, ...]  # the maps partition's data files, one per image shard that has one
    layer: int | None  # None: no layer was asked for (every layer)
    head: int | None  # None: the fused map, or no head was asked for

    @property
    def model(self) -> str:
        return self.info.slug


def check_name(kind: str, value: object) -> str:
    if not isinstance(value, str) or not value:
        raise QueryError(f"{kind} must be a non-empty string, got {value!r}")
    return value


def as_index(kind: str, value: object) -> int:
    """An integer argument (numpy integers welcome, bools and floats refused)."""
    if isinstance(value, bool):
        raise QueryError(f"{kind} must be an integer, got {value!r}")
    try:
        return operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        raise QueryError(f"{kind} must be an integer, got {value!r}") from None


def check_method(info: ModelInfo, method: object) -> str:
    check_name("method", method)
    if method not in info.methods:
        raise UnknownNameError(
            f"method {method!r} is not available for {info.slug}; valid methods: {format_values(info.methods)}"
        )
    return method  # type: ignore[return-value]


def check_layer(info: ModelInfo, method: str, facts: PartitionFacts, layer: object) -> int:
    index = as_index("layer", layer)
    if index not in facts.layers:
        raise UnknownNameError(
            f"layer {index} is not available for {info.slug}/{method}; valid layers: {format_values(facts.layers)}"
        )
    return index


def check_head(info: ModelInfo, method: str, head: object) -> int | None:
    """A head index of a per-head method, or None (the fused map)."""
    if head is None:
        return None
    index = as_index("head", head)
    if not info.has_heads(method):
        if info.num_heads == 0:
            why = f"{info.slug} is a CNN without attention heads"
        else:
            why = f"{method} is a fused-only method (per-head methods of {info.slug}: "
            why += f"{format_values(info.per_head_methods)})"
        raise QueryError(f"head {index} is not valid: {why}; use head=None for the fused map")
    if not 0 <= index < info.num_heads:
        raise UnknownNameError(
            f"head {index} is out of range for {info.slug} ({info.num_heads} heads); "
            f"valid heads: {format_values(range(info.num_heads))}, or None for the fused map"
        )
    return index


def check_stat(stat: object) -> str:
    if stat not in STATISTICS:
        raise UnknownNameError(f"unknown statistic {stat!r}; valid statistics: {format_values(STATISTICS, 20)}")
    return stat  # type: ignore[return-value]


def check_depth(depth: object) -> float:
    if isinstance(depth, bool) or not isinstance(depth, int | float) or not 0.0 <= float(depth) <= 1.0:
        raise QueryError(f"depth must be a number in 0..1, got {depth!r}")
    return float(depth)
