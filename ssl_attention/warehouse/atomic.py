"""Atomic replacement of one Parquet partition file.

A writer streams row groups into a hidden temporary file beside the partition's ``data.parquet`` and, on
commit, fsyncs it and ``os.replace``s it over the old file: a POSIX rename within one directory is atomic,
so a reader opens either the old file or the new one, never a half-written one. A process killed before
the rename leaves the old file untouched and an orphaned temp file, removed by the next writer.
Temporary names start with '.', which DuckDB's ``*.parquet`` globs and pyarrow datasets both skip.
"""

from __future__ import annotations

import contextlib
import os
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import pyarrow as pa
import pyarrow.parquet as pq

from ssl_attention.warehouse.paths import DATA_FILE

TEMP_SUFFIX = ".parquet.tmp"
STALE_AFTER_S = 6 * 3600


@dataclass
class WriteStats:
    path: Path
    rows: int
    bytes: int


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


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
        if pid < 0 or not _pid_alive(pid) or age > STALE_AFTER_S:
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


class PartitionWriter:
    """Stream tables into one partition's replacement file; ``commit()`` swaps it in atomically."""

    def __init__(self, directory: Path, schema: pa.Schema, compression: str = "zstd") -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        remove_stale_temp_files(self.directory)
        self.schema = schema
        self.target = self.directory / DATA_FILE
        self.temp = self.directory / f".{os.getpid()}-{uuid.uuid4().hex}{TEMP_SUFFIX}"
        self._writer: pq.ParquetWriter | None = pq.ParquetWriter(
            self.temp, schema, compression=compression, write_statistics=True
        )
        self.rows = 0
        self.closed = False

    def write(self, table: pa.Table) -> None:
        """Append ``table`` as one row group (callers pass one image's rows at a time)."""
        if self._writer is None:
            raise RuntimeError("writer is closed")
        if table.num_rows == 0:
            return
        table = table.select(self.schema.names).cast(self.schema)
        self._writer.write_table(table, row_group_size=max(table.num_rows, 1))
        self.rows += table.num_rows

    def commit(self) -> WriteStats:
        if self._writer is None:
            raise RuntimeError("writer is closed")
        self._writer.close()
        self._writer = None
        with open(self.temp, "rb") as handle:
            os.fsync(handle.fileno())
        size = self.temp.stat().st_size
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


def write_table_atomic(directory: Path, table: pa.Table, schema: pa.Schema) -> WriteStats:
    """Replace a small partition with ``table`` in one go."""
    with PartitionWriter(directory, schema) as writer:
        writer.write(table)
        return writer.commit()
