"""Atomic replacement of one Parquet partition file.

A writer streams row groups into a hidden temporary file beside the partition's ``data.parquet`` and, on
commit, fsyncs it and ``os.replace``s it over the old file: a POSIX rename within one directory is atomic,
so a reader opens either the old file or the new one, never a half-written one. A process killed before
the rename leaves the old file untouched and an orphaned temp file, removed by the next writer.
Temporary names start with '.', which DuckDB's ``*.parquet`` globs and pyarrow datasets both skip.

With ``cluster_by`` (the warehouse's map tables pass ``image_id``) the commit first rewrites the temporary
file into a second one, sorted by that key and packed into row groups of about ``target_group_bytes``
(uncompressed), never splitting one key across groups. Readers then prune by the key's min/max statistics
to a single row group, and DuckDB pays its per-row-group planning cost for ~100 groups, not one per image
(docs/benchmarks.md, "Query latency"). Float lists are stored without dictionaries, byte-stream-split.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ssl_attention.processes import pid_alive
from ssl_attention.warehouse.paths import DATA_FILE

TEMP_SUFFIX = ".parquet.tmp"
STALE_AFTER_S = 6 * 3600
DEFAULT_GROUP_BYTES = 1 << 20  # uncompressed bytes per row group when clustering


@dataclass
class WriteStats:
    path: Path
    rows: int
    bytes: int


def remove_stale_temp_files(directory: Path) -> list[Path]:
    """Delete temp files left by writers that died (their pid is gone, or older than STALE_AFTER_S)."""
    removed = []
    if not directory.is_dir():
        return removed
    for path in directory.glob(f".*{TEMP_SUFFIX}"):
        try:
            pid = int(path.name[1:].split("-", 1)[0])
        except ValueError:
            pid = -1
        try:
            age = time.time() - path.stat().st_mtime
        except FileNotFoundError:
            continue
        if pid == os.getpid():
            continue
        if pid < 0 or not pid_alive(pid) or age > STALE_AFTER_S:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
                removed.append(path)
    return removed


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _temp_path(directory: Path) -> Path:
    return directory / f".{os.getpid()}-{uuid.uuid4().hex}{TEMP_SUFFIX}"


def parquet_options(schema: pa.Schema, compression: str) -> dict[str, object]:
    """Writer options: dictionaries for strings only; float lists byte-stream-split (compresses floats well)."""
    dictionary = [f.name for f in schema if pa.types.is_string(f.type) or pa.types.is_large_string(f.type)]
    split = {
        f"{f.name}.list.element": "BYTE_STREAM_SPLIT"
        for f in schema
        if pa.types.is_list(f.type) and pa.types.is_floating(f.type.value_type)
    }
    return {
        "compression": compression,
        "write_statistics": True,
        "use_dictionary": dictionary,
        "column_encoding": split or None,
    }


class PartitionWriter:
    """Stream tables into one partition's replacement file; ``commit()`` swaps it in atomically."""

    def __init__(
        self,
        directory: Path,
        schema: pa.Schema,
        compression: str = "zstd",
        cluster_by: str | None = None,
        target_group_bytes: int = DEFAULT_GROUP_BYTES,
    ) -> None:
        if cluster_by is not None and cluster_by not in schema.names:
            raise ValueError(f"cluster_by {cluster_by!r} is not a column of the schema")
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        remove_stale_temp_files(self.directory)
        self.schema = schema
        self.cluster_by = cluster_by
        self.target_group_bytes = target_group_bytes
        self._options = parquet_options(schema, compression)
        self.target = self.directory / DATA_FILE
        self.temp = _temp_path(self.directory)
        # A clustered writer's temporary file is rewritten at commit: write it uncompressed, compress once.
        first_pass = parquet_options(schema, "none") if cluster_by is not None else self._options
        self._writer: pq.ParquetWriter | None = pq.ParquetWriter(self.temp, schema, **first_pass)
        self.rows = 0
        self.closed = False

    def write(self, table: pa.Table) -> None:
        """Append ``table`` as one row group (callers pass one image's rows at a time); with ``cluster_by``,
        as one row group per key value, rows kept in their order."""
        if self._writer is None:
            raise RuntimeError("writer is closed")
        if table.num_rows == 0:
            return
        for column in self.schema:  # a nullable column added since an older file was written: NULL
            if column.name not in table.column_names and column.nullable:
                table = table.append_column(column, pa.nulls(table.num_rows, column.type))
        table = table.select(self.schema.names).cast(self.schema)
        for part in self._split_by_key(table):
            self._writer.write_table(part, row_group_size=max(part.num_rows, 1))
        self.rows += table.num_rows

    def _split_by_key(self, table: pa.Table) -> list[pa.Table]:
        if self.cluster_by is None:
            return [table]
        key = table[self.cluster_by]
        if pc.count_distinct(key, mode="all").as_py() <= 1:
            return [table]
        table = table.take(pc.sort_indices(key))  # Arrow's sort is stable: row order within a key is kept
        values = table[self.cluster_by].combine_chunks()
        starts = np.flatnonzero(np.asarray(pc.not_equal(values[1:], values[:-1]).fill_null(True))) + 1
        bounds = [0, *starts.tolist(), table.num_rows]
        return [table.slice(a, b - a) for a, b in itertools.pairwise(bounds)]

    def _cluster(self) -> None:
        """Rewrite the temp file sorted by ``cluster_by``, in row groups of about ``target_group_bytes``."""
        source = pq.ParquetFile(self.temp)
        meta = source.metadata
        column = meta.schema.names.index(self.cluster_by)
        keys = []
        for index in range(meta.num_row_groups):
            stats = meta.row_group(index).column(column).statistics
            if stats is not None and stats.has_min_max:
                keys.append((stats.min, index))
            else:  # no statistics: read the key (each temp row group holds one key value)
                keys.append((source.read_row_group(index, columns=[self.cluster_by])[0][0].as_py(), index))
        keys.sort(key=lambda item: (item[0] is None, item[0] if item[0] is not None else "", item[1]))
        output = _temp_path(self.directory)
        try:
            with pq.ParquetWriter(output, self.schema, **self._options) as writer:
                pending: list[pa.Table] = []
                size = 0
                for _, index in keys:
                    pending.append(source.read_row_group(index))
                    size += meta.row_group(index).total_byte_size
                    if size >= self.target_group_bytes:
                        _write_group(writer, pending)
                        pending, size = [], 0
                _write_group(writer, pending)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                output.unlink()
            raise
        finally:
            source.close()
        self.temp.unlink()
        self.temp = output

    def commit(self) -> WriteStats:
        if self._writer is None:
            raise RuntimeError("writer is closed")
        self._writer.close()
        self._writer = None
        if self.cluster_by is not None:
            self._cluster()
        with open(self.temp, "rb") as handle:
            os.fsync(handle.fileno())
        size = self.temp.stat().st_size
        _advance_mtime(self.temp, self.target)
        os.replace(self.temp, self.target)
        _fsync_dir(self.directory)
        self.closed = True
        return WriteStats(path=self.target, rows=self.rows, bytes=size)

    def abort(self) -> None:
        if self._writer is not None:
            with contextlib.suppress(Exception):
                self._writer.close()
            self._writer = None
        with contextlib.suppress(FileNotFoundError):
            self.temp.unlink()
        self.closed = True

    def __enter__(self) -> PartitionWriter:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if not self.closed:
            if exc_type is None:
                self.commit()
            else:
                self.abort()


def _advance_mtime(new: Path, old: Path) -> None:
    """Give ``new`` an mtime in a later whole second than ``old``, the file it is about to replace.

    DuckDB's Parquet footer cache (``parquet_metadata_cache``) is keyed on the file's mtime in whole seconds;
    two versions written within one second would otherwise look alike to it.
    """
    try:
        old_second = int(old.stat().st_mtime)
    except FileNotFoundError:
        return
    st = new.stat()
    if int(st.st_mtime) <= old_second:
        os.utime(new, ns=(st.st_atime_ns, (old_second + 1) * 1_000_000_000))


def _write_group(writer: pq.ParquetWriter, tables: list[pa.Table]) -> None:
    if tables:
        group = pa.concat_tables(tables)
        writer.write_table(group, row_group_size=max(group.num_rows, 1))


def write_table_atomic(directory: Path, table: pa.Table, schema: pa.Schema) -> WriteStats:
    """Replace a small partition with ``table`` in one go."""
    with PartitionWriter(directory, schema) as writer:
        writer.write(table)
        return writer.commit()
