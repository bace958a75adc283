"""``ssl-attention migrate-shards``: lay a warehouse out in image shards (from the pre-shard layout, or from
another shard count).

From the pre-shard layout (``.../method=<x>/data.parquet``), for each such file: its rows are split by
``shard_of(image_id)`` into ``.../method=<x>/shard=<s>/data.parquet``, each written atomically (stale shard
files from an earlier attempt are replaced or removed). Only when every file is split is ``layout.json``
written: that is the commit. Before it the warehouse is still the old one (old files whole, readers told to
migrate); after it readers use the shard files only and ignore the old ones, which are then removed. A
migration killed at any point leaves a warehouse that is whole; running the command again finishes it, and
running it on a migrated warehouse changes nothing (it only removes leftover old files).

From another shard count: each partition's shard files are first merged back into one old-layout file per
partition, then ``layout.json`` is removed (the warehouse is then an old-layout one, whole), then the split
above runs with the new count.
"""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ssl_attention.warehouse import schema
from ssl_attention.warehouse.atomic import PartitionWriter
from ssl_attention.warehouse.paths import DATA_FILE, iter_partitions
from ssl_attention.warehouse.shards import (
    DEFAULT_SHARDS,
    SHARD_KEY,
    SHARDED_TABLES,
    check_shards,
    layout_path,
    legacy_files,
    recorded_shards,
    shard_names,
    shard_of,
    write_layout,
)

CLUSTERED = ("attention_maps", "head_stats", "inputs")  # sorted by image_id, as extraction writes them


@dataclass
class MigrationReport:
    shards: int
    previous: int | None  # the recorded count before (None: the pre-shard layout or an empty warehouse)
    files_split: int = 0  # old-layout files split into shards
    files_written: int = 0  # shard files written
    rows: dict[str, int] = field(default_factory=dict)  # table -> rows moved
    leftovers_removed: int = 0  # old-layout files removed after the commit


def _table_of(root: Path, path: Path) -> str:
    return path.relative_to(root).parts[0]


def _writer(directory: Path, table: str) -> PartitionWriter:
    return PartitionWriter(directory, schema.SCHEMAS[table], cluster_by="image_id" if table in CLUSTERED else None)


def _row_groups(paths: Iterable[Path]) -> Iterable[pa.Table]:
    for path in paths:
        parquet = pq.ParquetFile(path)
        try:
            for index in range(parquet.num_row_groups):
                yield parquet.read_row_group(index)
        finally:
            parquet.close()


def _split(root: Path, old: Path, shards: int, report: MigrationReport) -> None:
    """Write the shard files of one old-layout partition file (streamed, row group by row group)."""
    table, directory = _table_of(root, old), old.parent
    names = shard_names(shards)
    writers = {name: _writer(directory / f"{SHARD_KEY}={name}", table) for name in names}
    try:
        for group in _row_groups([old]):
            ids = group["image_id"].to_pylist()
            shard_column = pa.array([shard_of(image_id, shards) for image_id in ids], pa.string())
            for name in set(shard_column.to_pylist()):
                writers[name].write(group.filter(pc.equal(shard_column, name)))
        for writer in writers.values():
            if writer.rows:
                writer.commit()
                report.files_written += 1
            else:  # an empty shard: no file (a stale one from an earlier layout goes)
                writer.abort()
                with contextlib.suppress(FileNotFoundError):
                    (writer.directory / DATA_FILE).unlink()
            report.rows[table] = report.rows.get(table, 0) + writer.rows
    except BaseException:
        for writer in writers.values():
            if not writer.closed:
                writer.abort()
        raise
    for child in directory.iterdir():  # shard folders of another count, left by an earlier layout
        if child.is_dir() and child.name.startswith(f"{SHARD_KEY}=") and child.name[len(SHARD_KEY) + 1 :] not in names:
            shutil.rmtree(child)
    report.files_split += 1


def _unshard(root: Path) -> None:
    """Merge each partition's shard files back into one old-layout file, then drop ``layout.json``."""
    for table in SHARDED_TABLES:
        groups: dict[Path, list[Path]] = {}
        for partition in iter_partitions(root, table):
            groups.setdefault(partition.path.parent.parent, []).append(partition.path)
        for directory, files in groups.items():
            with _writer(directory, table) as writer:
                for group in _row_groups(files):
                    writer.write(group)
    layout_path(root).unlink()


def migrate_shards(root: Path, shards: int | None = None) -> MigrationReport:
    """Lay the warehouse at ``root`` out in ``shards`` image shards (None: the recorded count, else
    ``DEFAULT_SHARDS``); see the module docstring for the order that keeps it whole throughout."""
    root = Path(root)
    previous = recorded_shards(root)
    target = check_shards(shards if shards is not None else previous or DEFAULT_SHARDS)
    report = MigrationReport(target, previous)
    if previous is not None and previous != target:
        _unshard(root)
    elif previous is not None:  # already laid out so: leftovers of an interrupted migration go
        for old in legacy_files(root):
            old.unlink()
            report.leftovers_removed += 1
        return report
    olds = legacy_files(root)
    for old in olds:
        _split(root, old, target, report)
    write_layout(root, target, replace=True)  # the commit: readers now use the shard files
    for old in olds:
        with contextlib.suppress(FileNotFoundError):
            old.unlink()
            report.leftovers_removed += 1
    return report
